"""What several variants share: the SAM/ASAM perturbation they build on, its knob check, gradient alignment.

Not a variant (the leading underscore keeps the package from importing it as one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import sharpness
from .base import Perturbation
from .sam import ASAM

BASE_VARIANTS = ("sam", "asam")


@dataclass
class BasePerturbationArguments:
    sam_base_variant: str = field(
        default="sam",
        metadata={
            "help": "The perturbation that 'looksam', 'gsam' and 'esam' build on: 'sam' (e = rho g / ||g||, as in "
            "their papers) or 'asam' (e = rho T^2 g / ||T g||, T = |w| + sam_eta on the sam_scope tensors).",
            "choices": list(BASE_VARIANTS),
        },
    )


class BuildsOnBasePerturbation:
    """Mixin of the variants that perturb with SAM or ASAM (sam_base_variant): their papers' radius is
    SAM's 0.05 (Foret et al.; LookSAM, ESAM and GSAM use 0.04-0.1 in their CNN settings), ASAM's 0.5 with
    sam_base_variant='asam' (the ball T = |w| is about ten times larger)."""

    paper_rho = 0.05

    @classmethod
    def default_rho(cls, args=None) -> float:
        return ASAM.paper_rho if getattr(args, "sam_base_variant", "sam") == "asam" else cls.paper_rho


def check_base_variant(args, variant: str) -> None:
    base = getattr(args, "sam_base_variant", "sam")
    if base not in BASE_VARIANTS:
        raise ValueError(f"sam_base_variant must be one of {BASE_VARIANTS}, got {base!r}.")
    if base == "sam" and args.sam_eta > 0:
        raise ValueError(
            f"sam_eta={args.sam_eta} only affects the ASAM perturbation; with sam_variant={variant!r} and "
            "sam_base_variant='sam' set sam_eta=0 (or sam_base_variant='asam')."
        )


def base_perturbation(args, step, grads, rho: float | None = None) -> Perturbation:
    """SAM or ASAM (per sam_base_variant) from `grads`, in place, radius `rho` (default sam_rho)."""
    adaptive = getattr(args, "sam_base_variant", "sam") == "asam"
    result = sharpness.perturbation_(
        step.params,
        grads,
        rho=args.sam_rho if rho is None else rho,
        adaptive=adaptive,
        eta=args.sam_eta,
        scaled=sharpness.adaptive_scale_mask(step.names, args.sam_scope) if adaptive else None,
        all_finite=step.all_ranks_agree,
    )
    return Perturbation.from_result(result, grads)


class FirstPassSum:
    """The sum over an accumulation window of the first-pass gradients, aligned with `step.trainable`.

    Kept per rank; `mean_over_ranks` makes it the global one (a no-op when the first pass was synced)."""

    def __init__(self):
        self.sums: list[torch.Tensor | None] | None = None

    def add(self, step, grads, scale: float = 1.0) -> None:
        """Add scale * grads (aligned with step.params); copies, so `grads` stays the caller's scratch."""
        if self.sums is None:
            self.sums = [None] * len(step.trainable)
        position = {id(p): i for i, p in enumerate(step.trainable)}
        for p, g in zip(step.params, grads):
            i = position[id(p)]
            if self.sums[i] is None:
                self.sums[i] = g.detach() * scale  # a new tensor (the copy)
            else:
                self.sums[i].add_(g, alpha=scale)

    def take(self, step) -> list[torch.Tensor | None]:
        """The window's sum, all-reduced (mean over ranks) unless already synced; resets the sum."""
        sums, self.sums = self.sums, None
        if sums is None:
            sums = [None] * len(step.trainable)
        if step.world_size > 1 and not step.synced_first_pass:
            # every rank sends every tensor (zeros where it had no gradient) so the collective lines up
            filled = [s if s is not None else _zeros_like_full(p) for s, p in zip(sums, step.trainable)]
            step.all_reduce_mean(filled)
            sums = [f if s is not None or bool(f.any()) else None for s, f in zip(sums, filled)]
        return sums


def _zeros_like_full(p):
    """Zeros of the full shape of `p` (ZeRO-3 keeps only a partition in `p` itself)."""
    return torch.zeros(tuple(getattr(p, "ds_shape", p.shape)), dtype=p.dtype, device=p.device)


def present(*lists):
    """Indices where every list has a tensor (gradients that are None are left alone)."""
    return [i for i in range(len(lists[0])) if all(lst[i] is not None for lst in lists)]
