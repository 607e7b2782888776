"""Merging-coefficient search on validation data (the SAFT paper's protocol).

Grids (paper): one shared alpha in {0.1, 0.3, 0.5, 0.7, 0.9, 1.0} for task arithmetic;
alpha x mask rate {0.7, 0.8, 0.9} (density 0.3/0.2/0.1) for TIES; DARE drop rate in
{0.1, 0.3, 0.5, 0.7, 0.9} in front of task arithmetic (x alpha) or TIES. Each grid point is
scored by the mean normalized validation accuracy over tasks (merged acc / that task's
fine-tuned acc; mean absolute accuracy when no fine-tuned accuracies are given). With
selection="per_task" the best point is also chosen per task, as the published SAFT code did.

Work independent of the scaling is done once: the sum of task vectors (task arithmetic) and
the TIES trimmed/elected/disjoint-merged direction (per density and DARE rate) are cached, so
each alpha costs one `theta_0 + alpha * direction` and one evaluation.
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
from .engine import ties_merge
from .io import DictSink
from .methods import _dict_sink, _finish, _prepare, _task_list
from .taskvectors import DareTaskVector

PAPER_ALPHAS = [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
PAPER_DENSITIES = [0.3, 0.2, 0.1]  # mask rate 0.7 / 0.8 / 0.9
PAPER_DROP_RATES = [0.1, 0.3, 0.5, 0.7, 0.9]

DEFAULT_GRIDS = {
    "task_arithmetic": {"scaling": PAPER_ALPHAS},
    "ties": {"density": PAPER_DENSITIES, "scaling": PAPER_ALPHAS},
    "dare_task_arithmetic": {"drop_rate": PAPER_DROP_RATES, "scaling": PAPER_ALPHAS},
    "dare_ties": {"drop_rate": PAPER_DROP_RATES, "density": PAPER_DENSITIES, "scaling": PAPER_ALPHAS},
}


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


def _direction_sum(base, tasks, plan) -> dict:
    sink = DictSink()
    for key in plan.keys:
        pre = base.get(key)
        acc = None
        for tv in tasks:
            d = tv.get(key, pre)
            acc = d.clone() if acc is None else acc.add_(d)
        sink.write(key, acc)
    return sink.close()


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
) -> SearchResult:
    """Evaluate every grid point with `evaluate(merged_state_dict) -> {task: accuracy}`.

    method: "task_arithmetic" | "ties" | "dare_task_arithmetic" | "dare_ties". `grid` overrides the
    paper grid for that method (keys: scaling, density, drop_rate). `ties_options` passes
    trim_scope / sign_method / disjoint / zero_sign to TIES. The evaluation callable must not
    keep references to the state dict it gets (it is rebuilt per point).
    """
    if method not in DEFAULT_GRIDS:
        raise ValueError(f"unknown search method {method!r}; choose one of {list(DEFAULT_GRIDS)}")
    if selection not in ("mean", "per_task"):
        raise ValueError("selection must be 'mean' (one point for all tasks) or 'per_task'")
    g = {**DEFAULT_GRIDS[method], **(grid or {})}
    unknown = set(g) - set(DEFAULT_GRIDS[method])
    if unknown:
        raise ValueError(f"grid keys {sorted(unknown)} do not apply to {method}; allowed {sorted(DEFAULT_GRIDS[method])}")
    opts = {"trim_scope": "global", "sign_method": "sum", "disjoint": "mean", "zero_sign": "majority", **(ties_options or {})}
    tasks = _task_list(task_vectors)
    base, plan = _prepare(pretrained, tasks)
    order = list(pretrained)
    # Outer loop: settings that change the direction (drop rate, density); inner loop: scaling.
    outer_keys = [k for k in ("drop_rate", "density") if k in g]
    outer = list(itertools.product(*[g[k] for k in outer_keys])) or [()]
    total = len(outer) * len(g["scaling"])
    points: list[GridPoint] = []
    bar = tqdm(total=total, desc=f"search {method}", disable=not progress, unit="point")
    for combo in outer:
        setting = dict(zip(outer_keys, combo))
        tvs = tasks
        if "drop_rate" in setting:
            tvs = [DareTaskVector(tv, float(setting["drop_rate"]), dare_seed + i, dare_rescale) for i, tv in enumerate(tasks)]
            for tv in tvs:
                tv.base_source = base
        if "density" in setting:
            sink = _dict_sink(base, plan)
            ties_merge(base, tvs, plan, 1.0, float(setting["density"]), opts["trim_scope"], opts["sign_method"],
                       opts["disjoint"], opts["zero_sign"], sink, progress=False, direction_only=True)
            direction = sink.close()
        else:
            direction = _direction_sum(base, tvs, plan)
        for alpha in g["scaling"]:
            out = DictSink()
            for key in plan.keys:
                pre = base.get(key)
                out.write(key, (pre.to(direction[key].dtype) + float(alpha) * direction[key]).to(pre.dtype))
            for key in plan.passthrough:
                out.write(key, base.get(key))
            merged = _finish(out, plan, order)
            absolute, norm, score = _score(evaluate(merged), finetuned_accuracy)
            points.append(GridPoint({**setting, "scaling": float(alpha)}, absolute, norm, score))
            bar.update(1)
            bar.set_postfix(score=f"{score:.4f}")
        del direction
    bar.close()
    best = max(points, key=lambda p: p.score)
    per_task = {}
    for t in best.absolute:
        key = (lambda p: p.normalized[t]) if finetuned_accuracy is not None else (lambda p: p.absolute[t])
        bp = max(points, key=key)
        per_task[t] = {"params": bp.params, "absolute": bp.absolute[t],
                       "normalized": bp.normalized[t] if bp.normalized else None}
    fixed = opts if "density" in g else {}
    return SearchResult(method, selection, "mean normalized accuracy" if finetuned_accuracy else "mean absolute accuracy",
                        points, best, per_task, dict(finetuned_accuracy) if finetuned_accuracy else None, fixed)
