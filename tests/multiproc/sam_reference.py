"""A tiny model and a hand-written SAM/ASAM replay, independent of saft_hf.sharpness.

The replay takes the micro-batches each rank actually saw and recomputes, with plain torch, what
SGD + SAM/ASAM must have produced. The trainer tests compare the trained weights with it.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyClassifier(nn.Module):
    """Linear -> norm -> tanh -> Linear, returning {"loss", "logits"} like a HF model."""

    def __init__(self, dim=6, hidden=8, classes=3, batchnorm=False, unused_parameter=False, frozen_first=False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, classes)
        if unused_parameter:
            self.unused = nn.Parameter(torch.ones(3))
        if frozen_first:
            self.fc1.weight.requires_grad_(False)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.tanh(self.norm(self.fc1(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=32, dim=6, classes=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _loss(model, params, names, batch):
    out = torch.func.functional_call(model, dict(zip(names, params)), (batch["x"],), {"labels": batch["labels"]})
    return out["loss"]


def _perturbation(params, names, grads, rho, adaptive, eta, scope):
    scales = []
    for name, p in zip(names, params):
        if adaptive and (scope == "all" or "weight" in name):  # official ASAM: `"weight" in name`
            scales.append(p.abs() + eta)
        else:
            scales.append(torch.ones_like(p))
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads)))
    return [rho * t * t * g / (norm + 1e-12) for t, g in zip(scales, grads)]


def replay_sam(
    model: nn.Module,
    init_state: dict,
    batches_per_rank: list[list[dict]],
    *,
    grad_accum: int,
    lr: float,
    rho: float,
    adaptive: bool,
    eta: float = 0.0,
    scope: str = "all",
    sync: bool = False,
    clip: float = 0.0,
    perturbation=None,
) -> dict:
    """SGD with SAM/ASAM per micro-batch, gradients averaged over ranks (DDP / ZeRO semantics).

    `sync=False`: each rank perturbs from its own micro-batch gradient; `sync=True`: from the
    mean over ranks. `clip` > 0 clips the accumulated gradient to that global norm (as the Trainer's
    max_grad_norm). `perturbation(params, names, grads) -> e` replaces SAM/ASAM (for other variants).
    Returns the final state dict of the trainable parameters.
    """
    model.load_state_dict(init_state)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach().clone() for n, p in model.named_parameters() if p.requires_grad]
    world = len(batches_per_rank)
    n_micro = len(batches_per_rank[0])
    assert all(len(b) == n_micro for b in batches_per_rank)
    accum = [torch.zeros_like(p) for p in params]
    for step in range(n_micro):
        first = []
        for rank in range(world):
            ps = [p.clone().requires_grad_(True) for p in params]
            loss = _loss(model, ps, names, batches_per_rank[rank][step])
            first.append(torch.autograd.grad(loss, ps, allow_unused=True))
        first = [[g if g is not None else torch.zeros_like(p) for g, p in zip(gs, params)] for gs in first]
        if sync:
            mean = [sum(gs[i] for gs in first) / world for i in range(len(params))]
            first = [mean] * world
        for rank in range(world):
            if perturbation is None:
                e = _perturbation(params, names, first[rank], rho, adaptive, eta, scope)
            else:
                e = perturbation(params, names, first[rank])
            ps = [(p + ei).requires_grad_(True) for p, ei in zip(params, e)]
            loss = _loss(model, ps, names, batches_per_rank[rank][step])
            grads = torch.autograd.grad(loss, ps, allow_unused=True)
            for a, g in zip(accum, grads):
                if g is not None:
                    a += g / (grad_accum * world)
        if (step + 1) % grad_accum == 0:
            if clip > 0:
                total = torch.sqrt(sum((a**2).sum() for a in accum))
                accum = [a * min(1.0, clip / (float(total) + 1e-6)) for a in accum]
            params = [p - lr * a for p, a in zip(params, accum)]
            accum = [torch.zeros_like(p) for p in params]
    return dict(zip(names, params))


def max_difference(state_a: dict, state_b: dict) -> float:
    return max(float((state_a[k].float() - state_b[k].float()).abs().max()) for k in state_a)
