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
from ..registry import DEFER, MergeMethod, Param, ParamError, layer_value, register_method
from ..taskvectors import TaskVector
from ..topk import kth_rank_for_density, multi_thresholds, sample_entries, selection_dtype

TRIM_SCOPES = ("global", "per_tensor")
# How many entries a trim keeps (docs/merging.md, "Which setting reproduces which tool"):
#   kthvalue:    every |x| >= the kthvalue threshold (TIES paper code, FusionBench; ties at the
#                threshold are all kept, so possibly more than int(n*d))
#   exact:       exactly int(n*d) entries (PEFT's topk; 0 if n*d < 1)
#   exact_min1:  exactly max(1, int(n*d)) entries (mergekit's magnitude sparsification)
# Exact counts break ties at the threshold by position (lowest flat index first); PEFT and
# mergekit leave that order to their sort, so they agree whenever the k-th magnitude is unique.
TRIM_COUNTS = ("kthvalue", "exact", "exact_min1")
# With per-model weights: mergekit multiplies the trimmed deltas by the weights before electing
# signs and divides the kept sum by the sum of the weights of the agreeing models; PEFT elects
# signs on the unweighted values and divides by the number of agreeing models.
WEIGHTINGS = ("mergekit", "peft")
# mergekit's `rescale: true` for ties: after the per-tensor trim, each task's tensor is scaled
# back to its L1 norm (left as is when either norm is below 1e-7).
TRIM_RESCALES = ("none", "l1")
L1_RESCALE_EPS = 1e-7
SIGN_METHODS = ("sum", "count")
DISJOINT_MODES = ("mean", "sum")
ZERO_SIGNS = ("majority", "positive")


def ties_thresholds(base: TensorSource, tasks: Sequence[TaskVector], plan: MergePlan, density,
                    progress=True) -> list[float | None]:
    """Each task's exact global threshold: the value `kthvalue` returns on its flattened |tau|.
    `density`: one number, or one per task."""
    total = sum(int(torch.Size(base.info(k)[0]).numel()) for k in plan.keys)
    densities = engine.per_task(density, len(tasks), "density")
    ranks = [kth_rank_for_density(total, d) for d in densities]
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


def exact_keep_count(numel: int, density: float, trim_count: str) -> int:
    """Entries an exact trim keeps: int(n*d) (PEFT) or max(1, int(n*d)) (mergekit); all at d >= 1."""
    if density >= 1.0:
        return numel
    k = int(density * numel)  # (the product in this order, as PEFT and mergekit compute it)
    return max(1, k) if trim_count == "exact_min1" and numel > 0 else k


def exact_trim(delta: torch.Tensor, density: float, trim_count: str):
    """Trim rule keeping exactly k entries of the largest magnitude: None (keep all), a threshold
    (when the entries >= the k-th magnitude are exactly k), or a bool mask (ties at the threshold
    are broken by position, lowest flat index first; or k = 0)."""
    n = delta.numel()
    k = exact_keep_count(n, density, trim_count)
    if k >= n:
        return None
    if k == 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    mags = delta.reshape(-1).abs()
    thr = mags.kthvalue(n - k + 1).values  # the k-th largest magnitude
    if int(torch.count_nonzero(mags >= thr)) == k:  # no tie at the threshold (the usual case)
        return thr.item()
    above = mags > thr
    need = k - int(torch.count_nonzero(above))
    at_positions = (mags == thr).nonzero().squeeze(1)[:need]
    above[at_positions] = True
    return above.reshape(delta.shape)


