"""Merging on state dicts (`dict[str, Tensor]`): `merge(method, ...)` for any registered method,
and the named functions `task_vector`, `weighted_average`, `task_arithmetic`, `ties_merging`,
`dare`, `tsv_merging`, `iso_c`, `iso_cts`, `breadcrumbs`, `della`, `model_stock`, `slerp`.

Every function runs the same key-by-key engine as the on-disk merge (`merge_models`), so the
dict API and the streamed CLI give identical results. Task vectors of fp16/bf16 weights are
kept in float32; merged weights come back in the pretrained dtype. Integer/bool buffers are
copied from the pretrained model; tied weights (one storage under several names) are merged
once and the result is shared under all names again.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from . import registry
from .engine import run_method
from .io import DictSink, DictSource, TensorSource
from .plan import MergePlan, build_plan
from .taskvectors import CheckpointTaskVector, DictTaskVector, TaskVector, check_dare_args, dare_tensor, prepare_task_vectors

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


def _transforms(spec) -> list[tuple]:
    """[(Transform, params)] from [{name, ...params}] / ["dare"] / [("dare", {...})]."""
    items = [(s[0], dict(s[1])) if isinstance(s, tuple) else s for s in (spec or [])]
    items = [{"name": s[0], **s[1]} if isinstance(s, tuple) else s for s in items]
    return [(registry.get_transform(n), p) for n, p in registry.parse_transforms(items)]


def _run(method_name: str, base: TensorSource, plan: MergePlan, tasks: list[TaskVector], params: dict, order,
         transforms=(), allow_nonfinite: bool = False, data=None, report: dict | None = None) -> dict[str, torch.Tensor]:
    method = registry.get_method(method_name)
    resolved = registry.validate_params(method_name, params, num_tasks=len(tasks))
    if transforms and not method.takes_task_vectors:
        raise ValueError(f"transforms apply to task vectors; {method_name} merges the models themselves")
    tasks = prepare_task_vectors(tasks, base, transforms)
    sink = _dict_sink(base, plan)
    out = run_method(method, resolved, base, tasks, plan, sink, progress=False, check_finite=not allow_nonfinite,
                     data=data)
    if report is not None:
        report.update(out)
    return _finish(sink, plan, order)


def merge(method: str, pretrained: StateDict, task_vectors, transforms=None, allow_nonfinite: bool = False,
          data=None, report: dict | None = None, **params) -> dict[str, torch.Tensor]:
    """Merge task vectors into `pretrained` with any registered method:
    `merge("ties", theta0, [tau1, tau2], scaling=0.5, density=0.2)`.

    `transforms`: e.g. [{"name": "dare", "drop_rate": 0.5}] applied to every task vector first
    (task i uses DARE seed + i). Parameters are validated strictly (see registry.validate_params).
    NaN/Inf in the weights is refused unless `allow_nonfinite`. `data`: the MergeData of a
    method that reads data (RegMean, Fisher merging, AdaMerging; see data.py); task vectors given
    as a dict are matched to its tasks by name. `report`: a dict that receives the method's report
    (learned coefficients, statistics cache hits, ...).
    """
    tasks = _task_list(task_vectors)
    base, plan = _prepare(pretrained, tasks)
    return _run(method, base, plan, tasks, params, list(pretrained), _transforms(transforms), allow_nonfinite,
                data, report)


def merge_finetuned(method: str, pretrained: StateDict | None, finetuned, transforms=None,
                    allow_nonfinite: bool = False, data=None, report: dict | None = None,
                    **params) -> dict[str, torch.Tensor]:
    """Like `merge`, from fine-tuned state dicts. Methods that do not need the pretrained model
    (weighted average) take the first fine-tuned model as the reference, so their result is
    computed from the fine-tuned weights alone. `finetuned`: a list of state dicts, or a dict
    name -> state dict (names matched to the tasks of `data`)."""
    if isinstance(finetuned, Mapping) and finetuned and all(isinstance(v, Mapping) for v in finetuned.values()):
        names, finetuned = [str(k) for k in finetuned], list(finetuned.values())
    else:
        finetuned = list(finetuned)
        names = [f"model{i}" for i in range(len(finetuned))]
    if not finetuned:
        raise ValueError(f"{method} needs at least one fine-tuned state dict")
    m = registry.get_method(method)
    if m.needs_pretrained and pretrained is None:
        raise ValueError(f"method {method} needs the pretrained state dict")
    reference = pretrained if m.needs_pretrained else finetuned[0]
    ref_name = "pretrained" if m.needs_pretrained else "model0"
    base = DictSource(reference, ref_name)
    others = [DictSource(sd, name) for name, sd in zip(names, finetuned)]
    plan = build_plan(base, others if m.needs_pretrained else others[1:])
    tasks = [CheckpointTaskVector(o, o.name) for o in others]
    for tv in tasks:
        tv.check(plan.keys, base)
    return _run(method, base, plan, tasks, params, list(reference), _transforms(transforms), allow_nonfinite,
                data, report)


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
    return merge("task_arithmetic", pretrained, task_vectors, scaling=scaling)


def weighted_average(state_dicts: Sequence[StateDict], weights=None, normalize: bool = True) -> dict[str, torch.Tensor]:
    """sum_t w_t theta_t (uniform w_t = 1/T by default). With `normalize` the weights are divided
    by their sum. Integer/bool buffers are taken from the first model."""
    state_dicts = list(state_dicts)
    if not state_dicts:
        raise ValueError("weighted_average needs at least one state dict")
    params = {"normalize": normalize} if weights is None else {"weights": weights, "normalize": normalize}
    return merge_finetuned("weighted_average", None, state_dicts, **params)


def ties_merging(pretrained: StateDict, task_vectors, scaling: float = 1.0, density=0.2,
                 trim_scope: str = "global", sign_method: str = "sum", disjoint: str = "mean",
                 zero_sign: str = "majority", trim_count: str = "kthvalue", weights=None,
                 weighting: str = "mergekit", trim_rescale: str = "none") -> dict[str, torch.Tensor]:
    """TIES-merging: trim each task vector to its top `density` fraction by magnitude (over the
    whole model with trim_scope="global", or per tensor), elect a sign per entry (sign of the sum
    of trimmed values, or of the count of signs), average (or sum) the entries agreeing with it,
    and add `scaling` times the result to the pretrained weights. Defaults = TIES paper code.

    `density` may be one number per task; `weights` (one per task) weight the trimmed task
    vectors inside the disjoint mean (`weighting` "mergekit" or "peft"); `trim_count` "exact" /
    "exact_min1" keep exactly int(n*density) / max(1, int(n*density)) entries per tensor (PEFT /
    mergekit); `trim_rescale="l1"` scales each trimmed tensor back to its L1 norm (mergekit's
    `rescale: true`). See docs/merging.md for the settings that reproduce each tool."""
    if isinstance(scaling, (list, tuple)) and all(isinstance(x, (int, float)) for x in scaling):
        raise registry.ParamError(
            f"ties_merging scaling is lambda, one number that multiplies the merged task vector, got {list(scaling)}; "
            "for one coefficient per task pass weights=[...] (they weight the task vectors inside the disjoint "
            "mean), or use task_arithmetic(scaling=[...])")
    params = dict(scaling=scaling, density=density, trim_scope=trim_scope, sign_method=sign_method,
                  disjoint=disjoint, zero_sign=zero_sign, trim_count=trim_count, weighting=weighting,
                  trim_rescale=trim_rescale)
    if weights is not None:
        params["weights"] = weights
    return merge("ties", pretrained, task_vectors, **params)


def dare(task_vector: StateDict, drop_rate: float, seed: int = 0, rescale=True) -> dict[str, torch.Tensor]:
    """DARE: drop each entry with probability `drop_rate` and rescale the survivors by
    1/(1-drop_rate) (rescale=True / "inverse"), to the original L1 norm per tensor ("l1",
    mergekit-style) or not at all (False). The random mask depends only on (seed, key), so the
    streamed merge drops exactly the same entries. Use a different seed per task."""
    p = registry.validate_transform_params("dare", {"drop_rate": drop_rate, "seed": seed,
                                                    "rescale": "none" if rescale is None else rescale})
    if isinstance(p["drop_rate"], list):
        raise registry.ParamError("dare() transforms one task vector: give one drop_rate (per-task lists are for "
                                  "merge(..., transforms=[{'name': 'dare', 'drop_rate': [...]}]))")
    mode = check_dare_args(p["drop_rate"], p["rescale"])
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
        out[k] = seen[ident] = dare_tensor(t, p["drop_rate"], p["seed"], k, mode)
    return out


def regmean(finetuned, data, pretrained: StateDict | None = None, alpha: float = 0.9, examples: int = 256,
            split: str = "train", report: dict | None = None) -> dict[str, torch.Tensor]:
    """RegMean (Jin et al. 2023): every linear layer W = (sum_i G_i)^-1 sum_i G_i W_i with G_i the
    Gram matrix (mean of x x^T) of that layer's inputs on task i's first `examples` examples, its
    off-diagonal entries scaled by `alpha`; other tensors averaged. `finetuned`: the fine-tuned
    state dicts, as a list or a dict task name -> state dict; `data`: a MergeData (data.py).
    `pretrained` is accepted for symmetry and not needed: the result depends on the fine-tuned
    models only (the first one is the reference of the deltas).
    Gram matrices are cached per MergeData object, so changing only alpha does not re-read data."""
    return merge_finetuned("regmean", pretrained, finetuned, data=data, report=report, alpha=alpha,
                           examples=examples, split=split)


def fisher_merging(finetuned, data, pretrained: StateDict | None = None, weights=None, epsilon: float = 1e-6,
                   normalize: bool = True, examples: int = 256, estimator: str = "exact", seed: int = 0,
                   split: str = "train", report: dict | None = None) -> dict[str, torch.Tensor]:
    """Fisher merging (Matena & Raffel 2022): theta = sum_i c_i F_i theta_i / sum_i c_i F_i per
    entry, F_i the diagonal (true) Fisher of model i on its task's inputs floored at `epsilon`,
    c_i = weights_i / ||F_i|| with `normalize` (paper code defaults). See methods/fisher_merging.py.
    `pretrained` is not needed (as for `regmean`); the Fisher statistics are cached per `data`."""
    params = {"epsilon": epsilon, "normalize": normalize, "examples": examples, "estimator": estimator,
              "seed": seed, "split": split}
    if weights is not None:
        params["weights"] = weights
    return merge_finetuned("fisher_merging", pretrained, finetuned, data=data, report=report, **params)


def adamerging(pretrained: StateDict, task_vectors, data, granularity: str = "layer", base: str = "task_arithmetic",
               init: float = 0.3, lr: float = 1e-3, steps: int = 100, batches_per_step: int = 2, clamp: bool = True,
               density: float = 0.2, split: str = "test", report: dict | None = None) -> dict[str, torch.Tensor]:
    """AdaMerging (Yang et al. 2024): theta_0 + sum_t lambda_t tau_t with lambda (one per task, or
    one per task and tensor with granularity="layer") learned by Adam on the entropy of the
    merged model's predictions on each task's unlabeled inputs; base="ties" is AdaMerging++.
    Paper: init 0.3, lr 1e-3, 500 steps. The learned coefficients are put in `report`
    (report["adamerging"]["coefficients"])."""
    return merge("adamerging", pretrained, task_vectors, data=data, report=report, granularity=granularity,
                 base=base, init=init, lr=lr, steps=steps, batches_per_step=batches_per_step, clamp=clamp,
                 density=density, split=split)


def tsv_merging(pretrained: StateDict, task_vectors, scaling=1.0, fraction: float | None = None) -> dict[str, torch.Tensor]:
    """TSV-M (Gargiulo et al. 2025): per 2-D weight, each task's top 1/T (or `fraction`) singular
    components, left and right vectors orthogonalised across tasks, recombined with their singular
    values; other tensors averaged; theta_0 + scaling * merged (paper: scaling 1.0)."""
    params = {"scaling": scaling} if fraction is None else {"scaling": scaling, "fraction": fraction}
    return merge("tsv_merging", pretrained, task_vectors, **params)


def iso_c(pretrained: StateDict, task_vectors, scaling=1.0) -> dict[str, torch.Tensor]:
    """Iso-C (Marczak et al. 2025): per 2-D weight, the summed task matrices with every singular
    value replaced by their mean; other tensors averaged; theta_0 + scaling * merged."""
    return merge("iso_c", pretrained, task_vectors, scaling=scaling)


def iso_cts(pretrained: StateDict, task_vectors, scaling=1.0, common_space_fraction: float = 0.8) -> dict[str, torch.Tensor]:
    """Iso-CTS (Marczak et al. 2025): Iso-C's common subspace (a `common_space_fraction` of the
    directions) plus each task's top directions orthogonal to it, orthogonalised, flat spectrum."""
    return merge("iso_cts", pretrained, task_vectors, scaling=scaling, common_space_fraction=common_space_fraction)


