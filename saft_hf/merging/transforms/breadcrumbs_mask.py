"""Model Breadcrumbs' mask (Davari & Belilovsky, ECCV 2024): per tensor ("layer"), keep the band
of magnitudes between the smallest and the largest ones - drop the `beta` fraction of largest
|tau| (outliers) and the smallest, so that `density` of the entries remain; no rescaling.

Counts as in mergekit's `magnitude_outliers` (sparsify.py): n_top = int(beta * n), keep
int(density * n), n_bottom = n - keep - n_top (if negative, fewer top entries are dropped);
entries ranked by |tau| (ties by position, a stable sort). Deliberate difference: when
int(beta * n) = 0 mergekit keeps nothing (it slices `[n_bottom:-0]`); here the band then reaches
the largest entry.
"""
from __future__ import annotations

import torch

from ..registry import Param, Transform, register_transform

BREADCRUMBS_DENSITIES = (0.1, 0.2, 0.3)


def band_mask(delta: torch.Tensor, density: float, beta: float) -> torch.Tensor:
    """Boolean mask of the kept band of one tensor."""
    n = delta.numel()
    keep = int(density * n)
    n_top = int(beta * n)
    n_bottom = n - keep - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    order = torch.sort(delta.reshape(-1).abs(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bottom:n - n_top]] = True
    return mask.view(delta.shape)


def breadcrumbs_tensor(delta: torch.Tensor, density: float, beta: float) -> torch.Tensor:
    if density >= 1.0 and beta == 0.0:
        return delta
    return delta * band_mask(delta, density, beta)


def apply(delta, key: str, task_index: int, params: dict):
    return breadcrumbs_tensor(delta, params["density"], params["beta"])


register_transform(Transform(
    name="breadcrumbs_mask",
    description="Model Breadcrumbs' mask: per tensor, drop the beta largest and the smallest magnitudes, "
                "keeping density of the entries",
    params=[
        Param("density", "float", 0.1, "fraction of each tensor's entries kept", low=0.0, high=1.0,
              low_open=True, grid=BREADCRUMBS_DENSITIES),
        Param("beta", "float", 0.01, "fraction of each tensor's largest magnitudes dropped (outliers)",
              low=0.0, high=1.0, high_open=True),
    ],
    apply=apply,
    label="Breadcrumbs mask",
    order=110,
))
