"""Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025).

For every 2-D weight (r = min(m, n), T tasks):
1. common subspace: the top c singular directions of the summed task matrices, c = int(r * k)
   adjusted so the remaining r - c directions split evenly: r - c = round((r - c) / T) * T;
2. task-specific: each task matrix projected off the common subspace, W_t - U_c U_c^T W_t, and
   its top (r - c) / T singular directions;
3. the task-specific and common left vectors are concatenated and orthogonalised (polar factor),
   the right ones likewise, and every singular value is replaced by the mean of the r kept ones:
   merged = alpha * mean(S) * polar(U) polar(V).
Other tensors: the mean of the task vectors, times alpha. Paper: k = 0.8, alpha searched.

Follows the authors' code (github.com/danielm1405/iso-merging) and FusionBench's `iso_cts`.
Deliberate differences: directions with a numerically zero singular value (<= max(m, n) * eps *
scale; scale = s_max of the sum for the common part, ||W_t||_F for a task's residual) are left
out of the orthogonalisation (their vectors are arbitrary; they still count in the mean, as in the
reference); if rounding would give more task-specific directions than r (small matrices), they are
rounded down instead (the reference would slice with a negative common size).
"""
from __future__ import annotations

import torch

from ..registry import MergeMethod, Param, layer_value, register_method
from ..svd import null_tolerance, polar, svd
from .iso_c import ISO_ALPHAS


def split_sizes(r: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions, task-specific directions per task); common + T * per_task = r."""
    common = int(r * common_fraction)
    per_task = round((r - common) / num_tasks)
    if per_task * num_tasks > r:
        per_task = r // num_tasks
    return r - per_task * num_tasks, per_task


def iso_cts_matrix(deltas: torch.Tensor, common_fraction: float) -> torch.Tensor:
    """The Iso-CTS merged delta (alpha = 1) of a T x m x n stack of task matrices."""
    num, m, n = deltas.shape
    r = min(m, n)
    common, per_task = split_sizes(r, num, common_fraction)
    u, s, vh = svd(deltas.sum(0))
    keep = s[:common] > null_tolerance((m, n), s[0], deltas.dtype)
    u_c = u[:, :common]
    us, vs, total = [], [], s[:common].sum()
    if per_task:
        for t in range(num):
            w = deltas[t]
            residual = w - u_c @ (u_c.T @ w)
            ut, st, vht = svd(residual)
            ok = st[:per_task] > null_tolerance((m, n), torch.linalg.matrix_norm(w), deltas.dtype)
            us.append(ut[:, :per_task][:, ok])
            vs.append(vht[:per_task][ok])
            total = total + st[:per_task].sum()
    us.append(u_c[:, keep])
    vs.append(vh[:common][keep])
    left, right = torch.cat(us, dim=1), torch.cat(vs, dim=0)
    if left.shape[1] == 0:
        return torch.zeros((m, n), dtype=deltas.dtype)
    return (polar(left) * (total / r)) @ polar(right)


def kernel(deltas, ctx):
    alpha = layer_value(ctx.params["scaling"], ctx.key)
    if deltas.dim() != 3:
        return deltas.mean(0) * alpha
    return iso_cts_matrix(deltas, ctx.params["common_space_fraction"]) * alpha


register_method(MergeMethod(
    name="iso_cts",
    description="Iso-CTS (Marczak et al. 2025): common subspace of the summed matrices plus each task's "
                "top directions orthogonal to it, orthogonalised, flat spectrum; other tensors averaged",
    params=[
        Param("scaling", "float", 1.0, "alpha, multiplies the merged task vector (searched; or per-layer rules)",
              grid=ISO_ALPHAS, symbol="alpha", per_layer=True),
        Param("common_space_fraction", "float", 0.8, "k: fraction of the r directions taken from the common subspace",
              low=0.0, high=1.0),
    ],
    kernel=kernel,
    label="Iso-CTS",
    short_label="Iso-CTS",
    linear_param="scaling",
    whole_tensors=True,
    in_study=True,
    order=61,
))
