"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025).

For every 2-D weight: each task matrix is reduced to its top k = int(r / T) singular components
(r = min(m, n), T tasks); the kept left singular vectors of all tasks are concatenated into
U (m x Tk), the right ones into V (Tk x n), the singular values into S; U and V are replaced by
their nearest orthogonal matrices (polar factors, by SVD) and the merged delta is
alpha * polar(U) diag(S) polar(V). Every other tensor (biases, LayerNorm, 1-D/4-D) is the mean of
the task vectors, times alpha. Paper default alpha = 1.0.

Follows the authors' code (github.com/AntoAndGar/task_singular_vectors,
`compute_and_sum_svd_mem_reduction`) and FusionBench's TSV-M. Deliberate differences:
- components whose singular value is numerically zero (<= max(m, n) * eps * s_max of that task,
  e.g. of a rank-deficient or zero task matrix) are left out: their singular vectors are an
  arbitrary basis of the null space and, in the reference, still change the orthogonalisation
  of every other task's vectors. On full-rank matrices the result is the reference's.
- k is at least 1 (the reference keeps int(r / T) = 0 components, i.e. zeroes the matrix, when a
  matrix has fewer than T singular values); `fraction` overrides 1/T (the paper's ablation).
- every 2-D tensor is a matrix (the reference also skips a key named `text_projection`; merge
  the image encoder alone, as the paper does, or use per-layer `scaling` rules).
The kernel needs whole matrices (one SVD per task and layer): peak memory is one matrix per task
plus the SVD work space, never all models at once.
"""
from __future__ import annotations

import torch

from ..registry import MergeMethod, Param, layer_value, register_method
from ..svd import null_tolerance, polar, svd

TSV_ALPHAS = (0.6, 0.8, 1.0, 1.2, 1.4)


def kept_components(matrix: torch.Tensor, k: int):
    """(U_k, S_k, Vh_k) of the top k singular components, numerically-zero ones left out."""
    u, s, vh = svd(matrix)
    k = min(k, s.numel())
    keep = s[:k] > null_tolerance(matrix.shape, s[0] if s.numel() else 0.0, matrix.dtype)
    return u[:, :k][:, keep], s[:k][keep], vh[:k][keep]


def tsv_matrix(deltas: torch.Tensor, fraction: float | None = None) -> torch.Tensor:
    """The TSV-M merged delta (alpha = 1) of a T x m x n stack of task matrices."""
    num, m, n = deltas.shape
    r = min(m, n)
    k = max(1, int(r * (fraction if fraction is not None else 1.0 / num)))
    parts = [kept_components(deltas[t], k) for t in range(num)]
    s = torch.cat([p[1] for p in parts])
    if s.numel() == 0:  # every task matrix is zero
        return torch.zeros((m, n), dtype=deltas.dtype)
    u = polar(torch.cat([p[0] for p in parts], dim=1))
    vh = polar(torch.cat([p[2] for p in parts], dim=0))
    return (u * s) @ vh


def kernel(deltas, ctx):
    alpha = layer_value(ctx.params["scaling"], ctx.key)
    if deltas.dim() != 3:
        return deltas.mean(0) * alpha
    return tsv_matrix(deltas, ctx.params.get("fraction")) * alpha


register_method(MergeMethod(
    name="tsv_merging",
    description="TSV-M (Gargiulo et al. 2025): per matrix, each task's top 1/T singular components, "
                "orthogonalised across tasks; other tensors averaged",
    params=[
        Param("scaling", "float", 1.0, "alpha, multiplies the merged task vector (paper: 1.0; or per-layer rules)",
              grid=TSV_ALPHAS, symbol="alpha", per_layer=True),
        Param("fraction", "float", None, "fraction of each task's singular components kept (default 1/T)",
              low=0.0, high=1.0, low_open=True),
    ],
    kernel=kernel,
    label="TSV-M",
    short_label="TSV-M",
    linear_param="scaling",
    whole_tensors=True,
    in_study=True,
    order=50,
))
