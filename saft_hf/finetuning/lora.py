"""LoRA through peft for SAFT: arguments, config builder, T5 target modules, adapter saving.

With LoRA only the adapter matrices require grad, so SAFT's perturbation (which walks the
trainable parameters) perturbs only them; the frozen base is never touched. A saved adapter dir
is a task vector for merging: `saft_hf.merging` turns it into `scale * B @ A` per target weight.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# T5 attention projections are named q, k, v, o; the feed-forward ones wi_0, wi_1, wo (gated, Flan-T5).
T5_ATTENTION_MODULES = ("q", "k", "v", "o")
T5_FEED_FORWARD_MODULES = ("wi_0", "wi_1", "wo", "wi")
DEFAULT_T5_TARGET_MODULES = ("q", "v")  # the LoRA paper's choice, also peft's default for T5


@dataclass
class LoraArguments:
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 (default) means full fine-tuning, no LoRA."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_T5_TARGET_MODULES),
        metadata={
            "help": "Module names to adapt (T5: q k v o for attention, wi_0 wi_1 wo for the feed-forward), "
            "or 'all-linear'."
        },
    )

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0

    def __post_init__(self):
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 disables LoRA), got {self.lora_r}")
        if self.lora_r > 0 and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def build_lora_config(args: LoraArguments, task_type: str = "SEQ_2_SEQ_LM"):
    from peft import LoraConfig

    targets = args.lora_target_modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type=task_type,
        bias="none",
    )


def apply_lora(model, args: LoraArguments, task_type: str = "SEQ_2_SEQ_LM"):
    """Wrap `model` with LoRA adapters; only adapter parameters remain trainable.

    Raises if a target module name matches nothing (peft's own error is cryptic about it).
    """
    from peft import get_peft_model

    targets = args.lora_target_modules
    if targets != ["all-linear"]:
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [t for t in targets if t not in leaf_names]
        if unknown:
            raise ValueError(
                f"LoRA target module(s) {unknown} not found in {type(model).__name__}; "
                f"for T5 use names among {T5_ATTENTION_MODULES + T5_FEED_FORWARD_MODULES}"
            )
    return get_peft_model(model, build_lora_config(args, task_type))


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the check import-safe
        return False
    return isinstance(model, PeftModel)


def save_lora_adapter(model, output_dir: str | os.PathLike, tokenizer=None) -> None:
    """Write the adapter (adapter_config.json + adapter_model.safetensors) into `output_dir`.

    Files are written in a temporary directory beside it and renamed in one by one, so other
    content of `output_dir` (trainer checkpoints, logs) stays and no file is ever half-written.
    The adapter config records the base model's name/path, which merging and evaluation use.
    """
    import shutil
    import tempfile
    from pathlib import Path

    if not is_peft_model(model):
        raise TypeError(f"expected a peft model with LoRA adapters, got {type(model).__name__}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".tmp", dir=output_dir))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        # Weights first, config last: a dir with adapter_config.json always has its weights.
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        names.sort(key=lambda n: n == "adapter_config.json")
        for name in names:
            os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
