"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021): e = rho T^2 g / ||T g||.

SAM is T = 1; ASAM is T = |w| + eta on the tensors selected by `sam_scope`. The maths is
`saft_hf.sharpness.perturbation_`; these classes only read the knobs.
"""

from __future__ import annotations

from .. import sharpness
from .base import Perturbation, SAMVariant
from .registry import register_sam_variant


@register_sam_variant("sam")
class SAM(SAMVariant):
    """Plain SAM: one global L2 ball of radius sam_rho around w."""

    adaptive = False
    model_card_tags = ("sam",)
    paper_rho = 0.05  # Foret et al.'s default

    @classmethod
    def validate_arguments(cls, args) -> None:
        if args.sam_eta > 0:
            raise ValueError(
                f"sam_eta={args.sam_eta} only affects ASAM; with sam_variant={cls.name!r} set sam_eta=0 "
                "(or use sam_variant='asam')."
            )

    def perturbation(self, step, grads):
        args = self.args
        result = sharpness.perturbation_(
            step.params,
            grads,
            rho=args.sam_rho,
            adaptive=self.adaptive,
            eta=args.sam_eta,
            scaled=sharpness.adaptive_scale_mask(step.names, args.sam_scope) if self.adaptive else None,
            all_finite=step.all_ranks_agree,
        )
        return Perturbation.from_result(result, grads)


@register_sam_variant("asam")
class ASAM(SAM):
    """Adaptive SAM: T = |w| + sam_eta on the sam_scope tensors (scale invariant)."""

    adaptive = True
    model_card_tags = ("asam",)
    paper_rho = 0.5  # Kwon et al. (and the SAFT paper) with SGD/Adam; T = |w| makes the ball ~10x SAM's

    @classmethod
    def validate_arguments(cls, args) -> None:
        pass
