"""MagPrune, DELLA's drop step (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model
Merging through Magnitude-Based Sampling"): within each row, entries are ranked by magnitude and
kept with a probability that grows linearly with the rank, from density - epsilon (smallest) to
density + epsilon (largest); survivors are divided by their keep probability (the paper's
rescaling, so each entry is unbiased), or rescaled to the tensor's L1 norm (`rescale: l1`, what
mergekit does now), or not at all.

Rows and ranks as in mergekit's `della_magprune` (sparsify.py; DELLA was contributed to mergekit
by its authors): rank r = 1..n ascending by |tau| within a row, normalised (r - 1) / (n - 1).
Deliberate differences: a tensor with more than two dimensions is ranked per row of its
(shape[0], -1) view (mergekit ranks along dim 1 of the unflattened tensor); a row of one entry
keeps it with probability `density` (mergekit divides 0 by 0). The random draw depends only on
(seed + task index, tensor name), like DARE's, so every pass and the on-disk merge agree.
"""
from __future__ import annotations

import torch

from ..registry import Param, ParamError, Transform, register_transform
from ..taskvectors import key_seed

DELLA_DENSITIES = (0.3, 0.5, 0.7)
RESCALES = ("inverse", "l1", "none")


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    ranks = torch.empty(rows.shape, dtype=torch.float64)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.float64).expand_as(ranks).contiguous())
    norm = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + norm * (2 * epsilon)).view(delta.shape)


def magprune_tensor(delta: torch.Tensor, density: float, epsilon: float, seed: int, key: str,
                    rescale: str = "inverse") -> torch.Tensor:
    if density >= 1.0:
        return delta
    probs = keep_probabilities(delta, density, epsilon)
    gen = torch.Generator().manual_seed(key_seed(seed, key))
    keep = torch.rand(delta.shape, generator=gen, dtype=torch.float64) < probs
    kept = delta * keep
    if rescale == "inverse":
        return torch.where(keep, delta / probs.to(delta.dtype), torch.zeros((), dtype=delta.dtype))
    if rescale == "l1":
        norm_kept = kept.abs().sum()
        return kept * (delta.abs().sum() / norm_kept) if norm_kept > 0 else kept
    return kept


def check(params: dict) -> None:
    d, e = params["density"], params["epsilon"]
    if d < 1.0 and not (d - e > 0 and d + e <= 1):
        raise ParamError(f"MagPrune needs 0 < density - epsilon and density + epsilon <= 1 (keep probabilities), "
                         f"got density {d:g}, epsilon {e:g}; lower epsilon")


def apply(delta, key: str, task_index: int, params: dict):
    return magprune_tensor(delta, params["density"], params["epsilon"], params["seed"] + task_index, key,
                           params["rescale"])


MAGPRUNE_PARAMS = [
    Param("density", "float", 0.5, "mean keep probability (1 - the paper's drop rate p)", low=0.0, high=1.0,
          low_open=True, grid=DELLA_DENSITIES),
    Param("epsilon", "float", 0.1, "keep probabilities range over density -/+ epsilon by magnitude rank",
          low=0.0, high=0.5),
    Param("seed", "int", 0, "random seed; task i uses seed + i"),
    Param("rescale", "choice", "inverse", "inverse: divide survivors by their keep probability (paper); "
          "l1: match the tensor's L1 norm (mergekit); none", choices=RESCALES),
]

register_transform(Transform(
    name="magprune",
    description="DELLA's MagPrune: keep each entry with a probability linear in its magnitude rank within "
                "its row (density -/+ epsilon), rescale survivors",
    params=MAGPRUNE_PARAMS,
    apply=apply,
    label="MagPrune",
    order=120,
    check=check,
))