def ties_direction(deltas, thresholds: list, sign_method: str, disjoint: str, zero_sign_value: int | None,
                   scratch=None, weights: Sequence[float] | None = None, weighting: str = "mergekit",
                   scales: Sequence | None = None):
    """Merged (unscaled) TIES delta of one tensor (or row block), the sum of its elected signs,
    and whether some entry has elected sign 0 while a trimmed entry there is non-zero (such
    entries need the model-wide majority sign).

    thresholds: per task, None (keep all), a magnitude threshold (keep |x| >= it) or a bool mask
    of this block (exact trims). weights: per-task weights (None: unweighted, the paper), used
    as `weighting` says (WEIGHTINGS). scales: per-task factors (or None) applied right after the
    trim (trim_rescale l1)."""
    stacked = deltas if isinstance(deltas, torch.Tensor) else torch.stack(deltas)  # T x ... (modified in place)
    if any(isinstance(thr, torch.Tensor) for thr in thresholds) or scales is not None:
        for t, thr in enumerate(thresholds):  # exact trims: masks per task (thresholds where no tie)
            if isinstance(thr, torch.Tensor):
                stacked[t].mul_(thr)
            elif thr is not None:
                stacked[t].mul_(stacked[t].abs() >= thr)
            if scales is not None and scales[t] is not None:
                stacked[t].mul_(scales[t])
        thresholds = [None] * len(thresholds)
    work = (scratch or engine.Scratch()).take(stacked.shape, stacked.dtype)  # a T x ... temporary, reused
    if weights is not None:
        return _weighted_direction(stacked, thresholds, sign_method, disjoint, zero_sign_value, weights, weighting,
                                   work)
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


def _weighted_direction(stacked, thresholds, sign_method, disjoint, zero_sign_value, weights, weighting, work):
    """TIES with per-task weights (trimmed `stacked`, modified in place; `work`: a T x ...
    scratch buffer). mergekit: signs elected on the weighted deltas, mean = kept sum / sum of
    the weights of the agreeing tasks; PEFT: signs elected on the unweighted deltas, mean = kept
    weighted sum / number of agreeing tasks."""
    shape = (-1, *([1] * (stacked.dim() - 1)))
    if any(thr is not None for thr in thresholds):
        thr = torch.tensor([-1.0 if t is None else t for t in thresholds], dtype=stacked.dtype)
        stacked.mul_(torch.ge(torch.abs(stacked, out=work), thr.view(shape), out=work))
    w = torch.tensor(list(weights), dtype=stacked.dtype).view(shape)
    if weighting == "mergekit":
        stacked.mul_(w)
    summed = stacked.sum(0)
    if bool(torch.isnan(summed).any()):  # (NaN has sign 0 and would pass silently)
        raise ValueError("a task vector contains NaN (or inf - inf); fix the checkpoint before merging")
    elected = torch.sign(summed if sign_method == "sum" else torch.sign(torch.sign(stacked, out=work).sum(0)))
    elected_sum = int(elected.sum().item())
    zero = elected == 0
    ambiguous = False
    if zero_sign_value is not None:
        # (where every entry is 0 the sign changes nothing: no entry agrees with either sign)
        elected = torch.where(zero, torch.full_like(elected, zero_sign_value), elected)
    elif bool(zero.any()):  # the caller defers blocks with a non-zero entry where the elected sign is 0
        where_zero = zero.reshape(-1).nonzero().squeeze(1)
        ambiguous = bool(stacked.reshape(len(stacked), -1).index_select(1, where_zero).any())
    agree = torch.mul(stacked, elected, out=work) > 0  # non-zero entries with the elected sign
    if weighting == "peft":
        stacked.mul_(w)
    merged = stacked.mul_(agree).sum(0)
    if disjoint == "mean":
        if weighting == "mergekit":
            divisor = torch.mul(w, agree, out=work).sum(0)
            divisor[divisor == 0] = 1
        else:
            divisor = agree.sum(0).to(stacked.dtype).clamp_(min=1)
        merged = merged / divisor
    return merged, elected_sum, ambiguous


def _l1_scale(delta: torch.Tensor, rule):
    """mergekit's L1 rescale of a trimmed tensor: norm(delta) / norm(trimmed) as a 0-d tensor,
    or None (nothing trimmed, or a norm below 1e-7)."""
    if rule is None:
        return None
    trimmed = delta * rule if isinstance(rule, torch.Tensor) else delta * (delta.abs() >= rule)
    before, after = delta.abs().sum(), trimmed.abs().sum()
    if before < L1_RESCALE_EPS or after < L1_RESCALE_EPS:
        return None
    return before / after


