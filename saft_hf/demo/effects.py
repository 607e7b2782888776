"""The demo's statistics: each SAM variant's effect against AdamW (paired bootstrap CI, McNemar) on
merged and individually fine-tuned test accuracy, and the cost / benefit table (measured seconds
per optimizer step next to merged accuracy). Inputs are the per-example correctness the study
records (`runs[seed]["methods"][method]` rows' "correct")."""
from __future__ import annotations

import statistics
from typing import Mapping

from saft_hf.demo.study import BASELINE_METHOD, StudyConfig


def _baseline(methods) -> str:
    """AdamW when it runs (the plain method), else the first method given."""
    methods = list(methods)
    return BASELINE_METHOD if BASELINE_METHOD in methods else methods[0]


def driver_results(runs: Mapping) -> dict:
    """{method: {seed: {"tasks", "individual", "methods"}}}: the demo's runs in the driver's layout
    (`saft_hf.evaluation.compare` input)."""
    out: dict = {}
    for seed, run in runs.items():
        for method, res in run["methods"].items():
            out.setdefault(method, {})[seed] = {"tasks": res["individual"]["tasks"], "individual": res["individual"],
                                                "methods": res["merges"]}
    return out


def compare_methods(cfg: StudyConfig, runs: Mapping) -> dict | None:
    """The effect of every method against the baseline (JSON), or None with a single method.
    One bootstrap seed (0) for every row; nothing here depends on which method wins."""
    from saft_hf.evaluation.compare import compare_results, comparison_to_json

    methods = list(cfg.methods)
    if len(methods) < 2:
        return None
    baseline = _baseline(methods)
    results = driver_results(runs)
    ordered = {baseline: results[baseline], **{m: results[m] for m in methods if m != baseline}}
    return comparison_to_json(compare_results(ordered, baseline=baseline, n_boot=cfg.n_boot))


def cost_benefit(study: Mapping) -> dict:
    """Per method: measured wall seconds per optimizer step (mean over tasks and seeds of the
    training record; a checkpoint reused from the cache keeps the time of the run that made it),
    its ratio to the baseline's, and mean individual / merged accuracy (abs, norm) per merge."""
    methods = list(study["config"]["methods"])
    baseline = _baseline(methods)
    per_step: dict = {}
    rhos: dict = {}
    for rec in study["training"].values():
        steps = rec.get("optimizer_steps") or study["config"]["train_steps"]
        per_step.setdefault(rec["method"], []).append(rec["train_seconds"] / max(1, steps))
        rhos[rec["method"]] = rec.get("sam_rho")
    runs = list(study["runs"].values())
    merges = list(runs[0]["methods"][methods[0]]["merges"]) if runs else []
    rows = {}
    for m in methods:
        sec = statistics.fmean(per_step[m]) if per_step.get(m) else float("nan")
        row = {"seconds_per_step": sec, "sam_rho": rhos.get(m), "individual_abs": statistics.fmean(
            r["methods"][m]["individual"]["absolute_mean"] for r in runs), "merged": {}}
        for k in merges:
            rows_k = [r["methods"][m]["merges"][k] for r in runs]
            row["merged"][k] = {"label": rows_k[0].get("label", k),
                                "abs": statistics.fmean(x["absolute_mean"] for x in rows_k),
                                "norm": statistics.fmean(x["normalized_mean"] for x in rows_k)}
        rows[m] = row
    base = rows[baseline]["seconds_per_step"]
    for row in rows.values():
        row["relative_cost"] = row["seconds_per_step"] / base if base and base == base else float("nan")
    return {"baseline": baseline, "methods": rows,
            "note": "wall seconds per optimizer step measured when each checkpoint was trained (shared machine: "
                    "compare ratios within one run)"}


def cost_markdown(cost: Mapping, names: Mapping[str, str]) -> str:
    methods = cost["methods"]
    if not methods:
        return ""
    merges = list(next(iter(methods.values()))["merged"])
    labels = {k: next(iter(methods.values()))["merged"][k]["label"] for k in merges}
    head = ["method", "sam_rho", "s / step", f"x {names.get(cost['baseline'], cost['baseline'])}", "individual abs",
            *[f"{labels[k]} abs / norm" for k in merges]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in methods.items():
        rho = row.get("sam_rho")
        cells = [names.get(m, m), "-" if rho is None else f"{rho:g}", f"{row['seconds_per_step']:.3f}",
                 f"{row['relative_cost']:.2f}",
                 f"{100 * row['individual_abs']:.2f}",
                 *[f"{100 * row['merged'][k]['abs']:.2f} / {100 * row['merged'][k]['norm']:.2f}" for k in merges]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
