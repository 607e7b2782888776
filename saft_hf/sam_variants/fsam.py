"""Fisher-SAM (Kim et al., ICML 2022, "Fisher SAM: Information Geometry and Sharpness Aware Minimisation").

The neighbourhood is the ellipsoid e^T diag(f) e <= rho^2 of a diagonal Fisher metric f = 1 + eta * F, and
e = rho * g / f / sqrt(g^T diag(1/f) g) maximises the first-order loss on it (`sharpness.fisher_perturbation_`).
F is the paper's estimate, the squared mini-batch gradient g^2 (sam_fsam_decay = 0, the default), or a
running estimate F <- decay * F + (1 - decay) * g^2 over the perturbed micro-batches (sam_fsam_decay in
(0, 1); kept per rank and saved with checkpoints). Paper defaults: eta = 1, rho (their gamma) = 0.1.

The metric is not scale invariant: F is built from the true micro-batch gradient, so fp16 (whose first-pass
gradient carries the loss scale) is refused; bf16 and fp32 are fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import sharpness
from ..argument_checks import check_fraction, check_nonnegative
from .base import Perturbation, SAMVariant
from .registry import register_sam_variant


@dataclass
class FisherSAMArguments:
    sam_fsam_eta: float = field(
        default=1.0,
        metadata={"help": "Fisher-SAM: metric f = 1 + eta * F (diagonal Fisher F); 0 is SAM (paper default 1.0)."},
    )
    sam_fsam_decay: float = field(
        default=0.0,
        metadata={"help": "Fisher-SAM: 0 (paper) estimates F by the squared micro-batch gradient; a value in (0, 1) "
                  "keeps a running F <- decay F + (1 - decay) g^2 instead."},
    )


@register_sam_variant("fsam")
class FisherSAM(SAMVariant):
    model_card_tags = ("fisher-sam",)
    paper_rho = 0.1  # Kim et al.'s gamma (CIFAR settings)
    arguments = FisherSAMArguments

    def __init__(self, args):
        super().__init__(args)
        self.fisher: dict[str, torch.Tensor] = {}  # running diagonal Fisher by parameter name (decay > 0)

    @classmethod
    def validate_arguments(cls, args) -> None:
        check_nonnegative(args, "sam_fsam_eta")
        check_fraction(args, "sam_fsam_decay", allow_zero=True)
        if args.sam_fsam_decay >= 1:
            raise ValueError("sam_fsam_decay must be < 1 (1 would never update the Fisher estimate).")
        if args.sam_eta > 0:
            raise ValueError(f"sam_eta={args.sam_eta} only affects ASAM; with sam_variant='fsam' set sam_eta=0.")

    def unsupported_reason(self, setup):
        if setup.mixed_precision == "fp16":
            return ("the Fisher metric 1 + eta g^2 is not invariant to the fp16 loss scale carried by the first-pass "
                    "gradient; use bf16 or fp32.")
        return None

    def perturbation(self, step, grads):
        fisher = None
        decay = self.args.sam_fsam_decay
        if decay > 0:
            fisher = []
            for name, g in zip(step.names, grads):
                square = g.detach().float() ** 2
                old = self.fisher.get(name)
                if old is not None:  # restored from a checkpoint under FSDP2: this rank's shard, re-wrapped
                    old = sharpness.from_local_like(old, square)
                self.fisher[name] = square if old is None else old.mul_(decay).add_(square, alpha=1 - decay)
                fisher.append(self.fisher[name])
        result = sharpness.fisher_perturbation_(grads, rho=self.args.sam_rho, eta=self.args.sam_fsam_eta,
                                                fisher=fisher, all_finite=step.all_ranks_agree)
        return Perturbation.from_result(result, grads)

    def state_dict(self) -> dict:
        return {"fisher": self.fisher} if self.fisher else {}

    def load_state_dict(self, state: dict) -> None:
        self.fisher = dict(state.get("fisher", {}))
