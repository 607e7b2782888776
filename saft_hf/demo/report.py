"""The demo's report: every number as JSON, a Markdown table like the paper's tables 2 and 6,
and bar charts (AdamW vs ASAM per merging method)."""
from __future__ import annotations

import statistics
import shutil
from pathlib import Path

from saft_hf.io_utils import atomic_path, write_json_atomic, write_text_atomic

METHOD_LABELS = {"adamw": "AdamW", "asam": "ASAM", "sam": "SAM"}
COLORS = ["#7f8c8d", "#c0392b", "#2980b9", "#27ae60", "#8e44ad", "#d35400"]


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _methods(study: dict) -> list[str]:
    return [m for m in study["config"]["methods"] if any(r.get("method") == m for r in study["summary"].values())]
_INDIVIDUAL = {"row": "fine-tuned individually", "plot": "fine-tuned\nindividually", "short": "indiv."}


def _labels(kind: str) -> dict:
    """Row / plot / short labels of a result kind: "individual" or a merge-study row of the registry."""
    from saft_hf.merging import registry

    if kind == "individual":
        return _INDIVIDUAL
    for row in registry.study_rows():
        if row.key == kind:
            return {"row": row.label, "plot": row.plot_label, "short": row.short_label, "study_row": row}
    return {"row": kind, "plot": kind, "short": kind}  # a row of a method no longer registered


def _kinds(rows: dict) -> list[str]:
    """Result kinds present in the summary, in their first-seen order (individual, then merges)."""
    return list(dict.fromkeys(r["kind"] for r in rows.values() if r.get("kind") not in (None, "zero_shot")))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _combine(summaries: list[dict], method: str | None, kind: str) -> dict:
    """Mean (and spread) over seeds of `summarize`-style dicts."""
    tasks = summaries[0]["tasks"]
    row = {"method": method, "kind": kind, "tasks": tasks, "n_seeds": len(summaries)}
    for key in ("absolute", "normalized"):
        if key not in summaries[0]:
            continue
        row[key] = {t: statistics.fmean(s[key][t] for s in summaries) for t in tasks}
        row[f"{key}_mean"], row[f"{key}_mean_std"] = _mean_std([s[f"{key}_mean"] for s in summaries])
    coefs = [s["coefficient"] for s in summaries if "coefficient" in s]
    if coefs:
        row["coefficients"] = coefs
    return row


def aggregate(study: dict) -> dict:
    """Rows of the result table (ordered): zero-shot, then per kind x method, averaged over seeds."""
    runs = list(study["runs"].values())
    methods = list(runs[0]["methods"]) if runs else []
    rows = {"zero-shot (pretrained)": {**study["zero_shot"], "kind": "zero_shot", "method": None, "n_seeds": 1}}
    kinds = ["individual", *(runs[0]["methods"][methods[0]]["merges"] if methods else [])]
    for kind in kinds:
        for method in methods:
            per_seed = [r["methods"][method]["individual"] if kind == "individual"
                        else r["methods"][method]["merges"][kind] for r in runs]
            labels = _labels(kind)
            label = labels["row"]
            row = labels.get("study_row")
            if row is not None and row.fixed and "coefficient" in per_seed[0]:  # the fixed ablation: show its value
                label = label.replace(" fixed)", f" = {per_seed[0]['coefficient']:g})")
            rows[f"{label} / {method_label(method)}"] = _combine(per_seed, method, kind)
    return rows


def _coef_text(c) -> str:
    """A study's coefficient: a number, one per task, or per-layer rules (Model Stock has none)."""
    if isinstance(c, (int, float)):
        return f"{c:g}"
    if isinstance(c, (list, tuple)) and all(isinstance(x, (int, float)) for x in c):
        return "[" + " ".join(f"{x:g}" for x in c) + "]"
    return "per-layer" if isinstance(c, (list, tuple)) else str(c)


