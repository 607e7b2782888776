"""Merging methods on state dicts (`dict[str, Tensor]`).

Every function runs the same key-by-key engine as the on-disk merge (`merge_models`), so the
dict API and the streamed CLI give identical results. Task vectors of fp16/bf16 weights are
kept in float32; merged weights come back in the pretrained dtype. Integer/bool buffers are
copied from the pretrained model; tied weights (one storage under several names) are merged
once and the result is shared under all names again.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .engine import check_ties_args, linear_merge, per_task, ties_merge
from .io import DictSink, DictSource, TensorSource
from .plan import MergePlan, build_plan
from .taskvectors import CheckpointTaskVector, DictTaskVector, TaskVector, check_dare_args, dare_tensor

StateDict = Mapping[str, torch.Tensor]


def _dict_sink(base: TensorSource, plan: MergePlan) -> DictSink:
    return DictSink({k: base.info(k)[0] for k in plan.keys})


def _finish(sink: DictSink, plan: MergePlan, order: Sequence[str]) -> dict[str, torch.Tensor]:
    out = sink.close()
    for alias, canonical in plan.aliases.items():
        out[alias] = out[canonical]  # tied again: one tensor under every name
    return {k: out[k] for k in order if k in out}


def _task_list(task_vectors) -> list[TaskVector]:
    if isinstance(task_vectors, Mapping) and task_vectors and all(isinstance(v, Mapping) for v in task_vectors.values()):
        items = list(task_vectors.items())  # {task name: task vector}
    elif isinstance(task_vectors, Mapping):
        raise TypeError("task_vectors must be a list of task-vector dicts (or a dict name -> task-vector dict), not one state dict")
    else:
        items = [(f"task{i}", tv) for i, tv in enumerate(task_vectors)]
    if not items:
        raise ValueError("no task vectors given")
    return [tv if isinstance(tv, TaskVector) else DictTaskVector(tv, name) for name, tv in items]


def _prepare(pretrained: StateDict, tasks: list[TaskVector]) -> tuple[TensorSource, MergePlan]:
    base = pretrained if isinstance(pretrained, TensorSource) else DictSource(pretrained, "pretrained")
    plan = build_plan(base)
    for tv in tasks:
        plan.notes.extend(tv.check(plan.keys, base))
    return base, plan


def task_vector(pretrained: StateDict, finetuned: StateDict) -> dict[str, torch.Tensor]:
    """tau = finetuned - pretrained for every floating-point tensor (int/bool buffers skipped).

    A key missing on either side or a shape/dtype mismatch raises an error naming the key.
    """
    base = DictSource(pretrained, "pretrained")
    ft = DictSource(finetuned, "finetuned")
    plan = build_plan(base, [ft])
    tv = CheckpointTaskVector(ft, "finetuned")
    tv.check(plan.keys, base)
    extra = [k for k in finetuned if k not in pretrained]
    if extra:
        raise KeyError(f"key {extra[0]!r} is in the fine-tuned state dict but not in the pretrained one")
    sink = DictSink()
    for k in plan.keys:
        sink.write(k, tv.get(k, pretrained[k]))
    return _finish(sink, plan, [k for k in pretrained if k not in plan.passthrough])


def task_arithmetic(pretrained: StateDict, task_vectors, scaling=0.4) -> dict[str, torch.Tensor]:
    """theta_0 + sum_t alpha_t tau_t; `scaling` is one alpha for all tasks or one per task."""
    tasks = _task_list(task_vectors)
    coeffs = per_task(scaling, len(tasks), "scaling")
    base, plan = _prepare(pretrained, tasks)
    sink = _dict_sink(base, plan)
    linear_merge(base, tasks, plan, coeffs, 1.0, sink, progress=False)
    return _finish(sink, plan, list(pretrained))


def weighted_average(state_dicts: Sequence[StateDict], weights=None, normalize: bool = True) -> dict[str, torch.Tensor]:
    """sum_t w_t theta_t (uniform w_t = 1/T by default). With `normalize` the weights are divided
    by their sum. Integer/bool buffers are taken from the first model."""
    state_dicts = list(state_dicts)
    if not state_dicts:
        raise ValueError("weighted_average needs at least one state dict")
    w = per_task(1.0 if weights is None else weights, len(state_dicts), "weights")
    if normalize:
        total = sum(w)
        if total == 0:
            raise ValueError("weights sum to 0; cannot normalize (pass normalize=False)")
        w = [x / total for x in w]
    first = DictSource(state_dicts[0], "model0")
    others = [DictSource(sd, f"model{i}") for i, sd in enumerate(state_dicts)]
    plan = build_plan(first, others[1:])
    tasks = [CheckpointTaskVector(o, o.name) for o in others]
    for tv in tasks:
        tv.check(plan.keys, first)
    sink = _dict_sink(first, plan)
    # sum_t w_t theta_t = (sum_t w_t) theta_0 + sum_t w_t (theta_t - theta_0), with theta_0 = first model.
    linear_merge(first, tasks, plan, w, sum(w), sink, progress=False)
    return _finish(sink, plan, list(state_dicts[0]))


def ties_merging(pretrained: StateDict, task_vectors, scaling: float = 1.0, density: float = 0.2,
                 trim_scope: str = "global", sign_method: str = "sum", disjoint: str = "mean",
                 zero_sign: str = "majority") -> dict[str, torch.Tensor]:
    """TIES-merging: trim each task vector to its top `density` fraction by magnitude (over the
    whole model with trim_scope="global", or per tensor), elect a sign per entry (sign of the sum
    of trimmed values, or of the count of signs), average (or sum) the entries agreeing with it,
    and add `scaling` times the result to the pretrained weights. Defaults = TIES paper code."""
    check_ties_args(density, trim_scope, sign_method, disjoint, zero_sign)
    tasks = _task_list(task_vectors)
    base, plan = _prepare(pretrained, tasks)
    sink = _dict_sink(base, plan)
    ties_merge(base, tasks, plan, float(scaling), density, trim_scope, sign_method, disjoint, zero_sign, sink, progress=False)
    return _finish(sink, plan, list(pretrained))


def dare(task_vector: StateDict, drop_rate: float, seed: int = 0, rescale=True) -> dict[str, torch.Tensor]:
    """DARE: drop each entry with probability `drop_rate` and rescale the survivors by
    1/(1-drop_rate) (rescale=True / "inverse"), to the original L1 norm per tensor ("l1",
    mergekit-style) or not at all (False). The random mask depends only on (seed, key), so the
    streamed merge drops exactly the same entries. Use a different seed per task."""
    mode = check_dare_args(drop_rate, rescale)
    out = {}
    seen: dict[int, torch.Tensor] = {}
    for k, t in task_vector.items():
        if not t.is_floating_point():
            out[k] = t
            continue
        ident = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if ident in seen and seen[ident].shape == t.shape:  # tied: same drop once
            out[k] = seen[ident]
            continue
        out[k] = seen[ident] = dare_tensor(t, drop_rate, seed, k, mode)
    return out
