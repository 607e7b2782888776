"""TIES-merging (Yadav et al. 2023): trim each task vector to its top `density` magnitudes (over
the whole model, or per tensor), elect a sign per entry, merge the entries that agree with it
(mean or sum) and scale by lambda. Defaults reproduce the TIES paper code; the options cover
PEFT / mergekit / FusionBench behaviours (see docs/merging.md).

The model-wide trim threshold is found exactly in streaming passes before merging (the
`prepass` hook, see topk.py); entries whose elected sign is 0 take the model-wide majority sign,
known only after the main pass, so those rare blocks are deferred and merged at the end.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import engine
from ..grids import PAPER_ALPHAS, PAPER_DENSITIES
from ..io import TensorSource
from ..plan import MergePlan
from ..registry import DEFER, MergeMethod, Param, layer_value, register_method
from ..taskvectors import TaskVector
from ..topk import kth_rank_for_density, multi_thresholds, sample_entries, selection_dtype

TRIM_SCOPES = ("global", "per_tensor")
SIGN_METHODS = ("sum", "count")
DISJOINT_MODES = ("mean", "sum")
ZERO_SIGNS = ("majority", "positive")


def ties_thresholds(base: TensorSource, tasks: Sequence[TaskVector], plan: MergePlan, density: float,
                    progress=True) -> list[float | None]:
    """Each task's exact global threshold: the value `kthvalue` returns on its flattened |tau|."""
    total = sum(int(torch.Size(base.info(k)[0]).numel()) for k in plan.keys)
    ranks = [kth_rank_for_density(total, density)] * len(tasks)
    dtype = selection_dtype(base.info(k)[1] for k in plan.keys)
    passes = [0]
    gen = torch.Generator().manual_seed(1234)
    scratch = engine.Scratch()

    def read_pass(feed, fraction):
        passes[0] += 1
        what = "sampling" if fraction is not None else "counting"
        for key in engine._bar(plan.keys, f"TIES global threshold, pass {passes[0]} ({what})", progress):
            shape = base.info(key)[0]
            numel = int(torch.Size(shape).numel())
            if fraction is None:
                for rows in engine.pieces(shape):
                    pre = engine.base_piece(base, key, rows)
                    magnitudes = engine.stacked_deltas(tasks, key, pre, rows, scratch).abs_()
                    for t in range(len(tasks)):
                        feed(t, magnitudes[t], magnitudes=True)
            elif numel <= engine._SMALL_TENSOR or len(shape) < 2:
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
                   scratch=None):
    """Merged (unscaled) TIES delta of one tensor (or row block), the sum of its elected signs,
    and whether some entry has elected sign 0 while a trimmed entry there is non-zero (such
    entries need the model-wide majority sign)."""
    stacked = deltas if isinstance(deltas, torch.Tensor) else torch.stack(deltas)  # T x ... (modified in place)
    work = (scratch or engine.Scratch()).take(stacked.shape, stacked.dtype)  # a T x ... temporary, reused
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


def _thresholds(ctx) -> list:
    """The trim thresholds for the current tensor: model-wide, or this tensor's own (per task)."""
    if ctx.params["trim_scope"] == "global":
        return ctx.state["thresholds"]
    if "thresholds" not in ctx.key_state:  # per tensor: each task's whole tensor, one at a time
        pre_full = ctx.base.get(ctx.key)
        ctx.key_state["thresholds"] = [_per_tensor_threshold(tv.get(ctx.key, pre_full), ctx.params["density"])
                                       for tv in ctx.tasks]
    return ctx.key_state["thresholds"]


def prepass(ctx) -> None:
    p = ctx.params
    thresholds = None
    if p["trim_scope"] == "global":
        thresholds = ties_thresholds(ctx.base, ctx.tasks, ctx.plan, p["density"], ctx.progress)
    ctx.state.update(thresholds=thresholds, sign_total=0, work=engine.Scratch())
    ctx.report["thresholds"] = thresholds


def kernel(deltas, ctx):
    p = ctx.params
    if ctx.final:
        zero_sign = ctx.state["majority"]
    else:
        zero_sign = 1 if p["zero_sign"] == "positive" else None
    merged, elected_sum, ambiguous = ties_direction(deltas, _thresholds(ctx), p["sign_method"], p["disjoint"],
                                                    zero_sign, ctx.state["work"])
    if not ctx.final:
        ctx.state["sign_total"] += elected_sum
        if zero_sign is None and ambiguous:
            # The TIES reference gives these entries the sign held by most entries of the whole
            # model, known only after this pass: compute this block again at the end (rare).
            return DEFER
    scaling = layer_value(p["scaling"], ctx.key)  # one lambda, or per-layer rules
    return merged if scaling == 1.0 else scaling * merged


def after_pass(ctx) -> None:
    majority = 1 if ctx.state["sign_total"] >= 0 else -1  # a perfect balance counts as + (the reference would pick -)
    ctx.state["majority"] = majority
    ctx.report["majority_sign"] = majority
    ctx.report["deferred_keys"] = len({k for k, _ in ctx.deferred})


register_method(MergeMethod(
    name="ties",
    description="TIES-merging: trim to the top-density magnitudes, elect signs, merge agreeing entries, scale",
    params=[
        Param("scaling", "float", 1.0, "lambda, multiplies the merged task vector (or per-layer rules)",
              grid=PAPER_ALPHAS, symbol="lambda", per_layer=True),
        Param("density", "float", 0.2, "fraction of each task vector kept (mask rate = 1 - density)",
              low=0.0, high=1.0, low_open=True, grid=PAPER_DENSITIES),
        Param("trim_scope", "choice", "global", "global: whole model (paper); per_tensor: PEFT / mergekit",
              choices=TRIM_SCOPES),
        Param("sign_method", "choice", "sum", "sum: sign of the summed values (paper); count: majority of signs",
              choices=SIGN_METHODS),
        Param("disjoint", "choice", "mean", "mean of agreeing entries (paper) or their sum (FusionBench)",
              choices=DISJOINT_MODES),
        Param("zero_sign", "choice", "majority", "sign where the elected sign is 0: model-wide majority (paper) or +",
              choices=ZERO_SIGNS),
    ],
    kernel=kernel,
    prepass=prepass,
    after_pass=after_pass,
    label="TIES",
    short_label="TIES",
    linear_param="scaling",
    in_study=True,
    order=30,
))
