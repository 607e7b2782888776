"""Merging-coefficient search on validation data (the SAFT paper's protocol), for any
registered method.

Grids come from the registry (the paper's: one shared alpha in {0.1, 0.3, 0.5, 0.7, 0.9, 1.0}
for task arithmetic; lambda x density {0.3, 0.2, 0.1} for TIES; DARE drop rate in {0.1, 0.3,
0.5, 0.7, 0.9}); `grid=` overrides or adds values for any parameter of the method or of its
transforms. A method without a grid is evaluated once at its defaults. Each grid point is
scored by the mean normalized validation accuracy over tasks (merged acc / that task's
fine-tuned acc; mean absolute accuracy when no fine-tuned accuracies are given). With
selection="per_task" the best point is also chosen per task, as the published SAFT code did.

Work independent of a method's linear parameter (its `linear_param`, e.g. scaling) is done once
per setting of the other parameters: the merged direction (sum of task vectors, the TIES
trimmed/elected/disjoint-merged delta, ...) is cached, so each alpha costs one
`theta_0 + alpha * direction` and one evaluation.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from ..evaluation import normalized_accuracy
from . import registry
from .api import _dict_sink, _finish, _prepare, _task_list
from .engine import run_method
from .grids import PAPER_ALPHAS, PAPER_DENSITIES, PAPER_DROP_RATES  # noqa: F401  (re-exported)
from .io import DictSink
from .taskvectors import prepare_task_vectors

def default_grid(method: str) -> dict:
    """{parameter: values} searched by default for a method or search alias (transforms' first)."""
    m, transforms = registry.resolve_search_name(method)
    out = {}
    for name in transforms:
        out.update(registry.get_transform(name).grid())
    out.update(m.grid())
    return out


@dataclasses.dataclass
class GridPoint:
    params: dict
    absolute: dict
    normalized: dict | None
    score: float


@dataclasses.dataclass
class SearchResult:
    method: str
    selection: str
    score_name: str
    points: list[GridPoint]
    best: GridPoint
    per_task_best: dict  # task -> {"params", "absolute", "normalized"}
    finetuned_accuracy: dict | None = None
    fixed_params: dict = dataclasses.field(default_factory=dict)
    merge_method: str | None = None  # the registered method (`method` may be a search alias)
    transforms: list = dataclasses.field(default_factory=list)  # [{name, fixed params}]
    param_sources: dict = dataclasses.field(default_factory=dict)  # grid key -> "method" or transform name

    def best_merge_config(self) -> dict:
        """{method, params, transforms} of the best point, for MergeConfig / merge_models."""
        return self.merge_config_for(self.best.params)

    def merge_config_for(self, point_params: Mapping) -> dict:
        params = dict(self.fixed_params)
        fixed_t = {t["name"]: {k: v for k, v in t.items() if k != "name"} for t in self.transforms}
        for key, value in point_params.items():
            owner = self.param_sources.get(key, "method")
            (params if owner == "method" else fixed_t[owner])[key.rpartition(".")[2]] = value
        return {"method": self.merge_method or self.method, "params": params,
                "transforms": [{"name": n, **p} for n, p in fixed_t.items()]}

    @property
    def best_params(self) -> dict:
        return dict(self.best.params)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from ..io_utils import write_text_atomic

            write_text_atomic(Path(path), text + "\n")
        return text


def _score(absolute: Mapping[str, float], finetuned: Mapping[str, float] | None):
    absolute = {t: float(a) for t, a in absolute.items()}
    if finetuned is None:
        return absolute, None, sum(absolute.values()) / len(absolute)
    missing = [t for t in absolute if t not in finetuned]
    if missing:
        raise KeyError(f"no fine-tuned accuracy for task(s) {missing}; pass finetuned_accuracy for every evaluated task")
    norm = {t: normalized_accuracy(a, float(finetuned[t])) for t, a in absolute.items()}
    return absolute, norm, sum(norm.values()) / len(norm)




def _space(method, transforms, grid, fixed_method: dict, fixed_transforms: dict) -> tuple[dict, dict]:
    """The searched values {key: [values]} in loop order (transforms' params, then the method's,
    its linear parameter last) and {key: owner} ("method" or a transform name). Transform
    parameters are named plainly unless another owner has a parameter of that name, then
    "transform.param"."""
    owners: dict[str, list] = {}
    for p in method.params:
        owners.setdefault(p.name, []).append(("method", p))
    for t in transforms:
        for p in t.params:
            owners.setdefault(p.name, []).append((t.name, p))
    keys = {}  # key -> (owner, Param)
    for t in transforms:
        for p in t.params:
            keys[p.name if len(owners[p.name]) == 1 else f"{t.name}.{p.name}"] = (t.name, p)
    for p in method.params:
        keys[p.name] = ("method", p)
    grid = dict(grid or {})
    unknown = [k for k in grid if k not in keys]
    if unknown:
        raise ValueError(f"grid keys {sorted(unknown)} do not apply to {method.name}"
                         f"{' with ' + ', '.join(t.name for t in transforms) if transforms else ''}; allowed {sorted(keys)}")
    values = {}
    for key, (owner, p) in keys.items():
        fixed = fixed_method if owner == "method" else fixed_transforms.get(owner, {})
        if key in grid:
            vals = grid[key]
        elif p.grid is not None and p.name not in fixed:
            vals = list(p.grid)
        else:
            continue
        if isinstance(vals, (str, bytes)) or not isinstance(vals, (list, tuple)) or not vals:
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {vals!r}")
        values[key] = [registry.check_value(p, v, f"grid {key}") for v in vals]
    order = [k for k in values if keys[k][0] != "method"] + \
        [k for k in values if keys[k][0] == "method" and k != method.linear_param] + \
        [k for k in values if k == method.linear_param]
    return {k: values[k] for k in order}, {k: keys[k][0] for k in order}


def search_coefficients(
    pretrained: Mapping[str, torch.Tensor],
    task_vectors,
    evaluate: Callable[[dict], Mapping[str, float]],
    method: str = "task_arithmetic",
    grid: Mapping[str, list] | None = None,
    finetuned_accuracy: Mapping[str, float] | None = None,
    selection: str = "mean",
    ties_options: Mapping | None = None,
    dare_seed: int = 0,
    dare_rescale=True,
    progress: bool = True,
    params: Mapping | None = None,
    transforms=None,
    allow_nonfinite: bool = False,
) -> SearchResult:
    """Evaluate every grid point with `evaluate(merged_state_dict) -> {task: accuracy}`.

    method: any registered method (`registry.method_names()`) or search alias
    ("dare_task_arithmetic", "dare_ties" = the method with DARE in front). `grid` overrides the
    default grid ({param: [values]}, for the method's or a transform's parameters). `params`:
    fixed method parameters (`ties_options` is the old name for TIES's trim_scope / sign_method /
    disjoint / zero_sign). `transforms`: extra transforms, e.g. [{"name": "dare", "seed": 3}];
    `dare_seed` / `dare_rescale` set DARE's seed / rescale. The evaluation callable must not keep
    references to the state dict it gets (it is rebuilt per point).
    """
    if method not in registry.search_names():
        raise ValueError(f"unknown search method {method!r}; choose one of {registry.search_names()}")
    if selection not in ("mean", "per_task"):
        raise ValueError("selection must be 'mean' (one point for all tasks) or 'per_task'")
    m, alias_transforms = registry.resolve_search_name(method)
    specs = [{"name": n} for n in alias_transforms] + [
        {"name": t} if isinstance(t, str) else dict(t) for t in (transforms or [])]
    for spec in specs:
        if spec["name"] == "dare":
            spec.setdefault("seed", dare_seed)
            spec.setdefault("rescale", dare_rescale)
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"transform given twice in {names}")
    if specs and not m.takes_task_vectors:
        raise ValueError(f"transforms apply to task vectors; {m.name} merges the models themselves")
    t_objs = [registry.get_transform(n) for n in names]
    fixed_t = {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in specs}
    own = {p.name for p in m.params}
    fixed_m = {**{k: v for k, v in (ties_options or {}).items() if k in own}, **(params or {})}
    space, sources = _space(m, t_objs, grid, fixed_m, fixed_t)

    tasks = _task_list(task_vectors)
    base, plan = _prepare(pretrained, tasks)
    order = list(pretrained)
    linear = m.linear_param if m.linear_param in space else None
    cache = linear is not None and m.base_scale is None and all(isinstance(v, float) for v in space[linear])
    outer_keys = [k for k in space if k != linear] if cache else list(space)
    outer = list(itertools.product(*[space[k] for k in outer_keys]))
    inner = space[linear] if cache else [None]
    points: list[GridPoint] = []
    bar = tqdm(total=len(outer) * len(inner), desc=f"search {method}", disable=not progress, unit="point")

    def resolved(setting: dict):
        mp = dict(fixed_m)
        tp = {n: dict(p) for n, p in fixed_t.items()}
        for key, value in setting.items():
            (mp if sources[key] == "method" else tp[sources[key]])[key.rpartition(".")[2]] = value
        mp = registry.validate_params(m.name, mp, num_tasks=len(tasks))
        return mp, [(t, registry.validate_transform_params(t.name, tp[t.name])) for t in t_objs]

    def score(setting: dict, merged: dict):
        absolute, norm, value = _score(evaluate(merged), finetuned_accuracy)
        points.append(GridPoint(setting, absolute, norm, value))
        bar.update(1)
        bar.set_postfix(score=f"{value:.4f}")

    fixed_params: dict = {}
    for combo in outer:
        setting = dict(zip(outer_keys, combo))
        mp, tr = resolved({**setting, **({linear: 1.0} if cache else {})})
        fixed_params = {k: v for k, v in mp.items() if k not in space}
        tvs = prepare_task_vectors(tasks, base, tr)
        if not cache:
            sink = _dict_sink(base, plan)
            run_method(m, mp, base, tvs, plan, sink, progress=False, check_finite=not allow_nonfinite)
            score(setting, _finish(sink, plan, order))
            continue
        sink = _dict_sink(base, plan)
        run_method(m, mp, base, tvs, plan, sink, progress=False, mode="delta", check_finite=not allow_nonfinite)
        direction = sink.close()
        for alpha in inner:
            out = DictSink()
            for key in plan.keys:
                pre = base.get(key)
                out.write(key, (pre.to(direction[key].dtype) + float(alpha) * direction[key]).to(pre.dtype))
            for key in plan.passthrough:
                out.write(key, base.get(key))
            score({**setting, linear: float(alpha)}, _finish(out, plan, order))
        del direction
    bar.close()
    best = max(points, key=lambda p: p.score)
    per_task = {}
    for t in best.absolute:
        key = (lambda p: p.normalized[t]) if finetuned_accuracy is not None else (lambda p: p.absolute[t])
        bp = max(points, key=key)
        per_task[t] = {"params": bp.params, "absolute": bp.absolute[t],
                       "normalized": bp.normalized[t] if bp.normalized else None}
    transforms_fixed = [{"name": n, **fixed_t[n]} for n in names]
    return SearchResult(method, selection, "mean normalized accuracy" if finetuned_accuracy else "mean absolute accuracy",
                        points, best, per_task, dict(finetuned_accuracy) if finetuned_accuracy else None, fixed_params,
                        m.name, transforms_fixed, sources)
