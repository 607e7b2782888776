"""SAFT for TRL: `SAFTSFTTrainer` / `SAFTSFTConfig` and `SAFTDPOTrainer` / `SAFTDPOConfig`.

    from saft_hf.trl import SAFTSFTConfig, SAFTSFTTrainer

    args = SAFTSFTConfig(output_dir="out", sam_rho=0.5)          # every SFTConfig field + sam_*
    SAFTSFTTrainer(model=model, args=args, train_dataset=ds).train()

Built with `saft_hf.with_sam` / `with_sam_args`, so they behave exactly like the TRL classes
(same constructor, same loss, same logs plus the `sam_*` metrics) with SAFT's two-pass step:
both passes differentiate the trainer's own loss (SFT's token-level NLL, DPO's preference loss).

DPO: the reference model is never perturbed. SAM perturbs only the trainable parameters of the
policy; an explicit `ref_model` is a separate, frozen module, and with `peft_config` the reference
is the policy with its adapters disabled, where only the (perturbed) adapter weights are unused.
Tested with TRL 1.16 (`pip install 'saft-hf[trl]'`).
"""

from __future__ import annotations

try:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "saft_hf.trl needs TRL (tested with trl 1.16): install it with pip install 'saft-hf[trl]' "
        f"(import failed: {err})."
    ) from err

from .wrap import with_sam, with_sam_args

SAFTSFTConfig = with_sam_args(SFTConfig, name="SAFTSFTConfig", module=__name__)
SAFTDPOConfig = with_sam_args(DPOConfig, name="SAFTDPOConfig", module=__name__)
SAFTSFTTrainer = with_sam(SFTTrainer, SAFTSFTConfig, name="SAFTSFTTrainer", module=__name__)
SAFTDPOTrainer = with_sam(DPOTrainer, SAFTDPOConfig, name="SAFTDPOTrainer", module=__name__)

__all__ = ["SAFTDPOConfig", "SAFTDPOTrainer", "SAFTSFTConfig", "SAFTSFTTrainer"]
