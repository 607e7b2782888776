"""The demo's diagnostics stage (on in `saft-hf demo`, off with `--quick` / `--no-analysis`).

`saft_hf.demo.study.run_diagnostics` calls `run(context, output_dir)` with a `DiagnosticsContext`
(pretrained encoder, tokenizer, frozen heads, tokenized validation splits, and per (seed, method)
the fine-tuned checkpoint directories by task). We build a `TaskProbe` on a fixed-seed validation
subset, form each method's task vectors with `saft_hf.merging.task_vector` (via `checkpoints.py`), and call `run_all`
with defaults sized for the demo's CPU budget.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping


from saft_hf.analysis.checkpoints import task_vectors_from_checkpoints
from saft_hf.analysis.probe import TaskProbe
from saft_hf.analysis.run import run_all

__all__ = ["DEMO_DEFAULTS", "run", "method_label"]

# Sized for the demo's CPU budget (about 6 minutes on 2 cores): a 9 x 9 plane (step 0.25 over
# [-0.5, 1.5], so 0, 0.25, ..., 1 are on it, which makes the references free) on 48 validation
# examples per task, two-task setting only (the all-task plane costs as much again); the Hessian only
# on the plane's two tasks at gamma = 0 and 1, at most 5 power iterations.
# `saft-hf analyze` has the paper's sizes (21 x 21, both settings, five gammas, 128 examples).
DEMO_DEFAULTS = dict(subset_size=48, batch_size=48, grid_size=9, settings=("two-task",),
                     hessian_gammas=(0.0, 1.0), hessian_max_iter=5, hessian_tol=1e-2, barrier_steps=11)

_LABELS = {"adamw": "AdamW", "asam": "ASAM", "sgd": "SGD", "sam": "SAM"}


def method_label(method: str) -> str:
    return _LABELS.get(method.lower(), method)


def run(context, output_dir: str | Path, progress: bool = True, **overrides) -> dict:
    """Run every diagnostic on the demo's models (first seed, every method) into `output_dir`."""
    cfg = {**DEMO_DEFAULTS, **overrides}
    checkpoints: Mapping = context.checkpoints
    if not checkpoints:
        return {"status": "no fine-tuned checkpoints"}
    seed = sorted({s for s, _ in checkpoints})[0]
    theta0 = {k: v.detach().clone() for k, v in context.pretrained_encoder.state_dict().items()}
    tasks = list(context.validation)
    vectors = {}
    for (s, method), by_task in checkpoints.items():
        if s != seed:
            continue
        vectors[method_label(method)] = task_vectors_from_checkpoints(theta0, {t: by_task[t] for t in tasks if t in by_task})
    probe = TaskProbe.from_token_ids(
        copy.deepcopy(context.pretrained_encoder),  # moved in place; keep the study's encoder untouched
        {t: context.heads[t] for t in tasks},
        {t: (context.validation[t].input_ids, context.validation[t].labels) for t in tasks},
        pad_id=context.pad_id, subset_size=cfg.pop("subset_size"), seed=0, batch_size=cfg.pop("batch_size"),
    )
    summary = run_all(probe, theta0, vectors, output_dir, hessian_tasks=tasks[:2], progress=progress, **cfg)
    return {"output_dir": str(output_dir), "seed": seed, "diagnostics": summary["diagnostics"],
            "files": summary["files"], "timings_seconds": summary["timings_s"]}
