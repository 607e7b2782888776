"""The one merge-study driver: any model pool x any task pool (the demo, CLIP vision, Flan-T5 GLUE).

For every merge method: coefficient search on the validation split (`saft_hf.merging.search_coefficients`,
each grid point scored by mean normalized validation score when the model pool recorded fine-tuned
validation scores, else mean absolute score), the chosen point merged and evaluated on the test
split, reported absolute and normalized (merged / individually fine-tuned, per task).

    from saft_hf.evaluation.study import default_study_methods, run_merge_study, write_study_report
    result = run_merge_study(model_pool, task_pool, default_study_methods())
    write_study_report(result, "reports/x")   # results.json, results.md, results.png

Which methods run comes from the merge-method registry (`registry.study_rows`: every method with
`in_study=True`, plus its fixed-coefficient ablation); a family only chooses grids (per method and
parameter), the fixed coefficient and which methods, never a method name of its own. `_merge`
merges any registered method (or search alias such as a method with DARE in front) through
`saft_hf.merging.merge` / `merge_finetuned`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from saft_hf.evaluation import markdown_table, summarize
from saft_hf.pools import ModelPool, TaskPool, correctness_to_bits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyMethod:
    """One row of a merge study.

    name: result key; label / plot_label / short_label: how reports name it (from the registry);
    merge: a registered merge method or search alias (`registry.search_names()`); params: fixed
    parameters; grid: searched parameters ({param: values}, the `search_coefficients` grid) or
    None for no search; ablation: the row is a method's fixed-coefficient ablation."""

    name: str
    label: str
    merge: str
    params: Mapping = field(default_factory=dict)
    grid: Mapping | None = None
    plot_label: str = ""
    short_label: str = ""
    ablation: bool = False


def _searched_label(method, grid: Mapping, default: str, base: str | None = None) -> str:
    """`default` (the registry's "<label> (<symbol> searched)") unless parameters other than the
    linear one take several values: then "<base> (<symbols> searched)" naming each of them."""
    varying = [k for k, v in grid.items() if len(v) > 1]
    if base is None and (not varying or varying == [method.linear_param]):
        return default
    varying.sort(key=lambda k: k != method.linear_param)  # the linear parameter first
    names = []
    for k in varying:
        try:
            names.append(method.param(k).symbol or k)
        except KeyError:  # a transform's parameter (search alias)
            names.append(k)
    return f"{base or method.label} ({', '.join(names)} searched)" if names else (base or default)


def default_study_methods(methods: Sequence[str] | None = None, grids: Mapping[str, Mapping] | None = None,
                          fixed_coefficient: float | None = None, ablations: bool = True,
                          num_tasks: int | None = None) -> list[StudyMethod]:
    """The study's rows, from the merge-method registry.

    methods: registered methods or search aliases, in order (default: every study method,
    `registry.method_names(study_only=True)`). grids: per-method grid overrides
    {method: {param: values}} on top of the registry's search grid (a method with a grid, or
    given one here, is searched on validation; otherwise merged at its defaults). Each method
    declaring a fixed-coefficient ablation (`fixed_ablation`) gets an extra row `<method>_fixed`
    right after it, with its linear parameter at `fixed_coefficient` (None: the declared
    value); `ablations=False` drops those rows. With `num_tasks`, methods that cannot merge that
    many models (SLERP: exactly two) are left out of the default list.
    """
    from saft_hf.merging import registry
    from saft_hf.merging.search import default_grid

    names = list(registry.method_names(study_only=True, num_tasks=num_tasks) if methods is None else methods)
    grids = dict(grids or {})
    unknown = [n for n in [*names, *grids] if n not in registry.search_names()]
    if unknown:
        raise ValueError(f"unknown merge method(s) {sorted(set(map(str, unknown)))}; "
                         f"choose from {registry.search_names()}")
    out = []
    for name in names:
        m, transforms = registry.resolve_search_name(name)
        fixed = {}
        if fixed_coefficient is not None and m.fixed_ablation and m.linear_param:
            fixed = {m.name: {**m.fixed_ablation, m.linear_param: fixed_coefficient}}
        rows = registry.study_rows([m.name], fixed_overrides=fixed)
        main, extra = rows[0], rows[1:]
        grid = {**default_grid(name), **{k: list(v) for k, v in grids.get(name, {}).items()}}
        if transforms:  # a search alias: the method with transforms in front
            base = " + ".join([m.label, *(registry.get_transform(t).label for t in transforms)])
            label = _searched_label(m, grid, base, base=base)
            short = " + ".join([m.short_label, *(registry.get_transform(t).label for t in transforms)])
            out.append(StudyMethod(name, label, name, {}, grid or None, registry._plot_label(label), short))
            continue
        label = _searched_label(m, grid, main.label) if grid else main.label
        plot = main.plot_label if label == main.label else registry._plot_label(label)
        out.append(StudyMethod(name, label, name, {}, grid or None, plot, main.short_label))
        if ablations:
            out += [StudyMethod(r.key, r.label, r.method, dict(r.fixed), None, r.plot_label, r.short_label, True)
                    for r in extra]
    return out


