"""Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025, "No Task Left
Behind: Isotropic Model Merging with Common and Task-Specific Subspaces").

For every 2-D weight: SVD of the sum of the task matrices, U S Vh; every singular value is replaced
by their mean (a flat, isotropic spectrum) and the merged delta is alpha * mean(S) * U Vh. Other
tensors: the mean of the task vectors, times alpha. alpha is searched on validation data.

Follows the authors' code (github.com/danielm1405/iso-merging) and FusionBench's `iso_c`
(sum of the matrices, the mean over all min(m, n) singular values). Deliberate difference:
directions whose singular value is numerically zero (<= max(m, n) * eps * s_max, a rank-deficient
sum) keep singular value 0 instead of the mean: their singular vectors are an arbitrary basis of
the null space, so the reference would add an arbitrary direction there. Full-rank sums give the
reference's result.
"""
from __future__ import annotations

import torch

from ..registry import MergeMethod, Param, layer_value, register_method
from ..svd import null_tolerance, svd

ISO_ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def iso_c_matrix(deltas: torch.Tensor) -> torch.Tensor:
    """The Iso-C merged delta (alpha = 1) of a T x m x n stack of task matrices."""
    u, s, vh = svd(deltas.sum(0))
    keep = s > null_tolerance(deltas.shape[1:], s[0], deltas.dtype)
    return (u[:, keep] * s.mean()) @ vh[keep]


def kernel(deltas, ctx):
    alpha = layer_value(ctx.params["scaling"], ctx.key)
    if deltas.dim() != 3:
        return deltas.mean(0) * alpha
    return iso_c_matrix(deltas) * alpha


register_method(MergeMethod(
    name="iso_c",
    description="Iso-C (Marczak et al. 2025): per matrix, SVD of the summed task matrices with a flat "
                "spectrum (every singular value = their mean); other tensors averaged",
    params=[Param("scaling", "float", 1.0, "alpha, multiplies the merged task vector (searched; or per-layer rules)",
                  grid=ISO_ALPHAS, symbol="alpha", per_layer=True)],
    kernel=kernel,
    label="Iso-C",
    short_label="Iso-C",
    linear_param="scaling",
    whole_tensors=True,
    in_study=True,
    order=60,
))
