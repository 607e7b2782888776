"""Offline task metrics in plain numpy: accuracy, Matthews correlation, binary F1, Pearson, Spearman.

`evaluate.load(...)` fetches metric scripts from the Hub, which is not reachable everywhere the
project runs (CI, air-gapped clusters); these are the standard definitions (the same numbers as
scikit-learn / scipy, which the tests check against) with the GLUE conventions for degenerate
cases: a correlation with a constant input is 0.0 (sklearn's choice for MCC), not NaN.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _as_arrays(predictions: Sequence, references: Sequence) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(predictions)
    ref = np.asarray(references)
    if pred.shape != ref.shape or pred.ndim != 1:
        raise ValueError(
            f"predictions and references must be 1-D and of equal length, got shapes {pred.shape} and {ref.shape}"
        )
    if pred.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return pred, ref


def accuracy(predictions: Sequence, references: Sequence) -> float:
    pred, ref = _as_arrays(predictions, references)
    return float(np.mean(pred == ref))


def matthews_corrcoef(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0.0 when either side is constant."""
    pred, ref = _as_arrays(predictions, references)
    classes = np.union1d(pred, ref)
    p_idx = np.searchsorted(classes, pred)
    r_idx = np.searchsorted(classes, ref)
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(confusion, (r_idx, p_idx), 1.0)
    n = confusion.sum()
    correct = np.trace(confusion)
    true_counts = confusion.sum(axis=1)
    pred_counts = confusion.sum(axis=0)
    cov_ytyp = correct * n - np.dot(true_counts, pred_counts)
    cov_ypyp = n * n - np.dot(pred_counts, pred_counts)
    cov_ytyt = n * n - np.dot(true_counts, true_counts)
    denom = np.sqrt(cov_ypyp * cov_ytyt)
    return float(cov_ytyp / denom) if denom > 0 else 0.0


def f1_binary(predictions: Sequence[int], references: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (GLUE MRPC/QQP: positive = 1); 0.0 when there is no positive at all."""
    pred, ref = _as_arrays(predictions, references)
    tp = float(np.sum((pred == positive) & (ref == positive)))
    fp = float(np.sum((pred == positive) & (ref != positive)))
    fn = float(np.sum((pred != positive) & (ref == positive)))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom > 0 else 0.0


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    pred, ref = _as_arrays(predictions, references)
    x = pred.astype(np.float64) - pred.astype(np.float64).mean()
    y = ref.astype(np.float64) - ref.astype(np.float64).mean()
    denom = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return float(np.dot(x, y) / denom) if denom > 0 else 0.0


def rankdata_average(values: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get the mean of the ranks they span (scipy's method='average')."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Boundaries of runs of equal values in sorted order.
    new_run = np.concatenate([[True], sorted_vals[1:] != sorted_vals[:-1]])
    run_id = np.cumsum(new_run) - 1
    run_starts = np.flatnonzero(new_run)
    run_ends = np.concatenate([run_starts[1:], [values.size]])
    mean_rank = (run_starts + run_ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    pred, ref = _as_arrays(predictions, references)
    return pearson(rankdata_average(pred), rankdata_average(ref))


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "matthews_correlation": matthews_corrcoef,
    "f1": f1_binary,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    return {name: METRICS[name](predictions, references) for name in names}
