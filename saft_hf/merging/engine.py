"""The merge loop: every method is computed key by key from lazy task vectors, so memory stays
near one tensor per task; TIES with a global trim first finds each task's exact magnitude
threshold in streaming passes (see topk.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .io import TensorSource
from .plan import MergePlan
from .taskvectors import TaskVector, compute_dtype
from .topk import kth_rank_for_density, multi_thresholds, sample_entries, selection_dtype

logger = logging.getLogger(__name__)

TRIM_SCOPES = ("global", "per_tensor")
SIGN_METHODS = ("sum", "count")
DISJOINT_MODES = ("mean", "sum")
ZERO_SIGNS = ("majority", "positive")


@dataclass
class MergeStats:
    method: str
    params: dict
    thresholds: list | None = None
    majority_sign: int | None = None
    deferred_keys: int = 0
    notes: list[str] = field(default_factory=list)


def per_task(value, n: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} values but there are {n} task vectors; give one number or one per task")
    return values


def check_ties_args(density, trim_scope, sign_method, disjoint, zero_sign) -> None:
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"TIES density must be in (0, 1] (fraction of each task vector kept), got {density!r}")
    for name, value, allowed in (("trim_scope", trim_scope, TRIM_SCOPES), ("sign_method", sign_method, SIGN_METHODS),
                                 ("disjoint", disjoint, DISJOINT_MODES), ("zero_sign", zero_sign, ZERO_SIGNS)):
        if value not in allowed:
            raise ValueError(f"TIES {name} must be one of {allowed}, got {value!r}")


def _bar(iterable, desc, progress, total=None):
    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False, unit="tensor")


# Large tensors (embeddings) are processed in row blocks of about this many entries per task,
# so memory stays near T x 16 MB whatever the vocabulary size.
PIECE_ELEMENTS = 1 << 22
_SMALL_TENSOR = 1 << 16


def pieces(shape, max_elements: int | None = None) -> list[tuple[int, int] | None]:
    """Row blocks (start, stop) covering a tensor, or [None] for "the whole tensor"."""
    max_elements = max_elements or PIECE_ELEMENTS
    numel = int(torch.Size(shape).numel())
    if len(shape) == 0 or numel <= max_elements or shape[0] <= 1:
        return [None]
    row = numel // shape[0]
    step = max(1, max_elements // max(row, 1))
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def _base_piece(base: TensorSource, key: str, rows):
    return base.get(key) if rows is None else base.get_rows(key, *rows)


class Scratch:
    """A reusable flat buffer handing out views of any shape: the big T x block temporaries of
    every row block reuse the same memory instead of a fresh allocation (and page faults) each
    time. A view is valid until the next `take`."""

    def __init__(self):
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        numel = int(torch.Size(shape).numel())
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


def stacked_deltas(tasks: Sequence[TaskVector], key: str, pre: torch.Tensor, rows, scratch: Scratch) -> torch.Tensor:
    """T x (piece shape) tensor of the task deltas, in a scratch buffer."""
    out = scratch.take((len(tasks), *pre.shape), compute_dtype(pre.dtype))
    for t, tv in enumerate(tasks):
        tv.get_into(out[t], key, pre, rows)
    return out


def linear_merge(base: TensorSource, tasks: Sequence[TaskVector], plan: MergePlan, coeffs: Sequence[float],
                 base_coeff: float, sink, progress=True, desc="merging") -> None:
    """out = base_coeff * theta_0 + sum_t coeffs[t] * tau_t, key by key and row block by row
    block (task arithmetic, weighted average)."""
    for key in _bar(plan.keys, desc, progress):
        for rows in pieces(base.info(key)[0]):
            pre = _base_piece(base, key, rows)
            acc = None
            for c, tv in zip(coeffs, tasks):
                d = tv.get(key, pre, rows) * c
                acc = d if acc is None else acc.add_(d)
            out = pre.to(acc.dtype) * base_coeff + acc if acc is not None else pre.clone()
            sink.write(key, out.to(pre.dtype), rows[0] if rows else None)
    for key in plan.passthrough:
        sink.write(key, base.get(key))


def ties_thresholds(base: TensorSource, tasks: Sequence[TaskVector], plan: MergePlan, density: float,
                    progress=True) -> list[float | None]:
    """Each task's exact global threshold: the value `kthvalue` returns on its flattened |tau|."""
    total = sum(int(torch.Size(base.info(k)[0]).numel()) for k in plan.keys)
    ranks = [kth_rank_for_density(total, density)] * len(tasks)
    dtype = selection_dtype(base.info(k)[1] for k in plan.keys)
    passes = [0]
    gen = torch.Generator().manual_seed(1234)
    scratch = Scratch()

    def read_pass(feed, fraction):
        passes[0] += 1
        what = "sampling" if fraction is not None else "counting"
        for key in _bar(plan.keys, f"TIES global threshold, pass {passes[0]} ({what})", progress):
            shape = base.info(key)[0]
            numel = int(torch.Size(shape).numel())
            if fraction is None:
                for rows in pieces(shape):
                    pre = _base_piece(base, key, rows)
                    magnitudes = stacked_deltas(tasks, key, pre, rows, scratch).abs_()
                    for t in range(len(tasks)):
                        feed(t, magnitudes[t], magnitudes=True)
            elif numel <= _SMALL_TENSOR or len(shape) < 2:
                pre = base.get(key)
                for t, tv in enumerate(tasks):
                    feed(t, sample_entries(tv.get(key, pre).reshape(-1), fraction, gen))
            else:
                # Sample whole random rows: only those bytes are read from disk.
                n = int(shape[0] * fraction + torch.rand((), generator=gen).item())
                for i in torch.randint(shape[0], (n,), generator=gen).sort().values.tolist():
                    pre = base.get_rows(key, i, i + 1)
                    for t, tv in enumerate(tasks):
                        feed(t, tv.get(key, pre, (i, i + 1)))

    return multi_thresholds(len(tasks), ranks, total, dtype, read_pass)


