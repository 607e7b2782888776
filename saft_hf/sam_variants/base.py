"""The SAM-variant seam: a strategy object that `SAFTTrainer.training_step` calls, and its step context.

A variant (`SAMVariant` subclass) decides, per micro-batch, whether to take a first pass at w,
what perturbation e to apply from the first-pass gradient, and may adjust the accumulated gradient
right before the optimizer step. The trainer owns everything launch-specific (DDP `no_sync`,
DeepSpeed engine step, ZeRO-3 gathering, GradScaler, BatchNorm stats, backup/restore of w); a variant
only sees tensors and the `SAMStep` helpers, so one variant runs unchanged under every launch mode.

Call order inside `training_step`, per micro-batch (only when `sam_rho > 0`):

    takes_first_pass(step)            -> bool
    [first pass: loss + grads at w, via torch.autograd.grad; never touches .grad]
    perturbation(step, grads)         -> Perturbation | None   (ZeRO-3: inside the gather)
    [w += e]
    second_pass_inputs(step)          -> the inputs of the second pass (default: the micro-batch)
    [second pass at w + e = the parent's training_step (backward into .grad); w restored]
    after_second_pass(step)           (every micro-batch, w restored)
    before_optimizer_step(step)       (last micro-batch of the accumulation window only, after its
                                       backward, before clipping and the optimizer / DeepSpeed step)

Everything here is a foundation module: it imports torch and `saft_hf.sharpness` only (no Trainer,
no `saft_hf.args`), so `saft_hf.args` can collect the variants' argument fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from .. import sharpness


@dataclass
class Perturbation:
    """The perturbation e for one micro-batch, as returned by `SAMVariant.perturbation`.

    `tensors` is aligned with `step.params` (it may be the `grads` list written in place); the trainer
    adds it to the weights and releases it chunk by chunk. `applied=False` means the variant could not
    perturb (e.g. a non-finite gradient norm, agreed on by all ranks): the micro-batch becomes a plain
    step and is counted in `sam_skipped_perturbations`. Returning None from `perturbation` instead
    means "a plain micro-batch by design" (not counted as a skip).
    """

    applied: bool
    tensors: list[torch.Tensor] | None = None
    #: the tensors e is added to, aligned with `tensors`; None means `step.params`. Lets a variant perturb
    #: tensors that are not trained (Flat-LoRA perturbs the frozen base weight W0 of a LoRA layer, so that
    #: W0 + e + BA is the full weight perturbed). They are backed up and restored like `step.params`.
    params: list[torch.Tensor] | None = None
    grad_norm: torch.Tensor | float | None = None  # logged (mean) as sam_grad_norm
    norm: torch.Tensor | float | None = None  # ||e||, logged (mean) as sam_perturbation_norm

    @classmethod
    def from_result(cls, result: sharpness.PerturbationResult, tensors: list[torch.Tensor]) -> "Perturbation":
        return cls(
            applied=result.applied,
            tensors=tensors if result.applied else None,
            grad_norm=result.grad_norm,
            norm=result.perturbation_norm,
        )


@dataclass
class TrainingSetup:
    """What a variant may refuse (see `SAMVariant.unsupported_reason`); filled by the trainer at construction."""

    zero_stage: int = 0  # DeepSpeed ZeRO stage, 0 without DeepSpeed
    world_size: int = 1
    distributed: str = "no"  # "no", "ddp", "deepspeed" or "fsdp2" (FSDP1 is refused before variants are asked)
    peft: bool = False  # the model is a PEFT (LoRA, ...) model
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    gradient_accumulation_steps: int = 1


@dataclass
class SAMStep:
    """Per-micro-batch context handed to every hook. Read the fields; call the helpers for collectives.

    - `names`/`params`: the tensors the variant works on in this micro-batch: trainable parameters
      with a first-pass gradient (unused ones dropped), or every trainable one when no first pass ran.
      Under ZeRO-3 they are full tensors only inside `perturbation` (the trainer gathers them there).
      Under FSDP2 they are DTensors (each rank holds a shard), and so are the first-pass `grads` and
      `gradients()`: see "FSDP2" in docs/extending-sam.md for what a variant must do there.
    - `trainable`: every trainable parameter (for `gradients()` / `set_gradients()`).
    - `first_pass_loss` / `second_pass_loss`: set once that pass has run (detached).
    - `synced_first_pass`: the first-pass gradient was all-reduced (mean) across ranks before it reached
      `perturbation` (sam_sync_perturbation=True, ZeRO-3 or FSDP2); otherwise it is this rank's own.
    """

    args: Any
    global_step: int  # optimizer steps completed before this micro-batch
    micro_batch: int  # index within the accumulation window (0-based)
    is_last_micro_batch: bool  # this micro-batch ends the window: the optimizer steps after it
    names: list[str]
    params: list[torch.nn.Parameter]
    trainable: list[torch.nn.Parameter]
    world_size: int = 1
    rank: int = 0
    zero_stage: int = 0
    synced_first_pass: bool = False
    #: multiply a first-pass gradient by this to put it on the scale of the accumulated `.grad`
    #: (1 / gradient_accumulation_steps, or 1 when Trainer normalises the loss by num_items_in_batch)
    accumulation_factor: float = 1.0
    inputs: Any = None
    first_pass_loss: torch.Tensor | None = None
    second_pass_loss: torch.Tensor | None = None
    #: the model's outputs of the first pass (only when the variant sets `needs_first_pass_outputs`)
    first_pass_outputs: Any = None
    #: the unwrapped module the first pass runs through (no DDP wrapper; the DeepSpeed engine's module)
    model: Any = None
    #: True when the second pass must not use Trainer's `num_items_in_batch` normalisation (set by the
    #: trainer when `second_pass_inputs` returns a subset: the loss is then the subset's mean)
    second_pass_is_subset: bool = False
    _all_ranks_agree: Callable[[bool], bool] = field(default=lambda flag: flag, repr=False)
    _all_reduce_mean: Callable[[list, list], list] | None = field(default=None, repr=False)
    _deepspeed: bool = field(default=False, repr=False)

    # ---------------------------------------------------------------- collectives
    def all_ranks_agree(self, local_ok: bool) -> bool:
        """True on every rank iff `local_ok` is True on every rank (one all-reduce; local without distribution).

        Pass it as `all_finite=` to `sharpness.perturbation_` so all ranks skip together."""
        return self._all_ranks_agree(local_ok)

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Mean over ranks, in place (a collective: every rank must call it with the same shapes).

        DTensors (FSDP2 shards) are averaged only over the mesh dims they are replicated on (a no-op
        for plain FSDP): their shards are pieces of one tensor, already synced, not copies to average."""
        tensors = list(tensors)
        if self._all_reduce_mean is None or self.world_size <= 1:
            return tensors
        return self._all_reduce_mean(tensors, tensors)

    # ---------------------------------------------------------------- the accumulated gradient
    def gradients(self) -> list[torch.Tensor | None]:
        """The accumulated gradient of every `trainable` parameter (None where it has none).

        Only meaningful in `before_optimizer_step`: it is then the full-window gradient, loss-scaled for
        accumulation like `.grad`, already averaged over ranks (DDP all-reduce / DeepSpeed reduction),
        and not yet clipped. Under DeepSpeed these are `deepspeed.utils.safe_get_full_grad` results
        (fp32 copies assembled from the partitions: a collective under ZeRO-1/2/3, so call it on every
        rank); write changes back with `set_gradients`.
        """
        if self._deepspeed:
            from deepspeed.utils import safe_get_full_grad

            return [safe_get_full_grad(p) for p in self.trainable]
        return [p.grad for p in self.trainable]

    def set_gradients(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Write the accumulated gradient back (entries that are None are left alone).

        DDP replicates the optimizer step on every rank: the values must be identical on all ranks
        (derive them from `gradients()` and from synced quantities only, or all-reduce them first).
        """
        if len(grads) != len(self.trainable):
            raise ValueError(f"set_gradients needs one entry per trainable tensor ({len(self.trainable)}), got {len(grads)}.")
        if self._deepspeed:
            from deepspeed.utils import safe_set_full_grad

            for p, g in zip(self.trainable, grads):
                if g is not None:
                    safe_set_full_grad(p, _pad_for_zero3(p, g))
            return
        with torch.no_grad():
            for p, g in zip(self.trainable, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach().to(p.dtype).clone()
                elif g is not p.grad:
                    p.grad.copy_(g)


def _pad_for_zero3(param: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    """ZeRO-3's set_fp32_grad_for_param cuts this rank's slice out of the flat value without the padding
    of the last partition (deepspeed 0.19): pad it to partition size x ranks. No-op for other params."""
    if not hasattr(param, "ds_id"):
        return grad
    import torch.distributed as dist

    partition = param.ds_tensor.numel()
    ranks = dist.get_world_size(group=getattr(param, "ds_process_group", None))
    flat = grad.reshape(-1)
    missing = partition * ranks - flat.numel()
    return torch.cat([flat, flat.new_zeros(missing)]) if missing > 0 else flat


class SAMVariant:
    """Base class of a SAM variant (strategy). Subclass, override `perturbation`, register with
    `@register_sam_variant("name")`; see docs/extending-sam.md.

    One instance per trainer, built from the training arguments. Instance attributes persist across
    micro-batches and optimizer steps (a stored direction, a running Fisher estimate); anything that must
    survive a checkpoint goes through `state_dict` / `load_state_dict` (saved per rank with each checkpoint).
    """

    #: registry name (`sam_variant` value); set by `register_sam_variant`
    name: ClassVar[str] = ""
    #: model-card tags added next to "saft" when this variant trained the model
    model_card_tags: ClassVar[tuple[str, ...]] = ()
    #: the trainer keeps the first pass's model outputs in `step.first_pass_outputs` (e.g. per-example losses)
    needs_first_pass_outputs: ClassVar[bool] = False
    #: optional dataclass whose `sam_*` fields are added to SAFT(Seq2Seq)TrainingArguments; only for
    #: variants inside the saft_hf.sam_variants package (collected when saft_hf.args is first imported)
    arguments: ClassVar[type | None] = None
    #: the radius `sam_rho` its paper uses (read through `default_rho`): the demo's per-variant default and
    #: the scale the trainer warns about. None: sam_rho is not a radius for this variant (only switches it on).
    paper_rho: ClassVar[float | None] = None

    def __init__(self, args: Any):
        self.args = args

    # ---------------------------------------------------------------- declarations
    @classmethod
    def default_rho(cls, args: Any = None) -> float | None:
        """The paper's `sam_rho` for this variant with these arguments (None: no radius; see `paper_rho`)."""
        return cls.paper_rho

    @classmethod
    def validate_arguments(cls, args: Any) -> None:
        """Raise ValueError naming the bad `sam_*` knob (called from the arguments' __post_init__ and again
        by the trainer). The core knobs' types are already checked when this runs."""

    def unsupported_reason(self, setup: TrainingSetup) -> str | None:
        """A sentence saying why this variant cannot run in `setup` (the trainer refuses it), or None."""
        return None

    # ---------------------------------------------------------------- hooks, in call order
    def takes_first_pass(self, step: SAMStep) -> bool:
        """Whether this micro-batch computes loss and gradient at w first. False: `perturbation` gets
        grads=None and the micro-batch costs one forward/backward (plain step, or a perturbation that
        does not need a gradient such as a random one). Must return the same value on every rank."""
        return True

    def perturbation(self, step: SAMStep, grads: list[torch.Tensor] | None) -> Perturbation | None:
        """e for this micro-batch, aligned with `step.params`, or None for a plain micro-batch.

        `grads` is the first-pass gradient (same order as `step.params`, loss-scaled under fp16, per rank
        or synced: see `step.synced_first_pass`); it is scratch: compute e in it in place (saves memory)
        and clone first what you want to keep. Runs under `torch.no_grad()`; under ZeRO-3 the parameters
        are gathered (full) only during this call. Use `sharpness` for the maths and pass
        `all_finite=step.all_ranks_agree` so every rank skips a non-finite perturbation together.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement perturbation(step, grads).")

    def second_pass_inputs(self, step: SAMStep) -> Any:
        """The inputs of the second pass, called with the weights at w + e (only when a perturbation was applied).

        Default: the micro-batch itself (`step.inputs`). Returning a different object (e.g. ESAM's subset of
        the examples) makes the second pass a mean over those inputs: Trainer's `num_items_in_batch` is not
        used for it. Run forward passes here through `step.model` under `torch.no_grad()`."""
        return step.inputs

    def after_second_pass(self, step: SAMStep) -> None:
        """After each micro-batch's (second) backward, weights already restored to w.

        `.grad` then holds the running sum over the window so far (this rank only until the last
        micro-batch under DDP; under DeepSpeed ZeRO the gradient lives in DeepSpeed's buffers): read
        the per-micro-batch gradient there only if you snapshot `.grad` yourself. Kept first-pass
        gradients belong in instance attributes."""

    def before_optimizer_step(self, step: SAMStep) -> None:
        """Once per optimizer step, after the window's last backward: read/modify the accumulated
        gradient with `step.gradients()` / `step.set_gradients()`. Runs before gradient clipping and
        before the optimizer (or DeepSpeed engine) step, on every rank."""

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """State to save with each checkpoint (this rank's); {} for stateless variants."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (on resume_from_checkpoint)."""