def _thresholds(ctx) -> list:
    """The trim rules for the current tensor (block): model-wide thresholds, or this tensor's
    own per task (a threshold, or for exact counts with ties a bool mask, sliced to the block).
    With trim_rescale l1 also each task's L1 factor (ctx.key_state["scales"])."""
    p = ctx.params
    if p["trim_scope"] == "global":
        return ctx.state["thresholds"]
    if "thresholds" not in ctx.key_state:  # per tensor: each task's whole tensor, one at a time
        pre_full = ctx.base.get(ctx.key)
        densities = engine.per_task(p["density"], ctx.num_tasks, "density")
        rules, scales = [], []
        for tv, d in zip(ctx.tasks, densities):
            delta = tv.get(ctx.key, pre_full)
            rule = _per_tensor_threshold(delta, d) if p["trim_count"] == "kthvalue" else exact_trim(delta, d, p["trim_count"])
            rules.append(rule)
            if p["trim_rescale"] == "l1":
                scales.append(_l1_scale(delta, rule))
        ctx.key_state["thresholds"] = rules
        ctx.key_state["scales"] = scales if p["trim_rescale"] == "l1" else None
    rules = ctx.key_state["thresholds"]
    if ctx.rows is not None and any(isinstance(r, torch.Tensor) for r in rules):
        rules = [r[ctx.rows[0]:ctx.rows[1]] if isinstance(r, torch.Tensor) else r for r in rules]
    return rules


def prepass(ctx) -> None:
    p = ctx.params
    thresholds = None
    if p["trim_scope"] == "global":
        thresholds = ties_thresholds(ctx.base, ctx.tasks, ctx.plan, p["density"], ctx.progress)
    if p.get("weights") is not None:
        p["weights"] = engine.per_task(p["weights"], ctx.num_tasks, "weights")
    ctx.state.update(thresholds=thresholds, sign_total=0, work=engine.Scratch())
    ctx.report["thresholds"] = thresholds


def kernel(deltas, ctx):
    p = ctx.params
    if ctx.final:
        zero_sign = ctx.state["majority"]
    else:
        zero_sign = 1 if p["zero_sign"] == "positive" else None
    merged, elected_sum, ambiguous = ties_direction(deltas, _thresholds(ctx), p["sign_method"], p["disjoint"],
                                                    zero_sign, ctx.state["work"], p.get("weights"), p["weighting"],
                                                    ctx.key_state.get("scales"))
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


def check(params: dict, num_tasks: int | None) -> None:
    if params["trim_rescale"] != "none" and params["trim_scope"] != "per_tensor":
        raise ParamError("ties trim_rescale l1 rescales each tensor after its own trim (mergekit); "
                         "set trim_scope: per_tensor")
    if params["trim_count"] != "kthvalue" and params["trim_scope"] != "per_tensor":
        raise ParamError(f"ties trim_count {params['trim_count']} counts entries per tensor (PEFT / mergekit); "
                         "set trim_scope: per_tensor, or use trim_count: kthvalue with trim_scope: global")


register_method(MergeMethod(
    name="ties",
    description="TIES-merging: trim to the top-density magnitudes, elect signs, merge agreeing entries, scale",
    params=[
        Param("scaling", "float", 1.0, "lambda, multiplies the merged task vector (or per-layer rules)",
              grid=PAPER_ALPHAS, symbol="lambda", per_layer=True),
        Param("density", "per_task_float", 0.2, "fraction of each task vector kept (mask rate = 1 - density); "
              "one number, or a list with one per model", low=0.0, high=1.0, low_open=True, grid=PAPER_DENSITIES),
        Param("trim_scope", "choice", "global", "global: whole model (paper); per_tensor: PEFT / mergekit",
              choices=TRIM_SCOPES),
        Param("trim_count", "choice", "kthvalue", "kthvalue: keep |x| >= the kthvalue threshold (paper, FusionBench); "
              "exact: exactly int(n*density) (PEFT); exact_min1: max(1, int(n*density)) (mergekit); "
              "exact counts need trim_scope per_tensor", choices=TRIM_COUNTS),
        Param("trim_rescale", "choice", "none", "none: trimmed entries keep their values (paper, PEFT); l1: scale "
              "each trimmed tensor back to its L1 norm (mergekit's rescale: true; needs trim_scope per_tensor)",
              choices=TRIM_RESCALES),
        Param("weights", "per_task_float", None, "per-model weights of the trimmed task vectors (omit: unweighted, "
              "paper); one number or one per model"),
        Param("weighting", "choice", "mergekit", "with weights - mergekit: elect signs on weighted values, mean "
              "divides by the sum of agreeing weights; peft: elect on unweighted values, mean divides by the count",
              choices=WEIGHTINGS),
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
    check=check,
    label="TIES",
    short_label="TIES",
    linear_param="scaling",
    in_study=True,
    order=30,
))