def _per_tensor_threshold(delta: torch.Tensor, density: float):
    rank = kth_rank_for_density(delta.numel(), density)
    if rank is None:
        return None
    return delta.reshape(-1).abs().kthvalue(rank).values.item()


def ties_direction(deltas, thresholds: list, sign_method: str, disjoint: str, zero_sign_value: int | None,
                   scratch: Scratch | None = None):
    """Merged (unscaled) TIES delta of one tensor (or row block), the sum of its elected signs,
    and whether some entry has elected sign 0 while a trimmed entry there is non-zero (such
    entries need the model-wide majority sign)."""
    stacked = deltas if isinstance(deltas, torch.Tensor) else torch.stack(deltas)  # T x ... (modified in place)
    work = (scratch or Scratch()).take(stacked.shape, stacked.dtype)  # a T x ... temporary, reused
    if any(thr is not None for thr in thresholds):
        thr = torch.tensor([-1.0 if t is None else t for t in thresholds], dtype=stacked.dtype)
        # trim in place: multiply by the 1.0/0.0 mask (|x| >= thr) computed into the work buffer
        # (the same values as multiplying by a bool mask, without the dtype-converting kernel)
        torch.ge(torch.abs(stacked, out=work), thr.view(-1, *([1] * (stacked.dim() - 1))), out=work)
        stacked.mul_(work)
    summed = stacked.sum(0)
    if bool(torch.isnan(summed).any()):  # (torch.sign(NaN) is 0, so NaN would pass silently)
        raise ValueError("a task vector contains NaN (or inf - inf); fix the checkpoint before merging")
    elected = torch.sign(summed if sign_method == "sum" else torch.sign(stacked).sum(0))
    elected_sum = int(elected.sum().item())
    zero = elected == 0
    ambiguous = False
    if bool(zero.any()):
        # only the positions with elected sign 0 need checking (gathered, not the whole stack)
        where_zero = zero.reshape(-1).nonzero().squeeze(1)
        ambiguous = bool(stacked.reshape(len(stacked), -1).index_select(1, where_zero).any())
    if zero_sign_value is not None and ambiguous:
        elected = torch.where(zero, torch.full_like(elected, zero_sign_value), elected)
    # As in the TIES reference: keep the non-zero entries whose sign is the elected one. With
    # elected in {-1, 0, +1}, stacked * elected is positive exactly there; clamping the rest to 0
    # and multiplying the sum back by the sign gives the sum of the kept entries.
    agreeing = stacked.mul_(elected).clamp_(min=0)
    merged = agreeing.sum(0).mul_(elected)
    if disjoint == "mean":
        # number of kept entries: agreeing >= 0, so sign() is 1.0 exactly where it is non-zero
        # (much faster than count_nonzero over dim 0; counts <= T are exact in floating point)
        merged = merged / torch.sign(agreeing, out=work).sum(0).clamp_(min=1)
    return merged, elected_sum, ambiguous