def markdown(study: dict) -> str:
    rows = study["summary"]
    tasks = next(iter(rows.values()))["tasks"]
    n_seeds = max(r.get("n_seeds", 1) for r in rows.values())

    def pct(x):
        return f"{100 * x:.2f}"

    def with_std(row, key):
        if key not in row:
            return "-"
        std = row.get(f"{key}_std", 0.0)
        return pct(row[key]) + (f" ± {100 * std:.2f}" if n_seeds > 1 else "")

    head = ["model / fine-tuning", *tasks, "avg abs", "avg norm", "coef"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        coef = ", ".join(_coef_text(c) for c in row.get("coefficients", []) if c is not None) or "-"
        cells = [pct(row["absolute"][t]) for t in tasks]
        lines.append("| " + " | ".join([name, *cells, with_std(row, "absolute_mean"),
                                         with_std(row, "normalized_mean"), coef]) + " |")
    cfg = study["config"]
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    names = {m: method_label(m) for m in cfg["methods"]}
    out = [
        "# SAFT demo: " + " vs ".join(names.values()) + " fine-tuning, then merging",
        "",
        f"Encoder `{study.get('model_label', study['model'])}`; tasks: {', '.join(tasks)}; seeds: {seeds}; "
        f"{cfg['train_steps']} steps x batch {cfg['batch_size']}, lr {cfg['learning_rate']:g}, "
        f"ASAM rho {cfg['asam_rho']:g}, max length {cfg['max_length']}; logit scale "
        f"{study['logit_scale']['chosen']:g} ({study['logit_scale']['rule']}).",
        "",
        *_effects_section(study, names),
        "## Accuracy",
        "",
        "Test accuracy (%) per task, mean absolute accuracy and mean normalized accuracy "
        "(merged / that method's own fine-tuned accuracy)" + (f"; mean ± std over {n_seeds} seeds." if n_seeds > 1 else "."),
        "Merge coefficients were searched on validation subsets; `coef` lists the chosen value per seed.",
        "",
        *lines,
        "",
    ]
    mon = study.get("merge_monitor") or {}
    if mon.get("methods"):
        out += ["## Merge monitor", "",
                f"Task arithmetic (alpha {mon['merge']['scaling']:g}, fixed) of `{mon['task']}` while it fine-tunes "
                f"(seed {mon['seed']}, every {mon['every_n_steps']} steps) with the other tasks' fine-tuned task "
                f"vectors of the same method; {mon['validation_examples']} validation examples per task. "
                f"![merge monitor]({mon['plot']})", "",
                "| method | final merged abs | final merged norm | seconds / call | calls | share of training time |",
                "|---|---|---|---|---|---|"]
        for m, r in mon["methods"].items():
            norm = r["merged_mean_normalized"][-1] if r["merged_mean_normalized"] else None
            out.append(f"| {method_label(m)} | {100 * r['merged_mean_accuracy'][-1]:.2f} | "
                       + (f"{100 * norm:.2f}" if norm is not None else "-")
                       + f" | {r['seconds_per_call']:.2f} | {r['calls']} | {100 * r['share_of_training_time']:.0f}% |")
        out.append("")
    if study.get("skipped_tasks"):
        out += ["Skipped tasks (source unavailable): "
                + "; ".join(f"{k}: {v}" for k, v in study["skipped_tasks"].items()), ""]
    out += ["## Data", ""]
    for name, info in study["tasks"].items():
        sizes = info["sizes"]
        prov = info.get("provenance", {})
        out.append(f"- **{name}** - {info['title']}. train {sizes['train']['n']} / validation "
                   f"{sizes['validation']['n']} / test {sizes['test']['n']} (test label counts "
                   f"{sizes['test']['label_counts']}). Source: {prov.get('registry', '?')} "
                   f"`{prov.get('command', prov.get('source', '?'))}`. {info.get('notes', '')}")
    out += ["", "Terms: " + " ".join(study["data_terms"].values())
            + " Downloaded at your request into your cache; not redistributed.", ""]
    timings = study.get("timings_seconds", {})
    if timings:
        cpu = study.get("cpu_seconds", {})
        out += ["## Run", "", "| phase | wall seconds | process CPU seconds |", "|---|---|---|"]
        out += [f"| {k} | {v:.1f} | {cpu.get(k, float('nan')):.1f} |" for k, v in timings.items()]
        res = study.get("resources", {})
        out += ["", f"Peak RSS {res.get('peak_rss_mb', float('nan')):.0f} MB; torch threads "
                f"{res.get('torch_threads')}; load average at the end {res.get('load_average')}.", ""]
    return "\n".join(out)


def _effects_section(study: dict, names: dict) -> list[str]:
    """The report's lead: each method's effect against the baseline with CIs and McNemar, its forest
    plot, then the cost / benefit table."""
    from saft_hf.demo.effects import cost_markdown
    from saft_hf.evaluation.compare import comparison_from_json, comparison_markdown

    out = []
    if study.get("effects"):
        cmp = comparison_from_json(study["effects"])
        out += ["## Effect on merging (paired statistics)", "",
                "No parameter of these statistics depends on which method wins: 95% percentile bootstrap, "
                f"{cmp['n_boot']} replicates, bootstrap seed {cmp['bootstrap_seed']}, every merge row reported.", "",
                comparison_markdown(cmp, names, {t: f"effects_{t}.png" for t in cmp["effects"]})]
    if study.get("cost_benefit"):
        out += ["## Cost and benefit", "",
                "Fine-tuning cost per optimizer step (wall seconds, measured in this run's training; ratio to "
                f"{names.get(study['cost_benefit']['baseline'], study['cost_benefit']['baseline'])}) next to mean "
                "test accuracy (%) of the individually fine-tuned models and of each merge (absolute / normalized), "
                "mean over seeds.", "", cost_markdown(study["cost_benefit"], names)]
    return out


def plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["summary"]
    kinds = _kinds(rows)
    methods = _methods(study)
    zero = rows["zero-shot (pretrained)"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(methods))
    for ax, key, title in ((axes[0], "absolute_mean", "mean absolute test accuracy (%)"),
                           (axes[1], "normalized_mean", "mean normalized accuracy (%)")):
        for j, method in enumerate(methods):
            vals, errs = [], []
            for kind in kinds:
                row = next(r for r in rows.values() if r.get("kind") == kind and r.get("method") == method)
                vals.append(100 * row[key])
                errs.append(100 * row.get(f"{key}_std", 0.0))
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(kinds))]
            bars = ax.bar(xs, vals, width, yerr=errs if any(errs) else None, label=method_label(method),
                          color=COLORS[j % len(COLORS)], capsize=3)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        if key == "absolute_mean":
            ax.axhline(100 * zero["absolute_mean"], color="#2c3e50", ls="--", lw=1,
                       label=f"zero-shot ({100 * zero['absolute_mean']:.1f})")
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([_labels(k)["plot"] for k in kinds], fontsize=8)
        ax.set_title(title)
        lo = min(b.get_height() for b in ax.patches) if ax.patches else 0
        ax.set_ylim(max(0, lo - 15), 112)
        ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    fig.suptitle(f"SAFT demo: {len(zero['tasks'])} tasks ({', '.join(zero['tasks'])})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_per_task(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["summary"]
    tasks = rows["zero-shot (pretrained)"]["tasks"]
    kinds = _kinds(rows)
    methods = _methods(study)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.6), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, task in zip(axes[0], tasks):
        for j, method in enumerate(methods):
            vals = [100 * next(r for r in rows.values() if r.get("kind") == k and r.get("method") == method)
                    ["absolute"][task] for k in kinds]
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(kinds))]
            ax.bar(xs, vals, width, label=method_label(method), color=COLORS[j % len(COLORS)])
        ax.axhline(100 * rows["zero-shot (pretrained)"]["absolute"][task], color="#2c3e50", ls="--", lw=1)
        ax.set_title(task, fontsize=9)
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([_labels(k)["short"] for k in kinds], fontsize=7)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(study: dict, output_dir: Path) -> dict[str, Path]:
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md",
             "plot": output_dir / "merging_adamw_vs_asam.png", "plot_per_task": output_dir / "per_task_accuracy.png"}
    try:
        write_json_atomic(paths["json"], study)
        write_text_atomic(paths["markdown"], markdown(study))
        plot(study, paths["plot"])
        plot_per_task(study, paths["plot_per_task"])
        if study.get("effects"):
            from saft_hf.evaluation.compare import comparison_from_json, forest_plots

            names = {m: method_label(m) for m in study["config"]["methods"]}
            for treatment, name in forest_plots(comparison_from_json(study["effects"]), output_dir, names).items():
                paths[f"forest_{treatment}"] = output_dir / name
    except BaseException:
        if created:  # a report directory of ours alone: a failed write leaves nothing behind
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    return paths
