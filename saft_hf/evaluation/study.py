"""The one merge-study driver: any model pool x any task pool (the demo, CLIP vision, Flan-T5 GLUE).

For every merge method: coefficient search on the validation split (`saft_hf.merging.search_coefficients`,
each grid point scored by mean normalized validation score when the model pool recorded fine-tuned
validation scores, else mean absolute score), the chosen point merged and evaluated on the test
split, reported absolute and normalized (merged / individually fine-tuned, per task).

    from saft_hf.evaluation.study import default_study_methods, run_merge_study, write_study_report
    result = run_merge_study(model_pool, task_pool, default_study_methods())
    write_study_report(result, "reports/x")   # results.json, results.md, results.png

Which methods run is decided in ONE place, `default_study_methods` (and `_merge` for how a chosen
point is merged), so the merge-method registry can replace both.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from saft_hf.evaluation import markdown_table, summarize
from saft_hf.pools import ModelPool, TaskPool

logger = logging.getLogger(__name__)

DEMO_TA_GRID = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


@dataclass(frozen=True)
class StudyMethod:
    """One row of a merge study.

    name: result key; label: row label in tables; merge: the `saft_hf.merging` method
    ("weighted_average" | "task_arithmetic" | "ties"); params: fixed parameters; grid: searched
    parameters ({param: values}, the `search_coefficients` grid) or None for no search."""

    name: str
    label: str
    merge: str
    params: Mapping = field(default_factory=dict)
    grid: Mapping | None = None


def default_study_methods(ta_grid: Sequence[float] | None = DEMO_TA_GRID, fixed_alpha: float | None = 0.4,
                          ties_grid: Sequence[float] | None = (0.3, 0.5, 0.7, 0.9, 1.0),
                          ties_density: float | Sequence[float] = 0.2,
                          order: Sequence[str] = ("weighted_average", "task_arithmetic", "task_arithmetic_fixed",
                                                  "ties")) -> list[StudyMethod]:
    """The study's methods (today's set; to be derived from saft_hf.merging's registry).

    Defaults are the demo's: task arithmetic searched over `ta_grid`, fixed at `fixed_alpha`, TIES
    searched over `ties_grid` at density `ties_density` (a list searches densities too). A None
    grid / alpha drops that method; `order` selects and orders them.
    """
    densities = [float(d) for d in ties_density] if isinstance(ties_density, (list, tuple)) else [float(ties_density)]
    table = {"weighted_average": StudyMethod("weighted_average", "weighted average", "weighted_average")}
    if ta_grid is not None:
        table["task_arithmetic"] = StudyMethod("task_arithmetic", "task arithmetic (alpha searched)",
                                               "task_arithmetic", grid={"scaling": list(ta_grid)})
    if fixed_alpha is not None:
        table["task_arithmetic_fixed"] = StudyMethod("task_arithmetic_fixed", f"task arithmetic (alpha = {fixed_alpha:g})",
                                                     "task_arithmetic", params={"scaling": fixed_alpha})
    if ties_grid is not None:
        label = "TIES (lambda searched)" if len(densities) == 1 else "TIES (lambda, density searched)"
        table["ties"] = StudyMethod("ties", label, "ties", params={"density": densities[0]} if len(densities) == 1 else {},
                                    grid={"scaling": list(ties_grid), "density": densities})
    return [table[name] for name in order if name in table]


def _merge(method: StudyMethod, pretrained, finetuned: list, vectors: list, params: Mapping):
    """The merged state dict of `method` at `params`, through saft_hf.merging's public functions."""
    from saft_hf import merging

    if method.merge == "weighted_average":
        return merging.weighted_average(finetuned)
    if method.merge == "task_arithmetic":
        return merging.task_arithmetic(pretrained, vectors, params["scaling"])
    if method.merge == "ties":
        return merging.ties_merging(pretrained, vectors, scaling=params["scaling"], density=params["density"])
    raise ValueError(f"study method {method.name!r}: unknown merge {method.merge!r}; "
                     "use weighted_average, task_arithmetic or ties")


def _coefficient(method: StudyMethod, params: Mapping, n_tasks: int) -> float:
    return 1.0 / n_tasks if method.merge == "weighted_average" else float(params["scaling"])


