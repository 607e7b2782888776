"""`SAFTTrainer` / `SAFTSeq2SeqTrainer`: SAM / ASAM inside the Hugging Face Trainer.

The two-pass update happens per micro-batch inside `training_step` (see
the README's trainer section for why there and what is supported):

1. first pass at w: loss + `torch.autograd.grad` (never touches `.grad`, DDP buckets or
   DeepSpeed partitions); under DDP inside `no_sync`, under DeepSpeed through `engine.module`,
   under FSDP2 an ordinary backward whose FSDP reduce-scatter lands in emptied `.grad` slots
   (each rank's shard of the mean gradient; the real gradients stashed and put back, saft_hf/fsdp2.py);
2. e = the perturbation of the `sam_variant` strategy (saft_hf.sam_variants; the maths is in
   saft_hf.sharpness), computed in place in the fresh gradients; back up the perturbed tensors and
   add e in place;
3. second pass at w + e through the parent's `training_step` (loss scaling for gradient
   accumulation, GradScaler, DDP sync, DeepSpeed backward);
4. restore w from the backups in a `finally:`; under DeepSpeed the engine step that accelerate
   would run inside `backward` is deferred until after the restore.

The strategy may skip the first pass on a micro-batch and hooks in after each second pass and
before each optimizer step (see saft_hf/sam_variants/base.py for the call order and contract).
The SAM logic is written once, in `SAFTTrainerMixin`; no variant name appears in this file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.training_args import OptimizerNames

from . import fsdp2, sam_variants, sharpness
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
    """Running sums since the last log: perturbed loss, ||e||, ||T g||, optimizer steps, skips."""

    def __init__(self):
        self.reset()
        self.skipped_total = 0

    def reset(self):
        self.perturbed_loss = 0.0
        self.perturbation_norm = 0.0
        self.grad_norm = 0.0
        self.micro_batches = 0
        self.perturbed_micro_batches = 0
        # counted here, not taken from global_step: after resume_from_checkpoint the sums start empty
        self.optimizer_steps = 0

    def add(self, perturbed_loss: torch.Tensor, perturbation: sam_variants.Perturbation | None, last: bool):
        """`perturbation` None: a plain micro-batch chosen by the variant (not a skip)."""
        self.perturbed_loss += float(perturbed_loss)
        self.micro_batches += 1
        self.optimizer_steps += int(last)
        if perturbation is None:
            return
        if perturbation.applied:
            self.perturbation_norm += float(perturbation.norm) if perturbation.norm is not None else 0.0
            self.grad_norm += float(perturbation.grad_norm) if perturbation.grad_norm is not None else 0.0
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
        self._sam_micro_batch = 0  # index within the current accumulation window
        self.sam_strategy: sam_variants.SAMVariant = sam_variants.get_sam_variant(args.sam_variant)(args)
        if self.sam_enabled:
            self._check_sam_support()
            self._warn_if_rho_off_scale()

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
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                f"SAM (sam_rho={args.sam_rho}) needs trainable parameters, but every parameter of "
                f"{type(self.model).__name__} has requires_grad=False. Unfreeze the parameters to train "
                "(or apply LoRA / another adapter), or set sam_rho=0."
            )
        if self.is_fsdp_enabled and self._fsdp_version != 2:
            raise NotImplementedError(
                f"SAM/ASAM with FSDP1 (fsdp_version={self._fsdp_version}) is not supported in SAFTTrainer: FSDP1 "
                "flattens the parameters into FlatParameters and reduces gradients in its own hooks, which the "
                "first pass and the in-place perturbation/restore would need separate code for. Use FSDP2 "
                "(fsdp_config={'version': 2}, or fsdp_version: 2 in the accelerate config; supported), DDP or "
                "DeepSpeed ZeRO-1/2/3, or set sam_rho=0."
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
        reason = self.sam_strategy.unsupported_reason(self._sam_training_setup())
        if reason:
            raise NotImplementedError(f"sam_variant={args.sam_variant!r} cannot run in this set-up: {reason}")
        if self._zero_stage == 3 and not args.sam_sync_perturbation:
            logger.info(
                "DeepSpeed ZeRO-3 shards the parameters, so all ranks must share one perturbation: the first-pass "
                "gradient is all-reduced (as with sam_sync_perturbation=True)."
            )
        if self._fsdp2_enabled and not args.sam_sync_perturbation:
            logger.info(
                "FSDP2 shards the parameters, so all ranks must share one perturbation: the first-pass gradient is "
                "reduce-scattered (mean over ranks) and each rank perturbs its shard (as with "
                "sam_sync_perturbation=True)."
            )

    def _warn_if_rho_off_scale(self) -> None:
        """sam_rho defaults to ASAM's 0.5; the variants that perturb with plain SAM use ~0.05 in their papers and
        do not train well at ten times that (measured in the demo: below zero-shot accuracy). Warn, do not change it."""
        paper = type(self.sam_strategy).default_rho(self.args)
        if paper is not None and self.args.sam_rho >= 5 * paper:
            logger.warning(
                f"sam_rho={self.args.sam_rho:g} is {self.args.sam_rho / paper:.0f}x the radius sam_variant="
                f"{self.args.sam_variant!r} uses in its paper ({paper:g}); sam_rho's default 0.5 is ASAM's scale. "
                f"Set sam_rho={paper:g} unless the larger radius is intended."
            )

    @property
    def _fsdp_version(self) -> int:
        if not self.is_fsdp_enabled:
            return 0
        return int(getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) or 1)

    @property
    def _fsdp2_enabled(self) -> bool:
        return self._fsdp_version == 2

    def _sam_training_setup(self) -> sam_variants.TrainingSetup:
        args = self.args
        distributed = "deepspeed" if self.is_deepspeed_enabled else ("ddp" if args.world_size > 1 else "no")
        if self._fsdp2_enabled:
            distributed = "fsdp2"
        model = self.model
        return sam_variants.TrainingSetup(
            zero_stage=self._zero_stage,
            world_size=args.world_size,
            distributed=distributed,
            peft=hasattr(model, "peft_config"),
            mixed_precision="fp16" if args.fp16 else ("bf16" if args.bf16 else "no"),
            gradient_accumulation_steps=args.gradient_accumulation_steps,
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

        if not self._sam_step_due():
            return self._sam_plain_micro_batch(model, inputs, num_items_in_batch)

        inputs = self._prepare_inputs(inputs)

        strategy = self.sam_strategy
        if self._fsdp2_enabled:
            fsdp2.reshard(model)  # named_parameters() must be the sharded DTensors
        first_pass_model = self._sam_first_pass_model(model)
        step = self._sam_step(first_pass_model, inputs)
        step.accumulation_factor = float(self._normalize_like_parent(torch.ones(()), num_items_in_batch))
        loss = grads = bn_snapshot = None
        if strategy.takes_first_pass(step):
            # train mode for the first pass (the second pass is Trainer.training_step, which sets it itself:
            # a step without a first pass, e.g. RWP's or LookSAM's reuse steps, skips this walk of the modules)
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            loss, grads, step.first_pass_outputs = self._sam_first_pass(
                model, first_pass_model, step.params, inputs, num_items_in_batch, strategy.needs_first_pass_outputs
            )
            kept = [(n, p, g) for n, p, g in zip(step.names, step.params, grads) if g is not None]
            step.names = [n for n, _, _ in kept]
            step.params = [p for _, p, _ in kept]
            grads = [g for _, _, g in kept]
            del kept
            step.first_pass_loss = loss.detach()
            bn_snapshot = _snapshot_batchnorm(first_pass_model)  # stats after the first pass, at w

        params = step.params
        zero3 = self._zero_stage == 3
        engine = self._deepspeed_engine()
        backups = None
        targets = params  # the tensors e is added to (a variant may name others, see Perturbation.params)
        with self._sam_gathered(params, zero3), torch.no_grad():
            perturbation = strategy.perturbation(step, grads)
            if perturbation is not None and perturbation.applied:
                if perturbation.params is not None:
                    if zero3:
                        raise NotImplementedError(
                            f"sam_variant={self.args.sam_variant!r} perturbs tensors other than the trained ones, "
                            "which DeepSpeed ZeRO-3 does not gather here; use ZeRO-1/2 or DDP."
                        )
                    targets = list(perturbation.params)
                backups = sharpness.perturb_(targets, perturbation.tensors, release=True)
                perturbation.tensors = None
        del grads
        try:
            if perturbation is not None and not perturbation.applied:
                self._sam_report_skip(perturbation)
            second_inputs, second_items = inputs, num_items_in_batch
            if backups is not None:
                with torch.no_grad():
                    second_inputs = strategy.second_pass_inputs(step)
                if second_inputs is not inputs:  # a subset: its mean loss, not Trainer's token-count scaling
                    step.second_pass_is_subset, second_items = True, None
            with _defer_engine_step(engine):
                perturbed_loss = super().training_step(model, second_inputs, second_items)
        finally:
            if backups is not None:
                with self._sam_gathered(targets, zero3):
                    sharpness.restore_(targets, backups)
                if self._fsdp2_enabled:
                    fsdp2.reshard(model)  # drop any unsharded copy that still holds w + e
            if bn_snapshot is not None:
                _restore_batchnorm(bn_snapshot)
        step.second_pass_loss = perturbed_loss.detach()
        strategy.after_second_pass(step)
        if step.is_last_micro_batch:
            strategy.before_optimizer_step(step)
            self._sam_micro_batch = 0
        else:
            self._sam_micro_batch += 1
        if engine is not None and self.accelerator.sync_gradients:
            engine.step()

        self._sam_log.add(perturbed_loss, perturbation, step.is_last_micro_batch)
        if loss is None:  # no first pass: the only loss is the one the parent returned
            return perturbed_loss
        return self._normalize_like_parent(loss.detach(), num_items_in_batch)

    def _sam_step(self, first_pass_model: nn.Module, inputs) -> sam_variants.SAMStep:
        """The context the strategy's hooks see for this micro-batch."""
        names, params = self._sam_trainable(first_pass_model)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return sam_variants.SAMStep(
            args=self.args,
            global_step=self.state.global_step,
            micro_batch=self._sam_micro_batch,
            is_last_micro_batch=bool(self.accelerator.sync_gradients),
            names=names,
            params=params,
            trainable=list(params),
            world_size=world,
            rank=dist.get_rank() if world > 1 else 0,
            zero_stage=self._zero_stage,
            synced_first_pass=self._sam_sync_gradients(),
            inputs=inputs,
            model=first_pass_model,
            _all_ranks_agree=self._sam_all_ranks_agree,
            _all_reduce_mean=self._all_reduce_mean,
            _deepspeed=self.is_deepspeed_enabled,
        )

    def _sam_step_due(self) -> bool:
        """sam_interval=k: the sharpness-aware step on optimizer steps 0, k, 2k, ...; plain steps in between."""
        return self.state.global_step % self.args.sam_interval == 0

    def _sam_plain_micro_batch(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """A micro-batch of a plain optimizer step between SAM steps: exactly Trainer's, the variant is not called."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        last = bool(self.accelerator.sync_gradients)
        self._sam_micro_batch = 0 if last else self._sam_micro_batch + 1
        self._sam_log.add(loss, None, last)
        return loss

    def _sam_report_skip(self, result: sam_variants.Perturbation) -> None:
        """Warn on the first skipped perturbation; later ones (fp16 overflows are common early) at info level."""
        log = logger.warning if self._sam_log.skipped_total == 0 else logger.info
        log(
            "SAM: non-finite first-pass gradient norm (%s) at step %d; taking a plain step for this micro-batch "
            "(skips are counted in the logged `sam_skipped_perturbations`).",
            float(result.grad_norm) if result.grad_norm is not None else float("nan"),
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

    def _sam_first_pass(self, model, first_pass_model, params, inputs, num_items_in_batch, keep_outputs=False):
        """Loss, gradient (and the model outputs if `keep_outputs`) at w, without touching `.grad` or any
        distributed reduction."""
        if not params:
            raise ValueError(
                "SAM's first pass found no trainable parameter (all have requires_grad=False): unfreeze the "
                "parameters to train, or set sam_rho=0."
            )
        # FSDP2: FSDP's own reduce-scatter into emptied .grad slots, real gradients stashed (saft_hf/fsdp2.py)
        fsdp_pass = fsdp2.FirstPass(model, params) if self._fsdp2_enabled else None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            isolation = model.no_sync()
        elif fsdp_pass is not None:
            isolation = fsdp_pass
        else:
            isolation = contextlib.nullcontext()
        with isolation:
            outputs = None
            with self.compute_loss_context_manager():
                if keep_outputs:
                    loss, outputs = self.compute_loss(
                        first_pass_model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
                    )
                else:
                    loss = self.compute_loss(first_pass_model, dict(inputs), num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            try:
                if fsdp_pass is not None:
                    grads = fsdp_pass.backward(self._scale_for_grad(loss))
                else:
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
        if self._fsdp2_enabled:  # already this rank's shard of the mean gradient (FSDP's reduce-scatter)
            fsdp2.reshard(model)
        elif self._sam_sync_gradients():
            grads = self._all_reduce_mean(params, grads)
        return loss, grads, outputs

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
        return distributed and (self.args.sam_sync_perturbation or self._zero_stage == 3 or self._fsdp2_enabled)

    @staticmethod
    def _all_reduce_mean(params, grads) -> list[torch.Tensor]:
        """Mean of the first-pass gradient over ranks (None -> zeros so every rank sends the same list)."""
        if any(sharpness.is_sharded(g) for g in grads if g is not None):  # FSDP2 shards: see fsdp2.py
            return fsdp2.mean_over_replicas_(grads)
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

    # ------------------------------------------------------------------ variant state in checkpoints
    def _sam_state_path(self, checkpoint_dir: str) -> str:
        return os.path.join(checkpoint_dir, f"sam_variant_state_rank{self.args.process_index}.pt")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        # FSDP2: DTensors saved as this rank's shards (the variant re-wraps them on first use after loading)
        state = sharpness.local_state(self.sam_strategy.state_dict()) if self.sam_enabled else {}
        if state:  # per rank: a variant's state (a kept direction, a Fisher estimate) may be rank-local
            os.makedirs(output_dir, exist_ok=True)
            torch.save({"sam_variant": self.args.sam_variant, "state": state}, self._sam_state_path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.sam_enabled:
            return
        path = self._sam_state_path(checkpoint)
        if not os.path.isfile(path):
            return
        device = self.args.device  # multi-process CPU launches report "cpu:<rank>", which torch.load cannot map
        saved = torch.load(path, map_location="cpu" if device.type == "cpu" else device, weights_only=True)
        if saved.get("sam_variant") != self.args.sam_variant:
            raise ValueError(
                f"{path} holds the state of sam_variant={saved.get('sam_variant')!r}, but this run uses "
                f"sam_variant={self.args.sam_variant!r}: resume with the same variant or start a new run."
            )
        self.sam_strategy.load_state_dict(saved["state"])

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
        steps = max(acc.optimizer_steps, 1)
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
        return values

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """The Trainer's model card, tagged `saft` (plus the variant's tags, e.g. `asam`) and citing the SAFT paper."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        extra = ["saft"]
        if self.sam_enabled:
            extra.extend(self.sam_strategy.model_card_tags)
        tags += [t for t in extra if t not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
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
