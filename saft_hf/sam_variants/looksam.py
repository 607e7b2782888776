"""LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization").

Every `sam_looksam_k` optimizer steps (steps 0, k, 2k, ...) a full SAM step: the update is the gradient
g_s at w + e, and LookSAM keeps g_v, the component of g_s orthogonal to the plain gradient g at w
(g_v = g_s - <g_s, g> g / ||g||^2). On the steps in between a single pass computes g, and the update is
g + alpha * (||g|| / ||g_v||) * g_v. The paper's defaults: k = 5, alpha = 0.7. With
sam_base_variant='asam' the refresh steps perturb like ASAM (the paper's adaptive LookSAM).

g and g_s are the accumulated, rank-averaged gradients of the optimizer step (the decomposition is
done once per step, at `before_optimizer_step`), as a single process with the whole batch would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import sharpness
from ..argument_checks import check_nonnegative, check_positive_int
from ._common import BasePerturbationArguments, BuildsOnBasePerturbation
from ._common import FirstPassSum, base_perturbation, check_base_variant, present
from .base import SAMVariant
from .registry import register_sam_variant


@dataclass
class LookSAMArguments(BasePerturbationArguments):
    sam_looksam_k: int = field(
        default=5,
        metadata={"help": "LookSAM: a full SAM step every k optimizer steps, the kept direction reused in between "
                  "(paper default 5; cost about 1 + 1/k plain steps)."},
    )
    sam_looksam_alpha: float = field(
        default=0.7,
        metadata={"help": "LookSAM: weight of the reused orthogonal direction, g + alpha ||g|| g_v / ||g_v|| "
                  "(paper default 0.7)."},
    )


@register_sam_variant("looksam")
class LookSAM(BuildsOnBasePerturbation, SAMVariant):
    model_card_tags = ("looksam",)
    arguments = LookSAMArguments

    def __init__(self, args):
        super().__init__(args)
        self.direction: list[torch.Tensor | None] | None = None  # g_v, aligned with the trainable tensors
        self._direction_norm: float | None = None  # ||g_v||, constant between refreshes
        self._first_pass = FirstPassSum()
        self._refresh = False

    @classmethod
    def validate_arguments(cls, args) -> None:
        check_base_variant(args, "looksam")
        check_positive_int(args, "sam_looksam_k")
        check_nonnegative(args, "sam_looksam_alpha")
        if args.sam_interval > 1:
            raise ValueError(
                f"sam_interval={args.sam_interval} with sam_variant='looksam': LookSAM already takes its SAM step "
                "every sam_looksam_k steps and reuses its direction in between; set sam_looksam_k instead "
                "(and sam_interval=1)."
            )

    def takes_first_pass(self, step) -> bool:
        self._refresh = step.global_step % self.args.sam_looksam_k == 0 or self.direction is None
        return self._refresh

    def perturbation(self, step, grads):
        if grads is None:
            return None  # a step between refreshes: one plain pass, corrected at the optimizer step
        self._first_pass.add(step, grads)
        return base_perturbation(self.args, step, grads)

    def before_optimizer_step(self, step) -> None:
        grads = step.gradients()
        if self._refresh:
            plain = self._first_pass.take(step)
            kept = present(grads, plain)
            orthogonal = sharpness.orthogonal_component([grads[i] for i in kept], [plain[i] for i in kept])
            norm = float(sharpness.global_norm(orthogonal))
            if math.isfinite(norm):  # the same on every rank: computed from synced gradients
                direction = [None] * len(grads)
                for i, v in zip(kept, orthogonal):
                    direction[i] = v
                self.direction, self._direction_norm = direction, norm
            return  # the refresh step itself descends on g_s unchanged
        if self._direction_norm is None:  # restored from a checkpoint (FSDP2: this rank's shards, re-wrapped)
            self.direction = [None if d is None else sharpness.from_local_like(d, p)
                              for d, p in zip(self.direction, step.trainable)]
        kept = present(grads, self.direction)
        if self._direction_norm is None:
            self._direction_norm = float(sharpness.global_norm([d for d in self.direction if d is not None]))
        sharpness.looksam_reuse_([grads[i] for i in kept], [self.direction[i] for i in kept],
                                 self.args.sam_looksam_alpha, direction_norm=self._direction_norm)
        step.set_gradients(grads)

    def state_dict(self) -> dict:
        return {"direction": self.direction} if self.direction is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.direction = state.get("direction")
        self._direction_norm = None