def run_merge_study(model_pool: ModelPool, task_pool: TaskPool, methods: Sequence[StudyMethod] | None = None,
                    search_max_examples: int | None = None, test_max_examples: int | None = None,
                    individual: Mapping[str, float] | str = "auto", zero_shot: bool = True,
                    test_split: str = "test", progress: bool = True,
                    log: Callable[[str], None] | None = None, label: str = "") -> dict:
    """Search on validation, evaluate on test, every method; returns the study dict.

    individual: the individually fine-tuned test scores normalization divides by: a mapping,
    "recorded" (from the model pool's score files), "evaluate" (each fine-tuned model on its own
    task), or "auto" (recorded when every task has one, else evaluated).
    Result: {"tasks", "zero_shot"?, "individual", "methods": {name: {**summarize(test, individual),
    "label", "params", "coefficient", "search"}}} (scores are fractions).
    """
    from saft_hf.merging import search_coefficients, task_vector

    say = log or logger.info
    methods = list(default_study_methods() if methods is None else methods)
    tasks = model_pool.tasks
    missing = [t for t in tasks if t not in task_pool.tasks]
    if missing:
        raise KeyError(f"the model pool has task(s) {missing} that the task pool does not evaluate; "
                       f"task pool tasks: {task_pool.tasks}")
    theta0 = model_pool.pretrained_state_dict()
    result: dict = {"tasks": list(tasks), "label": label}
    finetuned = {t: model_pool.finetuned_state_dict(t) for t in tasks}
    ind = _individual_scores(individual, model_pool, task_pool, finetuned, test_split, test_max_examples)
    if zero_shot:
        result["zero_shot"] = summarize(task_pool.evaluate(theta0, test_split, tasks, test_max_examples), ind)
    result["individual"] = summarize(ind, ind)
    search_reference = model_pool.recorded_scores("validation")  # None: rank grid points by absolute score
    result["search_score"] = "mean normalized validation score" if search_reference else "mean absolute validation score"
    names = list(tasks)
    vectors = [task_vector(theta0, finetuned[n]) for n in names]
    finetuned_list = [finetuned[n] for n in names]

    def search_eval(state_dict):
        return task_pool.evaluate(state_dict, "validation", names, search_max_examples)

    result["methods"] = {}
    for method in methods:
        search = None
        params = dict(method.params)
        if method.grid:
            search = search_coefficients(theta0, vectors, search_eval, method=method.merge, grid=dict(method.grid),
                                         finetuned_accuracy=search_reference, progress=progress)
            params.update(search.best_params)
        merged = _merge(method, theta0, finetuned_list, vectors, params)
        row = summarize(task_pool.evaluate(merged, test_split, names, test_max_examples), ind)
        del merged
        row.update({"label": method.label, "merge": method.merge, "params": params,
                    "coefficient": _coefficient(method, params, len(names)),
                    "search": search.to_dict() if search is not None else None})
        result["methods"][method.name] = row
        say(f"{label + ' ' if label else ''}{method.name}: avg abs {100 * row['absolute_mean']:.2f}, "
            f"avg norm {100 * row['normalized_mean']:.2f}, params {params}")
    return result


def _individual_scores(individual, model_pool, task_pool, finetuned, split, max_examples) -> dict[str, float]:
    if isinstance(individual, Mapping):
        return {t: float(individual[t]) for t in model_pool.tasks}
    if individual not in ("auto", "recorded", "evaluate"):
        raise ValueError(f"individual={individual!r}: use a mapping, 'auto', 'recorded' or 'evaluate'")
    recorded = model_pool.recorded_scores(split) if individual != "evaluate" else None
    if recorded is not None:
        return recorded
    if individual == "recorded":
        raise KeyError(f"individual='recorded' but not every fine-tuned run recorded a {split} score; "
                       "use individual='evaluate'")
    return {t: task_pool.evaluate(finetuned[t], split, [t], max_examples)[t] for t in model_pool.tasks}


def search_scores(row: Mapping) -> dict[str, float] | None:
    """{scaling: score} of a one-dimensional search (the demo's `validation_search`), else None."""
    search = row.get("search")
    if not search:
        return None
    return {p["params"]["scaling"]: p["score"] for p in search["points"]}


def study_rows(result: Mapping) -> dict[str, dict]:
    """Table rows: zero-shot, individual, then every method (by label)."""
    rows = {}
    if "zero_shot" in result:
        rows["pretrained (zero-shot)"] = result["zero_shot"]
    rows["fine-tuned (individual)"] = result["individual"]
    for row in result["methods"].values():
        rows[row["label"]] = row
    return rows


def write_study_report(result: Mapping, output_dir: str | Path, plot: bool = True) -> list[str]:
    """results.json (every number), results.md (the table), results.png (abs / norm per method)."""
    from saft_hf.io_utils import atomic_path, write_json_atomic, write_text_atomic

    output_dir = Path(output_dir)
    rows = study_rows(result)
    write_json_atomic(output_dir / "results.json", dict(result))
    lines = [f"# Merge study{': ' + result['label'] if result.get('label') else ''}\n",
             f"Coefficients chosen by {result.get('search_score', 'validation score')} on the validation split; "
             "scores on the test split, in %. Normalized = merged / individually fine-tuned score.\n",
             markdown_table(rows, list(result["tasks"]))]
    write_text_atomic(output_dir / "results.md", "\n".join(lines))
    files = ["results.json", "results.md"]
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(rows)
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [100 * rows[n]["absolute_mean"] for n in names], 0.4, label="avg absolute")
        ax.bar([i + 0.2 for i in x], [100 * rows[n].get("normalized_mean", float("nan")) for n in names], 0.4,
               label="avg normalized")
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("%")
        ax.legend()
        fig.tight_layout()
        with atomic_path(output_dir / "results.png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        files.append("results.png")
    return files
