"""Compare fine-tuning methods (e.g. ASAM vs AdamW) on merge-study results, any task family.

Input: merge-study results (`run_merge_study(..., per_example=True)`, or the `results.json` it
writes) per fine-tuning method and seed, all on the same test examples. Output: for every merge
method (and the individually fine-tuned models), the effect `treatment - baseline` on absolute and
normalized accuracy with a bootstrap CI (paired over test examples within a seed, hierarchical over
seeds when several) and McNemar's test per seed (`saft_hf.stats.effect_table`), as JSON rows, a
Markdown table and a forest plot.

    from saft_hf.evaluation.compare import compare_results, write_comparison
    cmp = compare_results({"adamw": {0: res_a}, "asam": {0: res_b}}, baseline="adamw")
    write_comparison(cmp, "reports/compare")

Per-example statistics need per-example correctness: tasks without it (STS-B, a correlation
metric) are left out of the statistics and listed in `excluded_tasks`. The score the statistics
use is accuracy (the mean of the correctness); for GLUE tasks scored by MCC / F1 this is their
accuracy, not their reported metric.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from saft_hf.pools import bits_to_correctness


def _correct(row: Mapping, tasks: Sequence[str], what: str) -> dict[str, np.ndarray]:
    if "correct" not in row:
        raise KeyError(f"{what} has no per-example correctness; run the merge study with per_example=True "
                       "(the families' merge-study commands record it)")
    return {t: bits_to_correctness(row["correct"][t]) for t in tasks}


def correctness_inputs(results: Mapping[str, Mapping], tasks: Sequence[str] | None = None) -> dict:
    """`stats.effect_table` inputs from driver results {fine-tuning method: {seed: result}}:
    {"merged": {method: {seed: {merge: {task: array}}}}, "finetuned": {method: {seed: {task: array}}},
    "tasks", "excluded_tasks", "labels": {merge: table label}}. Tasks default to those with
    correctness in every result."""
    from saft_hf.evaluation.study import table_label

    all_results = [(m, s, r) for m, by_seed in results.items() for s, r in by_seed.items()]
    if not all_results:
        raise ValueError("no results to compare")
    if tasks is None:
        common = None
        for m, s, r in all_results:
            have = set(r["individual"].get("correct", {}))
            for row in r["methods"].values():
                have &= set(row.get("correct", {}))
            common = have if common is None else common & have
        tasks = [t for t in all_results[0][2]["tasks"] if t in common]
    if not tasks:
        raise ValueError("no task has per-example correctness in every result; run the merge studies "
                         "with per_example=True")
    excluded = {t: "no per-example correctness (correlation / regression metric)"
                for t in all_results[0][2]["tasks"] if t not in tasks}
    for m, s, r in all_results:
        excluded.update(r.get("per_example_excluded") or {})
    merged: dict = {}
    finetuned: dict = {}
    labels: dict = {}
    for m, s, r in all_results:
        finetuned.setdefault(m, {})[s] = _correct(r["individual"], tasks, f"{m} seed {s} individual")
        merged.setdefault(m, {})[s] = {name: _correct(row, tasks, f"{m} seed {s} {name}")
                                       for name, row in r["methods"].items()}
        for name, row in r["methods"].items():
            labels.setdefault(name, table_label(row) if "label" in row else name)
    _check_same_examples(merged, finetuned)
    return {"merged": merged, "finetuned": finetuned, "tasks": list(tasks), "excluded_tasks": excluded,
            "labels": labels}


def _check_same_examples(merged, finetuned) -> None:
    sizes = {}
    for m, by_seed in finetuned.items():
        for s, by_task in by_seed.items():
            for t, arr in by_task.items():
                if sizes.setdefault(t, len(arr)) != len(arr):
                    raise ValueError(f"task {t!r}: {m} seed {s} has {len(arr)} test examples, others "
                                     f"{sizes[t]}; a paired comparison needs the same test examples "
                                     "(same split and max examples) in every run")


def effect_rows_to_json(rows: Sequence[Mapping]) -> list[dict]:
    """`stats.effect_table` rows as plain JSON (BootstrapResult / McNemarResult as dicts)."""
    return [{"method": r["method"], "n_seeds": r["n_seeds"], "absolute": r["absolute"].as_dict(),
             "normalized": r["normalized"].as_dict() if r["normalized"] is not None else None,
             "mcnemar": {str(s): m.as_dict() for s, m in r["mcnemar"].items()}} for r in rows]


def compare_results(results: Mapping[str, Mapping], baseline: str | None = None,
                    treatments: Sequence[str] | None = None, n_boot: int = 10000, seed: int = 0,
                    ci: float = 0.95, tasks: Sequence[str] | None = None) -> dict:
    """Effects of each treatment against the baseline (default: the first fine-tuning method;
    treatments: every other one). Returns {"baseline", "tasks", "excluded_tasks", "labels",
    "effects": {treatment: effect_table rows (objects)}}."""
    from saft_hf.stats import effect_table

    methods = list(results)
    baseline = methods[0] if baseline is None else baseline
    if baseline not in results:
        raise KeyError(f"baseline {baseline!r} not among the fine-tuning methods {methods}")
    treatments = [m for m in methods if m != baseline] if treatments is None else list(treatments)
    if not treatments:
        raise ValueError(f"nothing to compare: only the baseline {baseline!r} has results")
    inputs = correctness_inputs(results, tasks)
    effects, notes = {}, []
    for t in treatments:
        try:
            effects[t] = effect_table(inputs["merged"], inputs["finetuned"], baseline, t, n_boot=n_boot, seed=seed,
                                      ci=ci)
        except ValueError as err:
            if "normalized" not in str(err):
                raise
            effects[t] = _absolute_only(inputs, baseline, t, n_boot, seed, ci)
            notes.append(f"{t}: normalized effects not computed ({err})")
    return {"baseline": baseline, "tasks": inputs["tasks"], "excluded_tasks": inputs["excluded_tasks"],
            "labels": inputs["labels"], "effects": effects, "n_boot": n_boot, "bootstrap_seed": seed,
            "notes": notes}


def _absolute_only(inputs: Mapping, baseline: str, treatment: str, n_boot: int, seed: int, ci: float) -> list[dict]:
    """`effect_table` rows without the normalized effect (a fine-tuned model scored 0 on a task, so
    merged / fine-tuned is undefined): the absolute effect and McNemar as `effect_table` computes them."""
    from saft_hf.stats import INDIVIDUAL, hierarchical_bootstrap, mcnemar

    fa, fb = inputs["finetuned"][baseline], inputs["finetuned"][treatment]
    pairs = [(INDIVIDUAL, fa, fb)]
    for m in inputs["merged"][baseline][next(iter(fa))]:
        pairs.append((m, {s: r[m] for s, r in inputs["merged"][baseline].items()},
                      {s: r[m] for s, r in inputs["merged"][treatment].items()}))
    return [{"method": m, "n_seeds": len(a), "normalized": None,
             "absolute": hierarchical_bootstrap(a, b, n_boot=n_boot, seed=seed, ci=ci),
             "mcnemar": {s: mcnemar(a[s], b[s]) for s in a}} for m, a, b in pairs]


def labelled(rows: Sequence[Mapping], labels: Mapping[str, str]) -> list[dict]:
    """Rows with each merge key replaced by its table label (for tables and plots)."""
    return [{**r, "method": labels.get(r["method"], r["method"])} for r in rows]


def comparison_markdown(cmp: Mapping, names: Mapping[str, str] | None = None, forest: Mapping[str, str] | None = None
                        ) -> str:
    """One effect table per treatment (and its forest plot file, when given)."""
    from saft_hf.stats import markdown_effect_table

    names = dict(names or {})
    base = names.get(cmp["baseline"], cmp["baseline"])
    out = []
    for treatment, rows in cmp["effects"].items():
        n_seeds = rows[0]["n_seeds"] if rows else 0
        name = names.get(treatment, treatment)
        out += [f"### {name} - {base}", "",
                f"Effect on test accuracy, percentage points (task-mean; normalized = merged / the method's own "
                f"fine-tuned accuracy), {100 * rows[0]['absolute'].ci:g}% bootstrap CI "
                + ("paired over test examples" if n_seeds == 1 else
                   f"over {n_seeds} seeds and test examples (hierarchical)")
                + f", {cmp['n_boot']} replicates; McNemar's exact test per seed (b = {base} right and {name} "
                "wrong, c = the reverse). Tasks: " + ", ".join(cmp["tasks"]) + ".", "",
                markdown_effect_table(labelled(rows, cmp["labels"]), base, name)]
        if forest and treatment in forest:
            out += [f"![forest plot {name} - {base}]({forest[treatment]})", ""]
    for note in cmp.get("notes") or []:
        out += [f"Note: {note}", ""]
    if cmp.get("excluded_tasks"):
        out += ["Left out of the statistics: " + "; ".join(f"{t}: {why}" for t, why in cmp["excluded_tasks"].items()),
                ""]
    return "\n".join(out)


def forest_plots(cmp: Mapping, output_dir: str | Path, names: Mapping[str, str] | None = None) -> dict[str, str]:
    """`effects_<treatment>.png/.svg` per treatment; returns {treatment: png file name}."""
    from saft_hf.stats import forest_plot

    names = dict(names or {})
    base = names.get(cmp["baseline"], cmp["baseline"])
    out = {}
    for treatment, rows in cmp["effects"].items():
        paths = forest_plot(labelled(rows, cmp["labels"]), Path(output_dir) / f"effects_{treatment}.png",
                            title=f"{names.get(treatment, treatment)} - {base}")
        out[treatment] = paths[0].name
    return out


def comparison_to_json(cmp: Mapping) -> dict:
    return {**{k: v for k, v in cmp.items() if k != "effects"},
            "effects": {t: effect_rows_to_json(rows) for t, rows in cmp["effects"].items()}}


def read_results(paths: Sequence[str | Path]) -> dict:
    """{seed index: result} from results.json files (a merge-study report dir or the file), in order."""
    out = {}
    for i, p in enumerate(paths):
        p = Path(p)
        p = p / "results.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no merge-study results.json (write one with the family's merge study)")
        data = json.loads(p.read_text())
        if "methods" not in data or "individual" not in data:
            raise ValueError(f"{p}: not a merge-study results.json (no 'methods' / 'individual')")
        out[i] = data
    return out


def write_comparison(cmp: Mapping, output_dir: str | Path, names: Mapping[str, str] | None = None) -> list[str]:
    """comparison.json, comparison.md and one forest plot per treatment."""
    from saft_hf.io_utils import write_json_atomic, write_text_atomic

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    forest = forest_plots(cmp, output_dir, names)
    write_json_atomic(output_dir / "comparison.json", comparison_to_json(cmp))
    write_text_atomic(output_dir / "comparison.md", "# Fine-tuning method comparison after merging\n\n"
                      + comparison_markdown(cmp, names, forest))
    return ["comparison.json", "comparison.md", *[f for p in forest.values() for f in (p, p[:-4] + ".svg")]]


def comparison_from_json(data: Mapping) -> dict:
    """The inverse of `comparison_to_json` (effect rows with BootstrapResult / McNemarResult objects)."""
    from saft_hf.stats import BootstrapResult, McNemarResult

    def row(r):
        return {"method": r["method"], "n_seeds": r["n_seeds"], "absolute": BootstrapResult(**r["absolute"]),
                "normalized": BootstrapResult(**r["normalized"]) if r["normalized"] is not None else None,
                "mcnemar": {s: McNemarResult(**m) for s, m in r["mcnemar"].items()}}

    return {**data, "effects": {t: [row(r) for r in rows] for t, rows in data["effects"].items()}}
