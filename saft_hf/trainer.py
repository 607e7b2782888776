"""`SAFTTrainer` / `SAFTSeq2SeqTrainer`: SAM / ASAM inside the Hugging Face Trainer.

The two-pass update happens per micro-batch inside `training_step` (see
the README's trainer section for why there and what is supported):

1. first pass at w: loss + `torch.autograd.grad` (never touches `.grad`, DDP buckets or
   DeepSpeed partitions); under DDP inside `no_sync`, under DeepSpeed through `engine.module`;
2. e = SAM/ASAM perturbation (saft_hf.sharpness), computed in place in the fresh gradients;
   back up the perturbed tensors and add e in place;
3. second pass at w + e through the parent's `training_step` (loss scaling for gradient
   accumulation, GradScaler, DDP sync, DeepSpeed backward);
4. restore w from the backups in a `finally:`; under DeepSpeed the engine step that accelerate
   would run inside `backward` is deferred until after the restore.

The SAM logic is written once, in `SAFTTrainerMixin`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.training_args import OptimizerNames

from . import sharpness
from .args import SAFTSeq2SeqTrainingArguments, SAFTTrainingArguments, validate_sharpness_arguments
from .io_utils import write_text_atomic

logger = logging.getLogger(__name__)

SAFT_CITATION = """
## Sharpness-aware fine-tuning (SAFT)

This model was fine-tuned with sharpness-aware minimization inside the Hugging Face Trainer
(`saft-hf`), following *Mitigating Parameter Interference in Model Merging via Sharpness-Aware
Fine-Tuning* (Lee et al., ICLR 2025).

