"""A toy SAM variant registered from test code only (the seam's acceptance test), plus its replay.

"sign-SAM": e = rho * sign(g) / sqrt(N) (N = number of perturbed entries, so ||e|| = rho wherever g has
no zeros), and before every optimizer step the accumulated gradient is halved through
`SAMStep.gradients()` / `set_gradients()` (with SGD that equals half the learning rate, which the
replay uses). It counts optimizer steps in its checkpointed state.

Imported by tests/test_sam_variants.py and, through SAFT_TEST_SAM_VARIANT_MODULES, by
tests/multiproc/train_worker.py (DDP and DeepSpeed ZeRO runs).
"""

from __future__ import annotations

import math

import torch

from saft_hf import sharpness
from saft_hf.sam_variants import Perturbation, SAMVariant, register_sam_variant

NAME = "test-signsam"
GRADIENT_FACTOR = 0.5


@register_sam_variant(NAME, replace=True)
class SignSAM(SAMVariant):
    model_card_tags = ("sign-sam",)

    def __init__(self, args):
        super().__init__(args)
        self.optimizer_steps = 0
        self.first_pass_losses = []

    def perturbation(self, step, grads):
        grad_norm = sharpness.global_norm(grads)
        if not step.all_ranks_agree(bool(torch.isfinite(grad_norm))):
            return Perturbation(applied=False, grad_norm=grad_norm)
        scale = self.args.sam_rho / math.sqrt(sum(g.numel() for g in grads))
        for g in grads:
            g.sign_().mul_(scale)
        return Perturbation(applied=True, tensors=grads, grad_norm=grad_norm, norm=sharpness.global_norm(grads))

    def after_second_pass(self, step):
        self.first_pass_losses.append(float(step.first_pass_loss))

    def before_optimizer_step(self, step):
        step.set_gradients([None if g is None else g * GRADIENT_FACTOR for g in step.gradients()])
        self.optimizer_steps += 1

    def state_dict(self):
        return {"optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state):
        self.optimizer_steps = int(state["optimizer_steps"])


def replay_perturbation(rho):
    """The same e, written independently, for `replay_sam(..., perturbation=...)`."""

    def perturb(params, names, grads):
        n = sum(g.numel() for g in grads)
        return [rho * torch.sign(g) / math.sqrt(n) for g in grads]

    return perturb


PARTIAL_NAME = "test-partial-sam"


@register_sam_variant(PARTIAL_NAME, replace=True)
class PartialSAM(SAMVariant):
    """Plain SAM on the `fc1.*` tensors only: the first pass is taken for that subset (as ESAM's stochastic
    weight perturbation does), so a launch mode that reduces every gradient in the first pass (FSDP2) must
    keep the other tensors' gradients out of `.grad`."""

    def takes_first_pass(self, step):
        kept = [(n, p) for n, p in zip(step.names, step.params) if n.startswith("fc1.")]
        step.names, step.params = [n for n, _ in kept], [p for _, p in kept]
        return True

    def perturbation(self, step, grads):
        result = sharpness.perturbation_(step.params, grads, rho=self.args.sam_rho, adaptive=False,
                                         all_finite=step.all_ranks_agree)
        return Perturbation.from_result(result, grads)


def replay_partial_perturbation(rho):
    """SAM's e on the fc1 tensors (their own norm), zero elsewhere, for `replay_sam(..., perturbation=...)`."""

    def perturb(params, names, grads):
        chosen = [n.startswith("fc1.") for n in names]
        norm = torch.sqrt(sum((g**2).sum() for g, c in zip(grads, chosen) if c))
        return [rho * g / (norm + 1e-12) if c else torch.zeros_like(g) for g, c in zip(grads, chosen)]

    return perturb