def grids_for_params(values: Mapping[str, Sequence | None], methods: Iterable[str] | None = None) -> dict[str, dict]:
    """Per-method grid overrides from per-parameter values ({"scaling": alphas, "density": ...}):
    each value list goes to every study method (or each of `methods`) that searches that
    parameter by default; None values are skipped."""
    from saft_hf.merging import registry
    from saft_hf.merging.search import default_grid

    out = {}
    for name in (registry.method_names(study_only=True) if methods is None else methods):
        searched = default_grid(name)
        own = {k: [float(x) for x in v] for k, v in values.items() if v is not None and k in searched}
        if own:
            out[name] = own
    return out


def _merge_config(method: StudyMethod, search) -> dict:
    """{method, params, transforms} to merge: the best search point, or the row's fixed params."""
    from saft_hf.merging import registry

    if search is not None:
        return search.best_merge_config()
    m, transforms = registry.resolve_search_name(method.merge)
    return {"method": m.name, "params": dict(method.params), "transforms": [{"name": t} for t in transforms]}


def _merge(config: Mapping, pretrained, finetuned, vectors, data=None):
    """The merged state dict of a merge config ({method, params, transforms}), any registered method:
    methods defined on the fine-tuned models alone (`needs_pretrained=False`) merge `finetuned`,
    the others the task vectors. `data`: the MergeData of a method that reads data."""
    from saft_hf.merging import merge, merge_finetuned, registry

    name, params, transforms = config["method"], dict(config["params"]), list(config.get("transforms") or []) or None
    extra = {"data": data} if registry.get_method(name).needs_data else {}
    if not registry.get_method(name).needs_pretrained:
        return merge_finetuned(name, None, finetuned, transforms=transforms, **extra, **params)
    return merge(name, pretrained, vectors, transforms=transforms, **extra, **params)


def _study_merge_data(task_pool: TaskPool, names: Sequence[str]):
    """The task pool's MergeData restricted to the merged tasks (for RegMean, Fisher, AdaMerging)."""
    import copy

    try:
        data = task_pool.merge_data()
    except NotImplementedError as exc:
        raise ValueError(f"{exc} (a data-reading method was selected for this study)") from None
    if list(data.tasks) != list(names):
        data = copy.copy(data)
        data.tasks = list(names)
    return data


def _coefficient(config: Mapping, n_tasks: int):
    """The registry's `coef` of the merged point (e.g. 1/T for a uniform average, alpha for task arithmetic)."""
    from saft_hf.merging import registry

    resolved = registry.validate_params(config["method"], config["params"], num_tasks=n_tasks)
    return registry.report_coefficient(config["method"], resolved, n_tasks)


