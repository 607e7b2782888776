"""Exact global magnitude threshold (k-th smallest |value|) streamed over many tensors.

The TIES paper flattens a whole task vector and calls `kthvalue`; here the same number is found
while reading tensors one by one (memory: one tensor plus small buffers): a sampling pass
brackets the k-th value, a counting pass gathers the few entries inside the bracket and selects
exactly among them. If the bracket misses, a radix select over the IEEE-754 bit patterns of |x|
finishes the job (for non-negative floats the bit pattern read as an integer is ordered like the
value; 16 bits per pass). Ties and zeros are exact because entries are counted, never estimated.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

_BINS_BITS = 16
_NBINS = 1 << _BINS_BITS


def selection_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """float64 if any tensor is float64 else float32: both hold every fp16/bf16/fp32 value exactly."""
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


def _bit_keys(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    values = tensor.detach().reshape(-1).to(dtype).abs()
    if torch.isnan(values).any():
        raise ValueError("task vector contains NaN; fix the checkpoint (NaN has no magnitude rank)")
    keys = values.view(torch.int64 if dtype == torch.float64 else torch.int32)
    return keys.to(torch.int64) if keys.dtype != torch.int64 else keys


def _key_to_value(key: int, dtype: torch.dtype) -> float:
    int_dtype = torch.int64 if dtype == torch.float64 else torch.int32
    return torch.tensor([key], dtype=int_dtype).view(dtype).item()


def keep_count(numel: int, density: float) -> int:
    """How many entries the TIES reference keeps at least: int(numel * density)."""
    return int(numel * density)


def kth_rank_for_density(numel: int, density: float) -> int | None:
    """1-based rank of the threshold the TIES reference uses (`kthvalue(numel - int(numel*density))`).

    None means "keep everything" (density 1.0, where the reference would call kthvalue(0) and fail).
    """
    rank = numel - keep_count(numel, density)
    return None if rank <= 0 else rank


class StreamingThreshold:
    """Exact k-th smallest |value| over the concatenation of tensors read in several passes.

    Pass 1 takes a small random sample of |values| and brackets the k-th value between two sample
    quantiles [lo, hi] (about 6 standard deviations wide). Pass 2 counts entries below lo and
    gathers the few in [lo, hi]; if the k-th falls among them, `kthvalue` on that small set is the
    exact answer. If not (unlucky sample, or a huge run of ties), a radix select over the bit
    patterns follows (16 bits per pass), which is exact in every case.

    Usage: `while not sel.done: for each tensor: sel.update(tensor); sel.finish_level()`; then `sel.value`.
    """

    SAMPLE_SIZE = 1 << 18
    MAX_CANDIDATES = 1 << 23

    def __init__(self, rank: int, total: int, dtype: torch.dtype = torch.float32, seed: int = 0):
        if not 1 <= rank <= total:
            raise ValueError(f"rank must be in [1, {total}], got {rank}")
        self.rank, self.total, self.dtype = rank, total, dtype
        self.bits = 64 if dtype == torch.float64 else 32
        self.stage = "sample"
        self.passes = 0
        self.value: float | None = None
        self._gen = torch.Generator().manual_seed(seed)
        self._fraction = min(1.0, self.SAMPLE_SIZE / total)
        self._samples: list[torch.Tensor] = []
        self._seen = 0

    @property
    def done(self) -> bool:
        return self.value is not None

    # ---- stage dispatch
    @property
    def sample_fraction(self) -> float:
        """In the sample stage callers feed about this fraction of each tensor (random rows/entries)."""
        return self._fraction

    def update(self, tensor: torch.Tensor, magnitudes: bool = False) -> None:
        """Full passes: every entry once. Sample stage: a random `sample_fraction` of the entries.
        `magnitudes=True` says the tensor already holds |values| (saves one pass over the data)."""
        if self.done:
            return
        values = tensor.detach().reshape(-1).to(self.dtype)
        self._seen += values.numel()
        if self.stage == "bracket":
            self._update_bracket(values, magnitudes)
        else:
            getattr(self, f"_update_{self.stage}")(values)

    def finish_level(self) -> None:
        if self.done:
            return
        if self.stage != "sample" and self._seen != self.total:
            raise ValueError(f"a pass read {self._seen} entries but {self.total} were announced")
        self._seen = 0
        self.passes += 1
        getattr(self, f"_finish_{self.stage}")()

    # ---- stage 1: random sample -> bracket
    def _update_sample(self, values):
        self._samples.append(values.abs())

    def _finish_sample(self):
        sample = torch.sort(torch.cat(self._samples)).values if self._samples else torch.empty(0)
        self._samples = []
        m = sample.numel()
        if m == 0:
            self._start_radix()
            return
        q = (self.rank - 0.5) / self.total
        spread = 6.0 * math.sqrt(max(m * q * (1 - q), 1.0)) + 16
        lo_i, hi_i = int(math.floor(q * m - spread)), int(math.ceil(q * m + spread))
        self.lo = sample[lo_i].item() if lo_i >= 0 else -math.inf
        self.hi = sample[hi_i].item() if hi_i < m else math.inf
        self._below = 0
        self._inside = 0
        self._candidates: list[torch.Tensor] = []
        self._num_candidates = 0
        self.stage = "bracket"

    # ---- stage 2: count below lo, gather [lo, hi]
    def _update_bracket(self, values, magnitudes=False):
        # NaN is in neither count (it compares False); the merge itself rejects NaN task vectors.
        if not magnitudes:
            values = values.abs()
        # This pass touches every entry of every task vector, so it runs in NumPy: its
        # comparisons and boolean gather are several times faster than torch's on CPU (the
        # bounds are values of this dtype, so the comparisons are exact either way). lo <= hi,
        # so "inside the bracket" = (<= hi) xor (< lo).
        array = values.numpy()
        below = array < self.lo
        self._below += int(np.count_nonzero(below))
        mask = array <= self.hi
        mask ^= below
        inside = torch.from_numpy(np.compress(mask, array))
        self._inside += inside.numel()
        if self._num_candidates <= self.MAX_CANDIDATES:
            self._num_candidates += inside.numel()
            self._candidates.append(inside)

    def _finish_bracket(self):
        if self._num_candidates > self.MAX_CANDIDATES:
            self._candidates = []
        else:
            cand = torch.cat(self._candidates) if self._candidates else torch.empty(0, dtype=self.dtype)
            self._candidates = []
            local = self.rank - self._below
            if 1 <= local <= cand.numel():
                self.value = cand.kthvalue(local).values.item()
                return
        self._start_radix()

    # ---- fallback: radix select over the IEEE-754 bit patterns, 16 bits per pass
    def _start_radix(self):
        self.stage = "radix"
        self.shifts = list(range(self.bits - _BINS_BITS, -1, -_BINS_BITS))
        self.level = 0
        self.prefix = 0
        self.remaining_rank = self.rank
        self._hist = torch.zeros(_NBINS, dtype=torch.int64)

    def _update_radix(self, values):
        keys = _bit_keys(values, self.dtype)  # (abs inside)
        shift = self.shifts[self.level]
        if self.level > 0:
            high = shift + _BINS_BITS
            keys = keys[(keys >> high) == (self.prefix >> high)]
        self._hist += torch.bincount((keys >> shift) & (_NBINS - 1), minlength=_NBINS)

    def _finish_radix(self):
        cumulative = torch.cumsum(self._hist, 0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(self.remaining_rank)).item())
        below = int(cumulative[digit - 1].item()) if digit > 0 else 0
        self.remaining_rank -= below
        self.prefix |= digit << self.shifts[self.level]
        self._hist.zero_()
        self.level += 1
        if self.level == len(self.shifts):
            self.value = _key_to_value(self.prefix, self.dtype)


def exact_kth_abs(
    tensors: Callable[[], Iterable[torch.Tensor]], rank: int, dtype: torch.dtype | None = None,
    force_radix: bool = False,
) -> float:
    """k-th smallest |value| (1-based `rank`) over all tensors yielded by `tensors()`.

    `tensors` is called once per pass (2 passes for float32), so it may read lazily from disk.
    Equal to `torch.cat([t.flatten() for t in ...]).abs().kthvalue(rank)`.
    """
    metas = []
    for t in tensors():
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ValueError("tensor contains NaN; NaN has no magnitude rank")
        metas.append((t.dtype, t.numel()))
    if dtype is None:
        dtype = selection_dtype(d for d, _ in metas)
    sel = StreamingThreshold(rank, sum(n for _, n in metas), dtype)
    if force_radix:
        sel._start_radix()
    gen = torch.Generator().manual_seed(0)
    while not sel.done:
        for t in tensors():
            sel.update(sample_entries(t.reshape(-1), sel.sample_fraction, gen) if sel.stage == "sample" else t)
        sel.finish_level()
    return sel.value


def sample_entries(flat: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    if fraction >= 1:
        return flat
    n = int(flat.numel() * fraction + torch.rand((), generator=gen).item())  # unbiased rounding
    return flat[torch.randint(flat.numel(), (n,), generator=gen)]


def multi_thresholds(
    num_tasks: int,
    ranks: Sequence[int | None],
    total: int,
    dtype: torch.dtype,
    read_pass: Callable[[Callable[[int, torch.Tensor], None], float | None], None],
) -> list[float | None]:
    """Thresholds for many tasks at once: `read_pass(feed, fraction)` must call `feed(task, tensor)`
    (or `feed(task, abs_tensor, magnitudes=True)`) for every tensor of every task (one pass);
    with `fraction` not None only a random sample of about that fraction of the entries (rows)
    is wanted. Tasks with rank None keep everything."""
    selectors = [StreamingThreshold(r, total, dtype, seed=i) if r is not None else None for i, r in enumerate(ranks)]
    active = [s for s in selectors if s is not None]
    while active and not all(s.done for s in active):

        def feed(task: int, tensor: torch.Tensor, magnitudes: bool = False) -> None:
            sel = selectors[task]
            if sel is not None:
                sel.update(tensor, magnitudes)

        sampling = [s for s in active if not s.done and s.stage == "sample"]
        read_pass(feed, sampling[0].sample_fraction if sampling else None)
        for s in active:
            s.finish_level()
    return [s.value if s is not None else None for s in selectors]
