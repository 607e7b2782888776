"""ESAM (Du et al., ICLR 2022, "Efficient Sharpness-aware Minimization for Improved Training of Neural
Networks"; official code github.com/dydjw9/Efficient_SAM).

Two savings on top of SAM/ASAM, per micro-batch:
- Stochastic weight perturbation (SWP): each trainable tensor is perturbed with probability beta (drawn
  per tensor, as the official code's `random.random() > beta` per parameter), so the first backward only
  computes the weight gradients of the chosen tensors; e = (rho / beta) * T^2 g_S / ||T g_S|| over the
  chosen set S (the official code's 1/beta rescaling). Every tensor is still updated by the second pass.
- Sharpness-sensitive data selection (SDS): after w += e, a forward pass without gradient gives each
  example's loss at w + e; the second forward/backward runs on the int(gamma * B) examples with the largest
  loss increase L(w + e) - L(w) (its mean loss). The official code keeps the examples strictly above the
  k-th largest increase (k - 1 of them when there are no ties); we keep the k largest (torch.topk).
Defaults beta = 0.6, gamma = 0.5 (the paper's setting as we read it; the official class defaults, 1.0 and
1.0, switch both off). SDS needs per-example losses: models returning `logits` (B, C) for `labels` (B,)
(classification: cross-entropy; one output with float labels: squared error); refused at the first step
otherwise. The choice of S is the same on every rank (seeded by seed, step and micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import sharpness
from ..argument_checks import check_fraction
from ._common import BasePerturbationArguments, BuildsOnBasePerturbation
from ._common import base_perturbation, check_base_variant
from .base import SAMVariant
from .registry import register_sam_variant


@dataclass
class ESAMArguments(BasePerturbationArguments):
    sam_esam_beta: float = field(
        default=0.6,
        metadata={"help": "ESAM: probability that a trainable tensor is perturbed (stochastic weight perturbation); "
                  "e is scaled by 1/beta. 1 perturbs every tensor."},
    )
    sam_esam_gamma: float = field(
        default=0.5,
        metadata={"help": "ESAM: fraction of each micro-batch, the examples whose loss rises most at w + e, that "
                  "the second pass trains on (sharpness-sensitive data selection). 1 keeps every example."},
    )


def per_example_losses(outputs, inputs) -> torch.Tensor:
    """Each example's loss from the model outputs: cross-entropy (or squared error for one float output)."""
    logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else getattr(outputs, "logits", None)
    labels = inputs.get("labels") if hasattr(inputs, "get") else None
    if logits is None or labels is None or labels.dim() != 1 or logits.dim() != 2:
        raise NotImplementedError(
            "ESAM's data selection (sam_esam_gamma < 1) needs per-example losses: a model returning logits of shape "
            f"(batch, classes) for labels of shape (batch,), got logits {None if logits is None else tuple(logits.shape)} "
            f"and labels {None if labels is None else tuple(labels.shape)}. Set sam_esam_gamma=1 for this model."
        )
    logits = logits.float()
    if logits.shape[1] == 1 and labels.is_floating_point():
        return (logits.squeeze(1) - labels.float()) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def select_examples(inputs, indices: torch.Tensor, batch_size: int):
    """The micro-batch restricted to `indices` along the batch dimension (other entries unchanged)."""
    chosen = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            chosen[key] = value[indices.to(value.device)]
        else:
            chosen[key] = value
    return type(inputs)(chosen) if isinstance(inputs, dict) else chosen


@register_sam_variant("esam")
class ESAM(BuildsOnBasePerturbation, SAMVariant):
    model_card_tags = ("esam",)
    arguments = ESAMArguments

    def __init__(self, args):
        super().__init__(args)
        self.needs_first_pass_outputs = args.sam_esam_gamma < 1  # instance flag: only SDS needs the outputs

    @classmethod
    def validate_arguments(cls, args) -> None:
        check_base_variant(args, "esam")
        check_fraction(args, "sam_esam_beta")
        check_fraction(args, "sam_esam_gamma")

    def takes_first_pass(self, step) -> bool:
        beta = self.args.sam_esam_beta
        if beta < 1:  # SWP: the first backward only for the chosen tensors
            generator = torch.Generator().manual_seed(
                sharpness.noise_seed(self.args.seed, step.global_step, step.micro_batch))
            draws = torch.rand(len(step.params), generator=generator)
            chosen = (draws < beta).tolist()
            if not any(chosen):  # at least one tensor: the one closest to being drawn
                chosen[int(torch.argmin(draws))] = True
            step.names = [n for n, c in zip(step.names, chosen) if c]
            step.params = [p for p, c in zip(step.params, chosen) if c]
        return True

    def perturbation(self, step, grads):
        return base_perturbation(self.args, step, grads, rho=self.args.sam_rho / self.args.sam_esam_beta)

    def second_pass_inputs(self, step):
        if self.args.sam_esam_gamma >= 1:
            return step.inputs
        before = per_example_losses(step.first_pass_outputs, step.inputs)
        after = per_example_losses(step.model(**step.inputs), step.inputs)
        step.first_pass_outputs = None  # release the first pass's activations-free outputs
        indices = sharpness.sharpest_examples(before.detach(), after, self.args.sam_esam_gamma)
        return select_examples(step.inputs, indices, before.shape[0])