def run_merge_study(model_pool: ModelPool, task_pool: TaskPool, methods: Sequence[StudyMethod] | None = None,
                    search_max_examples: int | None = None, test_max_examples: int | None = None,
                    individual: Mapping[str, float] | str = "auto", zero_shot: bool = True,
                    test_split: str = "test", progress: bool = True,
                    log: Callable[[str], None] | None = None, label: str = "", per_example: bool = False) -> dict:
    """Search on validation, evaluate on test, every method; returns the study dict.

    individual: the individually fine-tuned test scores normalization divides by: a mapping,
    "recorded" (from the model pool's score files), "evaluate" (each fine-tuned model on its own
    task), or "auto" (recorded when every task has one, else evaluated).
    Result: {"tasks", "zero_shot"?, "individual", "methods": {name: {**summarize(test, individual),
    "label", "params", "coefficient", "search"}}} (scores are fractions).

    per_example: also record every test evaluation's per-example correctness
    (`TaskPool.evaluate_per_example`): each row (zero-shot, individual, every method) gets
    "correct" {task: "0110..." one character per test example, the split's fixed order}; the
    individual row's comes from each fine-tuned model on its own task (evaluated even when the
    normalization uses recorded scores). Tasks without per-example correctness are listed in
    result["per_example_excluded"]. These are the inputs of `saft_hf.evaluation.compare`.
    """
    from saft_hf.merging import registry, search_coefficients, task_vector

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
    excluded: dict[str, str] = {}

    def test_eval(state, names) -> tuple[dict, dict | None]:
        """(scores, {task: bits} or None) of one test evaluation."""
        if not per_example:
            return task_pool.evaluate(state, test_split, names, test_max_examples), None
        res = task_pool.evaluate_per_example(state, test_split, names, test_max_examples)
        excluded.update(res.excluded)
        return res.scores, {t: correctness_to_bits(c) for t, c in res.correct.items()}

    own_correct, evaluated = None, None
    if per_example:  # each fine-tuned model on its own task, correctness and score from one pass
        own_correct, evaluated = {}, {}
        for t in tasks:
            scores, bits = test_eval(finetuned[t], [t])
            evaluated[t] = scores[t]
            own_correct.update(bits)
    ind = _individual_scores(individual, model_pool, task_pool, finetuned, test_split, test_max_examples, evaluated)
    if zero_shot:
        scores, bits = test_eval(theta0, tasks)
        result["zero_shot"] = summarize(scores, ind)
        if bits is not None:
            result["zero_shot"]["correct"] = bits
    result["individual"] = summarize(ind, ind)
    if own_correct is not None:
        result["individual"]["correct"] = own_correct
    search_reference = model_pool.recorded_scores("validation")  # None: rank grid points by absolute score
    result["search_score"] = "mean normalized validation score" if search_reference else "mean absolute validation score"
    names = list(tasks)
    vectors = [task_vector(theta0, finetuned[n]) for n in names]
    finetuned_list = [finetuned[n] for n in names]

    def search_eval(state_dict):
        return task_pool.evaluate(state_dict, "validation", names, search_max_examples)

    result["methods"] = {}
    data = None  # the task pool's MergeData, built once when a data-reading method runs
    for method in methods:
        if not registry.resolve_search_name(method.merge)[0].accepts(len(names)):
            say(f"{method.name}: skipped, not defined for {len(names)} models")  # e.g. SLERP merges exactly two
            continue
        reads = registry.resolve_search_name(method.merge)[0].needs_data
        if reads and data is None:
            data = _study_merge_data(task_pool, names)
        # data-reading methods match models to data tasks by name
        vecs = dict(zip(names, vectors)) if reads else vectors
        fts = dict(zip(names, finetuned_list)) if reads else finetuned_list
        search = None
        if method.grid:
            search = search_coefficients(theta0, vecs, search_eval, method=method.merge, grid=dict(method.grid),
                                         params=dict(method.params), finetuned_accuracy=search_reference,
                                         progress=progress, data=data if reads else None)
        config = _merge_config(method, search)
        params = {**method.params, **(search.best_params if search is not None else {})}
        merged = _merge(config, theta0, fts, vecs, data if reads else None)
        scores, bits = test_eval(merged, names)
        row = summarize(scores, ind)
        if bits is not None:
            row["correct"] = bits
        del merged
        row.update({"label": method.label, "merge": method.merge, "method": config["method"],
                    "linear_param": registry.get_method(config["method"]).linear_param, "params": params,
                    "merge_config": config, "coefficient": _coefficient(config, len(names)),
                    "ablation": method.ablation, "search": search.to_dict() if search is not None else None})
        result["methods"][method.name] = row
        say(f"{label + ' ' if label else ''}{method.name}: avg abs {100 * row['absolute_mean']:.2f}, "
            f"avg norm {100 * row['normalized_mean']:.2f}, params {params}")
    if per_example:
        result["per_example_excluded"] = excluded
    return result


