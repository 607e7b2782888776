"""The one merge executor: every registered method runs here, key by key and row block by row
block, from lazy task vectors, so memory stays near one tensor (block) per task. A method only
supplies a kernel over the stacked deltas of one block, plus optional hooks (a pre-pass over
all tensors, a step after the main pass); see registry.MergeMethod."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .io import TensorSource
from .plan import MergePlan
from . import registry
from .registry import DEFER, MergeContext, MergeMethod
from .taskvectors import NonFiniteError, TaskVector, TransformedTaskVector, all_finite, compute_dtype, nonfinite_error

logger = logging.getLogger(__name__)


def per_task(value, n: int, what: str) -> list[float]:
    """One coefficient per task from one number or a list of n numbers."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} values but there are {n} task vectors; give one number or one per task")
    return values


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


def base_piece(base: TensorSource, key: str, rows):
    return base.get(key) if rows is None else base.get_rows(key, *rows)


_base_piece = base_piece  # (old name)


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


def find_nonfinite(base: TensorSource, tasks: Sequence[TaskVector], keys) -> None:
    """Raise NonFiniteError naming the first model (pretrained first) and tensor of `keys`
    holding NaN/Inf; return if there is none."""
    for key in keys:
        pre = base.get(key)
        if pre.is_floating_point() and not all_finite(pre):
            raise nonfinite_error("pretrained model", base.name, key)
        for tv in tasks:
            if not all_finite(tv.get(key, pre)):
                raise nonfinite_error("fine-tuned model", tv.name, key)


def _data_methods() -> list[str]:
    from .registry import get_method, method_names

    return [m for m in method_names() if get_method(m).needs_data]


def run_method(method: MergeMethod, params: dict, base: TensorSource, tasks: Sequence[TaskVector], plan: MergePlan,
               sink, progress: bool = True, mode: str = "weights", desc: str | None = None,
               check_finite: bool = True, out_dtype: torch.dtype | None = None, data=None,
               stats_locations=None) -> dict:
    """Merge with `method` at the resolved `params` into `sink`; returns the method's report.

    mode="weights": the sink gets base_scale * theta_0 + merged delta in the pretrained dtype,
    (or `out_dtype`), then the non-float buffers. mode="delta": the sink gets the merged delta itself (float32/64)
    for every merged key, so coefficient search can reuse it along the method's linear parameter.

    check_finite: refuse NaN/Inf, naming the model and tensor. It costs one pass over each
    output block: NaN/Inf in an input reaches the output (or makes the method raise), and only
    then are that tensor's inputs scanned to name the culprit. A non-finite output from finite
    inputs (overflow) is refused too.
    """
    if mode not in ("weights", "delta"):
        raise ValueError(f"mode must be 'weights' or 'delta', got {mode!r}")
    method.check_num_tasks(len(tasks))
    tasks = list(tasks)
    if method.pre_transforms is not None:  # transforms that are part of the method (Breadcrumbs, DELLA)
        for name, tparams in method.pre_transforms(dict(params)):
            transform = registry.get_transform(name)
            tparams = registry.validate_transform_params(name, tparams)
            tasks = [TransformedTaskVector(tv, transform, tparams, i, base) for i, tv in enumerate(tasks)]
    ctx = MergeContext(method, dict(params), base, tasks, plan, progress)

    def guarded(step, keys):
        try:
            return step()
        except ValueError:
            if check_finite:
                find_nonfinite(base, ctx.tasks, keys())  # a clearer error if NaN/Inf caused it
            raise

    if method.needs_data:
        from .datastats import prepare

        prepare(ctx, data, stats_locations)
    elif data is not None:
        raise ValueError(f"method {method.name} does not read data; drop the data argument (methods that do: "
                         f"{[m for m in _data_methods()]})")
    if method.prepass is not None:
        guarded(lambda: method.prepass(ctx), lambda: plan.keys)
    scale = float(method.base_scale(ctx)) if method.base_scale is not None and mode == "weights" else 1.0
    scratch = Scratch()
    deferred = ctx.deferred

    def block(key, rows):
        ctx.rows = rows
        pre = ctx.pre = base_piece(base, key, rows)
        merged = guarded(lambda: method.kernel(stacked_deltas(ctx.tasks, key, pre, rows, scratch), ctx), lambda: [key])
        if merged is DEFER:
            if ctx.final:
                raise RuntimeError(f"method {method.name} deferred {key!r} again after the main pass")
            deferred.append((key, rows))
            return
        out = merged
        if mode == "weights":
            out = pre.to(merged.dtype)
            if scale != 1.0:
                out = out * scale
            out = (out + merged).to(out_dtype or pre.dtype)
        if check_finite and not all_finite(out):
            find_nonfinite(base, ctx.tasks, [key])
            raise NonFiniteError(f"merging {key!r} with {method.name} gives non-finite values although every input "
                                 "is finite (overflow?); check the coefficients")
        sink.write(key, out, rows[0] if rows else None)

    for key in _bar(plan.keys, desc or method.label, progress):
        ctx.key, ctx.key_state = key, {}
        for rows in ([None] if method.whole_tensors else pieces(base.info(key)[0])):
            block(key, rows)
    if method.after_pass is not None:
        method.after_pass(ctx)
    ctx.final = True
    current = None
    for key, rows in deferred:
        if key != current:
            ctx.key, ctx.key_state, current = key, {}, key
        block(key, rows)
    if mode == "weights":
        for key in plan.passthrough:
            sink.write(key, base.get(key))
    return ctx.report