def ties_merge(base: TensorSource, tasks: Sequence[TaskVector], plan: MergePlan, scaling, density: float,
               trim_scope: str, sign_method: str, disjoint: str, zero_sign: str, sink, progress=True,
               thresholds: list | None = None, direction_only: bool = False) -> MergeStats:
    """TIES key by key (row block by row block) into `sink`; with `direction_only` the sink gets
    the unscaled merged delta (float32) instead of weights, so a lambda grid can reuse it."""
    check_ties_args(density, trim_scope, sign_method, disjoint, zero_sign)
    stats = MergeStats("ties", dict(scaling=scaling, density=density, trim_scope=trim_scope,
                                    sign_method=sign_method, disjoint=disjoint, zero_sign=zero_sign))
    if trim_scope == "global" and thresholds is None:
        thresholds = ties_thresholds(base, tasks, plan, density, progress)
    stats.thresholds = thresholds
    fixed_zero = 1 if zero_sign == "positive" else None
    sign_total = 0
    deferred: list[tuple[str, tuple | None]] = []
    tensor_thresholds: dict[str, list] = {}

    def key_thresholds(key):
        if trim_scope == "global":
            return thresholds
        if key not in tensor_thresholds:  # per tensor: each task's whole tensor, one at a time
            pre_full = base.get(key)
            tensor_thresholds[key] = [_per_tensor_threshold(tv.get(key, pre_full), density) for tv in tasks]
        return tensor_thresholds[key]

    def emit(key, rows, pre, merged):
        out = merged if direction_only else (pre.to(merged.dtype) + scaling * merged).to(pre.dtype)
        sink.write(key, out, rows[0] if rows else None)

    stack_scratch, work_scratch = Scratch(), Scratch()

    for key in _bar(plan.keys, "TIES merge", progress):
        thr = key_thresholds(key)
        for rows in pieces(base.info(key)[0]):
            pre = _base_piece(base, key, rows)
            merged, elected_sum, ambiguous = ties_direction(stacked_deltas(tasks, key, pre, rows, stack_scratch), thr,
                                                            sign_method, disjoint, fixed_zero, work_scratch)
            sign_total += elected_sum
            if fixed_zero is None and ambiguous:
                # The TIES reference gives these entries the sign held by most entries of the whole
                # model, known only after this pass: compute this block again at the end (rare).
                deferred.append((key, rows))
                continue
            emit(key, rows, pre, merged)
        if trim_scope == "per_tensor" and not any(k == key for k, _ in deferred):
            tensor_thresholds.pop(key, None)
    majority = 1 if sign_total >= 0 else -1  # a perfect balance counts as + (the reference would pick -)
    stats.majority_sign = majority
    stats.deferred_keys = len({k for k, _ in deferred})
    for key, rows in deferred:
        pre = _base_piece(base, key, rows)
        merged, _, _ = ties_direction(stacked_deltas(tasks, key, pre, rows, stack_scratch), key_thresholds(key),
                                      sign_method, disjoint, majority, work_scratch)
        emit(key, rows, pre, merged)
    if not direction_only:
        for key in plan.passthrough:
            sink.write(key, base.get(key))
    return stats
