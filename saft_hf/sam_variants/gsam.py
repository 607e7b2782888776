"""GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization").

Two passes like SAM; the update is g_s - alpha * g_perp, where g_s is the gradient at w + e and g_perp the
component of the plain gradient g (at w) orthogonal to g_s: g_perp = g - <g, g_s> g_s / ||g_s||^2.
Descending on -g_perp lowers the surrogate gap f(w + e) - f(w) without changing the SAM loss to first
order. As in the official PyTorch code (juntang-zhuang/GSAM, `gradient_decompose`) the radius is
sam_rho (the paper's rho_t schedule proportional to the learning rate is not implemented: constant rho).

With gradient accumulation and several ranks the decomposition is done once per optimizer step on the
accumulated, rank-averaged g and g_s (the official code decomposes on each rank, then averages).
"""

from __future__ import annotations

from dataclasses import dataclass, field


from .. import sharpness
from ..argument_checks import check_nonnegative
from ._common import BasePerturbationArguments, BuildsOnBasePerturbation
from ._common import FirstPassSum, base_perturbation, check_base_variant, present
from .base import SAMVariant
from .registry import register_sam_variant


@dataclass
class GSAMArguments(BasePerturbationArguments):
    sam_gsam_alpha: float = field(
        default=0.4,
        metadata={"help": "GSAM: the update is g_s - alpha * (g orthogonal to g_s); 0 is SAM. Default 0.4 (the "
                  "official code has no default; tune it, the paper sweeps it per model)."},
    )


@register_sam_variant("gsam")
class GSAM(BuildsOnBasePerturbation, SAMVariant):
    model_card_tags = ("gsam",)
    arguments = GSAMArguments

    def __init__(self, args):
        super().__init__(args)
        self._first_pass = FirstPassSum()

    @classmethod
    def validate_arguments(cls, args) -> None:
        check_base_variant(args, "gsam")
        check_nonnegative(args, "sam_gsam_alpha")

    def unsupported_reason(self, setup):
        if setup.distributed == "deepspeed" and setup.mixed_precision == "fp16":
            return ("GSAM mixes the first-pass gradient (scaled by DeepSpeed's fp16 loss scale) with DeepSpeed's "
                    "accumulated gradient, whose scale is not exposed consistently; use bf16 or fp32 with DeepSpeed.")
        return None

    def perturbation(self, step, grads):
        self._first_pass.add(step, grads, scale=step.accumulation_factor)  # on the scale of .grad
        return base_perturbation(self.args, step, grads)

    def before_optimizer_step(self, step) -> None:
        perturbed = step.gradients()
        plain = self._first_pass.take(step)
        kept = present(perturbed, plain)
        sharpness.gsam_combine_([perturbed[i] for i in kept], [plain[i] for i in kept], self.args.sam_gsam_alpha)
        step.set_gradients(perturbed)