```bibtex
@inproceedings{lee2025saft,
  title     = {Mitigating Parameter Interference in Model Merging via Sharpness-Aware Fine-Tuning},
  author    = {Lee, Yeoreum and Jung, Jinwook and Baik, Sungyong},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025}
}
```
"""
_CITATION_MARKER = "## Sharpness-aware fine-tuning (SAFT)"


class _SAMLogAccumulator:
    """Running sums since the last log: perturbed loss, ||e||, ||T g||, micro-batches, skips."""

    def __init__(self):
        self.reset()
        self.skipped_total = 0

    def reset(self):
        self.perturbed_loss = 0.0
        self.perturbation_norm = 0.0
        self.grad_norm = 0.0
        self.micro_batches = 0
        self.perturbed_micro_batches = 0

    def add(self, perturbed_loss: torch.Tensor, result: sharpness.PerturbationResult | None):
        self.perturbed_loss += float(perturbed_loss)
        self.micro_batches += 1
        if result is not None and result.applied:
            self.perturbation_norm += float(result.perturbation_norm)
            self.grad_norm += float(result.grad_norm)
            self.perturbed_micro_batches += 1
        else:
            self.skipped_total += 1


class SAFTTrainerMixin:
    """Adds the SAM / ASAM two-pass update to a `transformers.Trainer` subclass."""

    _args_class = SAFTTrainingArguments

    def __init__(self, model=None, args=None, *positional, **kwargs):
        if args is None:
            args = self._args_class(output_dir="trainer_output")
        if not hasattr(args, "sam_rho"):
            raise TypeError(
                f"{type(self).__name__} needs {self._args_class.__name__} (it carries the sam_* knobs), got "
                f"{type(args).__name__}. Build the arguments with {self._args_class.__name__}(...) instead."
            )
        validate_sharpness_arguments(args)
        super().__init__(model, args, *positional, **kwargs)
        self._sam_log = _SAMLogAccumulator()
        self._sam_last_logged_step = self.state.global_step
        if self.sam_enabled:
            self._check_sam_support()

    # ------------------------------------------------------------------ configuration
    @property
    def sam_enabled(self) -> bool:
        return self.args.sam_rho > 0

    @property
    def _zero_stage(self) -> int:
        if not self.is_deepspeed_enabled:
            return 0
        return int(self.accelerator.state.deepspeed_plugin.zero_stage or 0)

    def _check_sam_support(self) -> None:
        """Refuse, at construction time, the set-ups where the two-pass update cannot be correct."""
        args = self.args
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "SAM/ASAM with FSDP is not implemented in SAFTTrainer: FSDP keeps the weights sharded outside "
                "forward and reduces gradients in its own backward hooks, so the first-pass gradient and the "
                "in-place perturbation/restore would need FSDP-specific gathering (not written or tested). "
                "Use DDP or DeepSpeed ZeRO-1/2/3 (supported, incl. sharded weights with ZeRO-3), or set sam_rho=0."
            )
        optim_name = str(getattr(args.optim, "value", args.optim))
        if args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO) or "layerwise" in optim_name:
            raise ValueError(
                f"optim={optim_name} updates the weights inside backward(); under SAM that update would be made at "
                "the perturbed weights and then overwritten by the restore. Use a regular optimizer (e.g. adamw_torch) "
                "or sam_rho=0."
            )
        optimizer = self.optimizer if self.optimizer is not None else None
        if optimizer is not None and hasattr(optimizer, "first_step") and hasattr(optimizer, "second_step"):
            raise ValueError(
                f"The optimizer {type(optimizer).__name__} looks like a closure-style SAM optimizer (first_step/"
                "second_step). Trainer calls optimizer.step() without a closure, and SAFTTrainer already does the SAM "
                "two-pass update: pass its base optimizer (e.g. torch.optim.AdamW) instead."
            )
        ckpt_kwargs = dict(
            getattr(args, "activation_checkpointing_kwargs", None)
            or getattr(args, "gradient_checkpointing_kwargs", None)
            or {}
        )
        checkpointing = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)
        if checkpointing and ckpt_kwargs.get("use_reentrant", False):
            raise ValueError(
                "SAM needs torch.autograd.grad, which reentrant gradient checkpointing does not support. Set "
                "activation_checkpointing_kwargs={'use_reentrant': False} (the default) or turn checkpointing off."
            )
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and (
            getattr(parallelism, "cp_enabled", False)
            or getattr(parallelism, "sp_enabled", False)
            or getattr(parallelism, "tp_enabled", False)
        ):
            raise NotImplementedError(
                "SAM/ASAM in SAFTTrainer supports data parallelism only (DDP, DeepSpeed ZeRO); context, sequence "
                "or tensor parallelism would need the perturbation norm reduced over the model-parallel group. "
                "Set sam_rho=0 or drop the parallelism_config."
            )
        if self._zero_stage == 3 and not args.sam_sync_perturbation:
            logger.info(
                "DeepSpeed ZeRO-3 shards the parameters, so all ranks must share one perturbation: the first-pass "
                "gradient is all-reduced (as with sam_sync_perturbation=True)."
            )

    # ------------------------------------------------------------------ the step
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if not self.sam_enabled:
            return super().training_step(model, inputs, num_items_in_batch)

        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)

        first_pass_model = self._sam_first_pass_model(model)
        names, params = self._sam_trainable(first_pass_model)
        loss, grads = self._sam_first_pass(model, first_pass_model, params, inputs, num_items_in_batch)

        kept = [(n, p, g) for n, p, g in zip(names, params, grads) if g is not None]
        names = [n for n, _, _ in kept]
        params = [p for _, p, _ in kept]
        grads = [g for _, _, g in kept]
        del kept

        zero3 = self._zero_stage == 3
        bn_snapshot = _snapshot_batchnorm(first_pass_model)  # stats after the first pass, at w
        engine = self._deepspeed_engine()
        with self._sam_gathered(params, zero3):
            result = sharpness.perturbation_(
                params,
                grads,
                rho=self.args.sam_rho,
                adaptive=self.args.sam_adaptive,
                eta=self.args.sam_eta,
                scaled=sharpness.adaptive_scale_mask(names, self.args.sam_scope),
                all_finite=self._sam_all_ranks_agree,
            )
            backups = sharpness.perturb_(params, grads, release=True) if result.applied else None
        del grads
        try:
            if not result.applied:
                self._sam_report_skip(result)
            with _defer_engine_step(engine):
                perturbed_loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if backups is not None:
                with self._sam_gathered(params, zero3):
                    sharpness.restore_(params, backups)
            _restore_batchnorm(bn_snapshot)
        if engine is not None and self.accelerator.sync_gradients:
            engine.step()

        self._sam_log.add(perturbed_loss, result)
        return self._normalize_like_parent(loss.detach(), num_items_in_batch)

    def _sam_report_skip(self, result: sharpness.PerturbationResult) -> None:
        """Warn on the first skipped perturbation; later ones (fp16 overflows are common early) at info level."""
        log = logger.warning if self._sam_log.skipped_total == 0 else logger.info
        log(
            "SAM: non-finite first-pass gradient norm (%s) at step %d; taking a plain step for this micro-batch "
            "(skips are counted in the logged `sam_skipped_perturbations`).",
            float(result.grad_norm),
            self.state.global_step,
        )

    def _sam_first_pass_model(self, model: nn.Module) -> nn.Module:
        """The module the first pass runs through: the DeepSpeed engine's module, else `model` itself."""
        if self.is_deepspeed_enabled:
            return getattr(model, "module", model)
        return model

    @staticmethod
    def _sam_trainable(module: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def _sam_first_pass(self, model, first_pass_model, params, inputs, num_items_in_batch):
        """Loss and gradient at w, without touching `.grad` or any distributed reduction."""
        no_sync = (
            model.no_sync
            if isinstance(model, nn.parallel.DistributedDataParallel)
            else contextlib.nullcontext
        )
        with no_sync():
            with self.compute_loss_context_manager():
                loss = self.compute_loss(first_pass_model, dict(inputs), num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            try:
                grads = torch.autograd.grad(self._scale_for_grad(loss), params, allow_unused=True)
            except RuntimeError as err:
                if "heckpoint" in str(err):
                    raise RuntimeError(
                        "SAM's first pass uses torch.autograd.grad, which reentrant gradient checkpointing does not "
                        "support. Enable checkpointing with use_reentrant=False "
                        "(activation_checkpointing_kwargs={'use_reentrant': False})."
                    ) from err
                raise
        if self.is_deepspeed_enabled and self._zero_stage == 3:
            self._deepspeed_engine().empty_partition_cache()
        grads = list(grads)
        if self._sam_sync_gradients():
            grads = self._all_reduce_mean(params, grads)
        return loss, grads

    def _scale_for_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """Scale the first-pass loss like the second one (fp16), so small gradients do not underflow.

        e is invariant to this scale (up to the 1e-12 in the denominator); the scaled gradient is never
        unscaled (the Trainer unscales the real `.grad` once, before clipping).
        """
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return scaler.scale(loss)
        engine = self._deepspeed_engine()
        if engine is not None and engine.fp16_enabled():
            scale = getattr(engine.optimizer, "loss_scale", None) or getattr(engine.optimizer, "cur_scale", 1.0)
            return loss * float(scale)
        return loss

    def _sam_sync_gradients(self) -> bool:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return distributed and (self.args.sam_sync_perturbation or self._zero_stage == 3)

    @staticmethod
    def _all_reduce_mean(params, grads) -> list[torch.Tensor]:
        """Mean of the first-pass gradient over ranks (None -> zeros so every rank sends the same list)."""
        filled = []
        for p, g in zip(params, grads):
            if g is None:
                shape = getattr(p, "ds_shape", p.shape)
                g = torch.zeros(shape, dtype=p.dtype, device=p.device)
            filled.append(g)
        for bucket in sharpness._chunks(range(len(filled)), filled, 1 << 24):
            tensors = [filled[i] for i in bucket]
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            flat.div_(dist.get_world_size())
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        return filled

    @staticmethod
    def _sam_all_ranks_agree(local_finite: bool) -> bool:
        """All ranks skip the perturbation together if any rank saw a non-finite gradient norm."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return local_finite
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flag = torch.tensor([1 if local_finite else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _sam_gathered(self, params, zero3: bool):
        """Under ZeRO-3, make the full parameters visible (rank 0's edits are broadcast on exit)."""
        if not zero3 or not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def _deepspeed_engine(self):
        if not self.is_deepspeed_enabled:
            return None
        wrapper = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        return wrapper.engine if wrapper is not None else None

    def _normalize_like_parent(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Scale the first-pass loss exactly as `Trainer.training_step` scales the loss it returns."""
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if not scaled_for_ga:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    # ------------------------------------------------------------------ reporting
    def floating_point_ops(self, inputs: dict[str, torch.Tensor | Any]) -> int:
        """SAM runs two forward/backward passes per micro-batch: count both."""
        flos = super().floating_point_ops(inputs)
        return 2 * flos if self.sam_enabled else flos

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.sam_enabled and "loss" in logs:
            logs.update(self._sam_log_values())
        super().log(logs, *args, **kwargs)

    def _sam_log_values(self) -> dict[str, float]:
        acc = self._sam_log
        steps = max(self.state.global_step - self._sam_last_logged_step, 1)
        local = torch.tensor(
            [acc.perturbed_loss, acc.perturbation_norm, acc.grad_norm, acc.perturbed_micro_batches],
            dtype=torch.float64,
            device=self.args.device,
        )
        totals = nested_gather(local, self.args.parallel_mode).reshape(-1, 4).mean(dim=0)
        perturbed = max(float(totals[3]), 1e-12)
        values = {
            "sam_perturbed_loss": float(totals[0]) / steps,
            "sam_perturbation_norm": float(totals[1]) / perturbed if totals[3] > 0 else 0.0,
            "sam_grad_norm": float(totals[2]) / perturbed if totals[3] > 0 else 0.0,
            "sam_skipped_perturbations": float(acc.skipped_total),
        }
        acc.reset()
        self._sam_last_logged_step = self.state.global_step
        return values

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """The Trainer's model card, tagged `saft` (plus `sam`/`asam`) and citing the SAFT paper."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        extra = ["saft"]
        if self.sam_enabled:
            extra.append("asam" if self.args.sam_adaptive else "sam")
        tags += [t for t in extra if t not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        import os

        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as handle:
            card = handle.read()
        if _CITATION_MARKER not in card:
            write_text_atomic(path, card.rstrip("\n") + "\n" + SAFT_CITATION)


class SAFTTrainer(SAFTTrainerMixin, Trainer):
    """`transformers.Trainer` with SAM / ASAM (configure with `SAFTTrainingArguments`)."""


class SAFTSeq2SeqTrainer(SAFTTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with SAM / ASAM (configure with `SAFTSeq2SeqTrainingArguments`)."""

    _args_class = SAFTSeq2SeqTrainingArguments


# ---------------------------------------------------------------------- helpers
def _snapshot_batchnorm(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of BatchNorm running statistics, so the second pass does not update them a second time."""
    snapshot = []
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats and sub.training:
            for buffer in (sub.running_mean, sub.running_var, sub.num_batches_tracked):
                if buffer is not None:
                    snapshot.append((buffer, buffer.detach().clone()))
    return snapshot


@torch.no_grad()
def _restore_batchnorm(snapshot) -> None:
    for buffer, saved in snapshot:
        buffer.copy_(saved)


@contextlib.contextmanager
def _defer_engine_step(engine):
    """Make accelerate's in-backward `engine.step()` a no-op; the caller steps after restoring w."""
    if engine is None:
        yield
        return
    engine.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del engine.step