def _individual_scores(individual, model_pool, task_pool, finetuned, split, max_examples,
                       evaluated: Mapping[str, float] | None = None) -> dict[str, float]:
    """The normalization's individual scores; `evaluated`: each fine-tuned model's own-task score
    already measured (not evaluated again)."""
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
    if evaluated is not None:
        return {t: float(evaluated[t]) for t in model_pool.tasks}
    return {t: task_pool.evaluate(finetuned[t], split, [t], max_examples)[t] for t in model_pool.tasks}


def search_scores(row: Mapping) -> dict | None:
    """The validation scores of a row's search (the demo's `validation_search`): {linear value:
    score} when only the method's linear parameter varies, else {"k=v, ...": score}; None
    without a search."""
    search = row.get("search")
    if not search:
        return None
    points = search["points"]
    linear = row.get("linear_param")
    varying = {k for k in points[0]["params"] if len({repr(p["params"].get(k)) for p in points}) > 1}
    if linear is not None and varying <= {linear} and all(linear in p["params"] for p in points):
        return {p["params"][linear]: p["score"] for p in points}
    return {", ".join(f"{k}={v}" for k, v in p["params"].items()): p["score"] for p in points}


def table_label(row: Mapping) -> str:
    """A row's label in tables: a fixed-coefficient ablation shows its value ("alpha = 0.4")."""
    label = row["label"]
    coef = row.get("coefficient")
    if row.get("ablation") and isinstance(coef, (int, float)) and label.endswith(" fixed)"):
        return label[: -len(" fixed)")] + f" = {coef:g})"
    return label


def study_rows(result: Mapping) -> dict[str, dict]:
    """Table rows: zero-shot, individual, then every method (by label)."""
    rows = {}
    if "zero_shot" in result:
        rows["pretrained (zero-shot)"] = result["zero_shot"]
    rows["fine-tuned (individual)"] = result["individual"]
    for row in result["methods"].values():
        rows[table_label(row)] = row
    return rows


def check_study_output(output_dir: str | Path, inputs: Iterable = ()) -> Path:
    """Refuse a report directory that cannot be written, or that is / lies inside / contains an
    input (the runs, the pretrained model), before any work (`io_utils.check_output`); an existing
    report directory is fine (its files are replaced atomically)."""
    from saft_hf.io_utils import check_output

    return check_output(output_dir, [str(i) for i in inputs], overwrite=True, directory=True)


def write_study_report(result: Mapping, output_dir: str | Path, plot: bool = True, inputs: Iterable = ()) -> list[str]:
    """results.json (every number), results.md (the table), results.png (abs / norm per method).
    `inputs`: paths the report must not overwrite or land in (see `check_study_output`)."""
    from saft_hf.io_utils import atomic_path, write_json_atomic, write_text_atomic

    output_dir = check_study_output(output_dir, inputs)
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