def breadcrumbs(pretrained: StateDict, task_vectors, scaling=1.0, density: float = 0.1,
                beta: float = 0.01) -> dict[str, torch.Tensor]:
    """Model Breadcrumbs (Davari & Belilovsky 2024): per tensor, drop the `beta` largest and the
    smallest magnitudes of each task vector (`density` kept), then theta_0 + scaling * sum."""
    return merge("breadcrumbs", pretrained, task_vectors, scaling=scaling, density=density, beta=beta)


def della(pretrained: StateDict, task_vectors, scaling=1.0, density: float = 0.5, epsilon: float = 0.1,
          seed: int = 0, rescale: str = "inverse", sign_method: str = "sum", disjoint: str = "mean",
          zero_sign: str = "positive") -> dict[str, torch.Tensor]:
    """DELLA (Deep et al. 2024): MagPrune each task vector (keep probability density -/+ epsilon
    by magnitude rank within each row, survivors rescaled; task i uses seed + i), then TIES sign
    election and disjoint mean, theta_0 + scaling * merged."""
    return merge("della", pretrained, task_vectors, scaling=scaling, density=density, epsilon=epsilon, seed=seed,
                 rescale=rescale, sign_method=sign_method, disjoint=disjoint, zero_sign=zero_sign)


def model_stock(pretrained: StateDict, task_vectors, filter_wise: bool = False) -> dict[str, torch.Tensor]:
    """Model Stock (Jang et al. 2024): per tensor (or row), theta_0 + t * mean(tau) with
    t = k cos / (1 + (k-1) cos) from the mean pairwise cosine of the k >= 2 task vectors."""
    return merge("model_stock", pretrained, task_vectors, filter_wise=filter_wise)


def slerp(model_a: StateDict, model_b: StateDict, t=0.5, dot_threshold: float = 0.9995) -> dict[str, torch.Tensor]:
    """SLERP between two fine-tuned state dicts, tensor by tensor (t = 0: model_a, t = 1:
    model_b), linear interpolation for near-parallel tensors. `t` may be per-layer rules."""
    return merge_finetuned("slerp", None, [model_a, model_b], t=t, dot_threshold=dot_threshold)
