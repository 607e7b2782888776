"""Small linear-algebra helpers shared by the SVD merge methods (TSV-M, Iso-C, Iso-CTS)."""
from __future__ import annotations

import torch


def svd(matrix: torch.Tensor):
    """Thin SVD: (U, S, Vh) with S descending. NaN/Inf raise a ValueError (the engine then names
    the model and tensor that hold them) instead of LAPACK's convergence failure."""
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("a matrix given to the SVD holds NaN or Inf")
    return torch.linalg.svd(matrix, full_matrices=False)


def null_tolerance(shape, scale, dtype: torch.dtype) -> float:
    """Singular values at or below this are numerically zero (numpy.linalg.matrix_rank's rule:
    max(m, n) * eps * scale, scale = the largest singular value or the matrix norm). Their
    singular vectors are arbitrary (any basis of the null space), so the methods leave them out
    instead of letting an arbitrary direction into the merge."""
    return float(max(shape)) * torch.finfo(dtype).eps * float(scale)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows, if it is wide) in Frobenius norm:
    U @ Vh from the thin SVD (the orthogonal polar factor), as TSV-M and Iso-CTS orthogonalise
    their concatenated singular vectors."""
    u, _, vh = svd(matrix)
    return u @ vh
