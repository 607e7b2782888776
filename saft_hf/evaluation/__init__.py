"""Evaluation shared by every task family: absolute and normalized accuracy, and report tables.

Normalized accuracy of a merged model on a task = its accuracy / that task's individually
fine-tuned accuracy (the paper's definition). Both are always reported, named explicitly.
Family-specific evaluation (vision, GLUE, demo) lives beside this module and returns per-task
absolute scores that `summarize` turns into a report.
"""
from __future__ import annotations

from typing import Mapping


def normalized_accuracy(merged: float, finetuned: float) -> float:
    if finetuned <= 0:
        raise ValueError(f"normalized accuracy needs a positive fine-tuned accuracy, got {finetuned}")
    return merged / finetuned


def summarize(absolute: Mapping[str, float], finetuned: Mapping[str, float] | None = None) -> dict:
    """Per-task absolute (and, given fine-tuned references, normalized) accuracy plus their means.

    Scores are fractions in [0, 1]; the report keeps them so (tables print percentages).
    """
    tasks = list(absolute)
    report = {"tasks": tasks, "absolute": {t: float(absolute[t]) for t in tasks}}
    report["absolute_mean"] = sum(report["absolute"].values()) / len(tasks) if tasks else float("nan")
    if finetuned is not None:
        missing = [t for t in tasks if t not in finetuned]
        if missing:
            raise KeyError(f"no fine-tuned accuracy recorded for task(s) {missing}; needed to normalize")
        report["normalized"] = {t: normalized_accuracy(absolute[t], finetuned[t]) for t in tasks}
        report["normalized_mean"] = sum(report["normalized"].values()) / len(tasks) if tasks else float("nan")
    return report


def markdown_table(rows: Mapping[str, Mapping], tasks: list[str] | None = None, percent: bool = True) -> str:
    """A Markdown table: one row per named result (a `summarize` dict), per-task absolute columns,
    then the mean absolute and mean normalized accuracy."""
    rows = dict(rows)
    if tasks is None:
        tasks = next(iter(rows.values()))["tasks"] if rows else []
    fmt = (lambda x: f"{100 * x:.2f}") if percent else (lambda x: f"{x:.4f}")
    head = ["model", *tasks, "avg abs", "avg norm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in rows.items():
        cells = [fmt(rep["absolute"][t]) if t in rep["absolute"] else "-" for t in tasks]
        cells.append(fmt(rep["absolute_mean"]))
        cells.append(fmt(rep["normalized_mean"]) if "normalized_mean" in rep else "-")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"
