"""The paper's merging table for one set of fine-tuned CLIP encoders: weighted average, task
arithmetic and TIES (coefficients searched on the validation splits), each evaluated on the test
splits, absolute and normalized, plus the pretrained (zero-shot) and individually fine-tuned rows.

Inputs are the fine-tuning recipe's output directories (encoder + `finetuned_accuracy.json`);
runs fine-tuned with FTTS are merged the same way and evaluated with the linearized forward.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping, Sequence

from saft_hf.evaluation import markdown_table
from saft_hf.io_utils import write_json_atomic, write_text_atomic
from saft_hf.pools import find_score_file

logger = logging.getLogger(__name__)

METHODS = ("weighted_average", "task_arithmetic", "ties")


def read_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    from saft_hf.pools import read_finetuned_scores

    runs = []
    for d in run_dirs:
        if find_score_file(d) is None:
            raise FileNotFoundError(f"no finetuned_scores.json (or finetuned_accuracy.json) in {d}: it is not a "
                                    "finished fine-tuning run of recipes/clip_vision/finetune.py")
        rec = read_finetuned_scores(d)
        runs.append({**rec.training, "task": rec.task, "base_model": rec.base_model, "dir": str(d),
                     "test_accuracy": rec.scores.get("test"), "validation_accuracy": rec.scores.get("validation")})
    tasks = [r["task"] for r in runs]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"two runs for the same task in {tasks}; give one run directory per task")
    if len({bool(r.get("linearized")) for r in runs}) > 1:
        raise ValueError("mixing linearized (FTTS) and ordinary runs: merge runs of one fine-tuning mode")
    return runs


def study_methods(fixed_scaling: float | None = 0.4, methods: Sequence[str] = METHODS,
                  grid: Mapping[str, Mapping] | None = None) -> list:
    """The vision table's methods (paper grids), named as this report has always named them."""
    from saft_hf.evaluation.study import default_study_methods
    from saft_hf.merging.search import DEFAULT_GRIDS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
    grids = {m: {**DEFAULT_GRIDS[m], **(grid or {}).get(m, {})} for m in ("task_arithmetic", "ties")}
    order = [*methods, *(["task_arithmetic_fixed"] if fixed_scaling is not None else [])]
    specs = default_study_methods(ta_grid=grids["task_arithmetic"]["scaling"], fixed_alpha=fixed_scaling,
                                  ties_grid=grids["ties"]["scaling"], ties_density=list(grids["ties"]["density"]),
                                  order=order)
    names = {"task_arithmetic_fixed": f"task_arithmetic (alpha={fixed_scaling})"}
    return [dataclasses.replace(m, name=names.get(m.name, m.name), label=names.get(m.name, m.name)) for m in specs]


def run_merge_study(run_dirs: Sequence[str | Path], output_dir: str | Path, pretrained: str | None = None,
                    methods: Sequence[str] = METHODS, fixed_scaling: float | None = 0.4,
                    data_paths: Mapping[str, str] | None = None, search_max_samples: int | None = None,
                    test_max_samples: int | None = None, grid: Mapping[str, Mapping] | None = None,
                    head_cache_dir: str | None = None, batch_size: int = 128, device: str | None = None,
                    progress: bool = True) -> dict:
    """Search, merge, evaluate (the shared driver, `saft_hf.evaluation.study`); write `merge_study.json`
    and `merge_study.md` (plus the driver's results.json / results.md / results.png) into `output_dir`."""
    from saft_hf.evaluation.study import run_merge_study as run_study, write_study_report
    from saft_hf.vision.pools import VisionTaskPool, vision_model_pool

    runs = read_runs(run_dirs)
    tasks = [r["task"] for r in runs]
    base_model = pretrained or runs[0]["base_model"]
    linearized = bool(runs[0].get("linearized"))
    model_pool = vision_model_pool(base_model, {r["task"]: r["dir"] for r in runs})
    task_pool = VisionTaskPool(tasks, base_model, data_paths=data_paths, head_cache_dir=head_cache_dir,
                               batch_size=batch_size, device=device, linearized=linearized, progress=progress)
    result = run_study(model_pool, task_pool, study_methods(fixed_scaling, methods, grid),
                       search_max_examples=search_max_samples, test_max_examples=test_max_samples,
                       individual="recorded", progress=progress)
    rows = {"pretrained (zero-shot)": result["zero_shot"], "fine-tuned (individual)": result["individual"]}
    details: dict = {}
    for name, row in result["methods"].items():
        rows[name] = {k: row[k] for k in ("tasks", "absolute", "absolute_mean", "normalized", "normalized_mean")}
        params = {"weights": "uniform"} if row["merge"] == "weighted_average" else row["params"]
        details[name] = {"params": params, "search": row["search"]}
    report = {"tasks": tasks, "base_model": base_model, "linearized": linearized,
              "runs": {r["task"]: r["dir"] for r in runs}, "rows": rows, "methods": details,
              "finetuning": {k: runs[0].get(k) for k in ("finetuning_mode", "sam_rho", "sam_adaptive")}}
    table = markdown_table(rows, tasks)
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "merge_study.json", report)
    write_text_atomic(output_dir / "merge_study.md", table)
    write_study_report({**result, "label": f"{base_model} ({'linearized' if linearized else 'ordinary'})"},
                       output_dir)
    return report
