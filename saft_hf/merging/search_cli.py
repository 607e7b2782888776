"""`saft-hf merge CONFIG.yaml --search --output DIR`: coefficient search on validation, the chosen
point merged to disk, and a search report beside it.

The config is a merge config plus two keys:

    evaluator: {family: demo, tasks: [color, mood], ...family args}   # a task family's task pool
    evaluator: mypkg.evals:make_evaluator                            # or a Python callable
    evaluator: {callable: mypkg.evals:make_evaluator, args: {...}}
    search: {grid: {scaling: [0.2, 0.4]}, selection: mean, max_examples: 64}

A callable evaluator is called with `args` and returns either a task pool (an object with
`evaluate(state_dict, split, tasks=None, max_examples=None) -> {task: score}`, optionally
`merge_data()`) or a function `(state_dict, split) -> {task: score}`. `family:` is resolved by the
command layer (this module imports no family): `run_search(..., resolve_family=...)`.

Every grid point is scored on "validation"; the chosen point (best mean score) is evaluated once
on "test" after the choice, so test data never influences it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from . import registry
from .data import load_data

SEARCH_KEYS = {"grid", "selection", "max_examples"}
REPORT_JSON, REPORT_MD = "search_report.json", "search_report.md"


class Evaluator:
    """{task: score} of a state dict on a split; `pool`: the task pool behind it (or None)."""

    def __init__(self, fn: Callable[[dict, str], Mapping[str, float]], description: str, pool=None):
        self._fn, self.description, self.pool = fn, description, pool

    def __call__(self, state_dict, split: str) -> dict[str, float]:
        try:
            scores = self._fn(state_dict, split)
        except (KeyError, ValueError, FileNotFoundError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ValueError(f"evaluator {self.description} failed on the {split} split: {msg}") from None
        if not isinstance(scores, Mapping) or not scores:
            raise ValueError(f"evaluator {self.description} returned {scores!r} on the {split} split; it must return "
                             "{task: score} with at least one task")
        bad = {t: s for t, s in scores.items() if isinstance(s, bool) or not isinstance(s, (int, float))
               or not math.isfinite(float(s))}
        if bad:
            raise ValueError(f"evaluator {self.description} returned non-numeric or non-finite scores {bad} on the "
                             f"{split} split")
        return {str(t): float(s) for t, s in scores.items()}

    def merge_data(self):
        make = getattr(self.pool, "merge_data", None)
        return make() if callable(make) else None


def split_config(raw: Any) -> tuple[dict, Any, dict]:
    """(merge config mapping, evaluator spec, search options) of a --search config."""
    if not isinstance(raw, dict):
        raise ValueError("merge config must be a mapping with keys pretrained, models, method, params")
    raw = dict(raw)
    evaluator = raw.pop("evaluator", None)
    search = raw.pop("search", None) or {}
    if evaluator is None:
        raise ValueError("--search needs `evaluator:` in the config: {family: demo|vision|glue, ...} or "
                         "`package.module:function` (see saft-hf merge --help)")
    if not isinstance(search, dict):
        raise ValueError(f"`search:` must be a mapping like {{grid: {{scaling: [0.2, 0.4]}}}}, got {search!r}")
    bad = set(search) - SEARCH_KEYS
    if bad:
        raise ValueError(f"unknown `search:` key(s) {sorted(map(str, bad))}; allowed: {sorted(SEARCH_KEYS)}")
    grid = search.get("grid") or {}
    if not isinstance(grid, dict):
        raise ValueError(f"`search: grid:` must map parameter -> list of values, got {grid!r}")
    if search.get("selection", "mean") != "mean":
        raise ValueError("`search: selection:` must be mean (one point for all tasks; the merged model is one model)")
    mx = search.get("max_examples")
    if mx is not None and (isinstance(mx, bool) or not isinstance(mx, int) or mx < 1):
        raise ValueError(f"`search: max_examples:` must be a positive integer, got {mx!r}")
    return raw, evaluator, search


def load_evaluator(spec, pretrained: str | None, tasks: list[str], max_examples: int | None,
                   resolve_family: Callable | None) -> Evaluator:
    if isinstance(spec, Mapping) and "family" in spec:
        args = {k: v for k, v in spec.items() if k != "family"}
        name = spec["family"]
        if resolve_family is None:
            raise ValueError("`evaluator: {family: ...}` is resolved by the saft-hf command line; from Python pass "
                             "resolve_family= or use `evaluator: package.module:function`")
        pool = resolve_family(name, pretrained, args.pop("tasks", tasks), args)
        return _pool_evaluator(pool, f"family {name}", max_examples)
    if isinstance(spec, Mapping) and set(spec) - {"callable", "args"}:
        raise ValueError(f"`evaluator:` mapping must have `family: demo|vision|glue` (with that family's args) or "
                         f"`callable: package.module:function` (with `args:`), got keys {sorted(map(str, spec))}")
    try:
        made = load_data(spec)
    except ValueError as exc:
        raise ValueError(str(exc).replace("`data:", "`evaluator:").replace(
            "saft_hf.merging.data.MergeData", "task pool or an evaluate(state_dict, split) function")) from None
    name = spec["callable"] if isinstance(spec, Mapping) else spec
    if callable(getattr(made, "evaluate", None)):
        return _pool_evaluator(made, name, max_examples)
    if callable(made):
        return Evaluator(made, name)
    raise ValueError(f"`evaluator: {name}` returned {type(made).__name__}; it must return a task pool (with "
                     "evaluate(state_dict, split, tasks, max_examples)) or a function (state_dict, split) -> {task: score}")


def _pool_evaluator(pool, description: str, max_examples: int | None) -> Evaluator:
    def fn(state_dict, split):
        cap = max_examples if split == "validation" else None
        return pool.evaluate(state_dict, split, None, cap) if cap else pool.evaluate(state_dict, split)

    return Evaluator(fn, description, pool)


def _load_state(path: str) -> dict[str, torch.Tensor]:
    from .io import open_source

    src = open_source(path)
    try:
        return {k: src.get(k) for k in src.keys()}
    finally:
        src.close()


def run_search(raw: Any, output_dir, overwrite: bool = False, progress: bool = True,
               resolve_family: Callable | None = None) -> dict:
    """Search, choose, evaluate the choice on test, write the merged model and the report."""
    from ..io_utils import write_json_atomic, write_text_atomic
    from .io import is_lora_adapter, open_source
    from .outputs import check_merge_output
    from .pipeline import MergeConfig, merge_models
    from .search import search_coefficients
    from .taskvectors import CheckpointTaskVector, LoraTaskVector

    merge_raw, evaluator_spec, options = split_config(raw)
    has_data = merge_raw.get("data") is not None
    config = MergeConfig.from_dict(merge_raw, require_data=False)
    method = registry.get_method(config.method)
    if config.pretrained is None:
        raise ValueError("--search needs `pretrained:` (task vectors are searched relative to it)")
    check_merge_output(config, Path(output_dir), overwrite)
    evaluator = load_evaluator(evaluator_spec, str(config.pretrained), [m["name"] for m in config.models],
                               options.get("max_examples"), resolve_family)
    data = None
    if method.needs_data:
        data = load_data(config.data) if has_data else evaluator.merge_data()
        if data is None:
            raise ValueError(f"method {config.method} reads each task's inputs: add `data:` to the config, or use an "
                             "evaluator whose task pool provides merge_data() (the demo, vision and glue families do)")
    grid = dict(options.get("grid") or {})
    notes = []
    searched = {**{k: v for k, v in _default_grid(config).items() if k not in config.params}, **grid}
    if not searched:
        notes.append(f"method {config.method} has no search grid (and none was given in `search: grid:`); "
                     "evaluated once at its parameters")
    pretrained = _load_state(str(config.pretrained))
    sources, tvs = [], []
    for m in config.models:
        if is_lora_adapter(m["path"]):
            tvs.append(LoraTaskVector(m["path"], m["name"]))
        else:
            sources.append(open_source(m["path"]))
            tvs.append(CheckpointTaskVector(sources[-1], m["name"]))
    try:
        result = search_coefficients(pretrained, tvs,
                                     lambda sd: evaluator(sd, "validation"), method=config.method, grid=grid,
                                     params=config.params, transforms=[{"name": n, **p} for n, p in
                                                                       config.transform_specs()],
                                     progress=progress, allow_nonfinite=config.allow_nonfinite, data=data)
        chosen = result.best_merge_config()
        from .api import merge as merge_sd

        merged = merge_sd(chosen["method"], pretrained, tvs, transforms=chosen["transforms"] or None,
                          allow_nonfinite=config.allow_nonfinite, data=data, **chosen["params"])
    finally:
        for src in sources:
            src.close()
    test = evaluator(merged, "test")  # the only test evaluation: after the choice
    del merged
    final = config.to_dict()  # saft-hf's format (a mergekit config arrives translated)
    final.update(params=chosen["params"], transforms=chosen["transforms"], dare=None)
    report = merge_models(final, output_dir, overwrite=overwrite, progress=progress, data=data)
    out = Path(output_dir)
    search_report = {"method": config.method, "evaluator": evaluator.description, "score": result.score_name,
                     "split_searched": "validation", "grid": {k: list(v) for k, v in _grid_of(result).items()},
                     "points": [{"params": p.params, "validation": p.absolute, "score": p.score}
                                for p in result.points],
                     "chosen": {"params": result.best.params, "validation": result.best.absolute,
                                "score": result.best.score, "merge_config": chosen},
                     "test": {"scores": test, "mean": sum(test.values()) / len(test)},
                     "notes": notes}
    write_json_atomic(out / REPORT_JSON, search_report)
    write_text_atomic(out / REPORT_MD, search_markdown(search_report))
    report["search"] = search_report
    return report


def _default_grid(config) -> dict:
    from .search import default_grid

    out = default_grid(config.method)
    for name, _ in config.transform_specs():
        out.update(registry.get_transform(name).grid())
    return out


def _grid_of(result) -> dict:
    out: dict = {}
    for p in result.points:
        for k, v in p.params.items():
            if v not in out.setdefault(k, []):
                out[k].append(v)
    return out


def search_markdown(report: Mapping) -> str:
    tasks = list(report["chosen"]["validation"])
    head = "| " + " | ".join(["point", *tasks, "mean", "chosen"]) + " |"
    lines = [f"# Coefficient search: {report['method']}\n",
             f"Evaluator: {report['evaluator']}. Every point scored on the validation split ({report['score']}); "
             "the chosen point was then evaluated once on the test split.\n", head,
             "|" + "---|" * (len(tasks) + 3)]
    for p in report["points"]:
        name = ", ".join(f"{k}={v}" for k, v in p["params"].items()) or "(defaults)"
        mark = "**yes**" if p["params"] == report["chosen"]["params"] else ""
        lines.append("| " + " | ".join([name, *(f"{100 * p['validation'][t]:.2f}" for t in tasks),
                                        f"{100 * p['score']:.2f}", mark]) + " |")
    test = report["test"]
    lines += ["", "Test scores of the chosen point (%): "
              + ", ".join(f"{t} {100 * s:.2f}" for t, s in test["scores"].items()) + f"; mean {100 * test['mean']:.2f}"]
    lines += [f"\nNote: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
