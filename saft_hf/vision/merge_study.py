"""The paper's merging table for one set of fine-tuned CLIP encoders: every study method of the
merge-method registry (coefficients searched on the validation splits), each evaluated on the test
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
from saft_hf.merging import registry
from saft_hf.pools import find_score_file

logger = logging.getLogger(__name__)

METHODS = tuple(registry.method_names(study_only=True))  # the default rows: the registry's study methods


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


def _sam_variant(run: Mapping) -> str | None:
    """The run's SAM variant (runs written before `sam_variant` recorded the boolean `sam_adaptive`)."""
    if run.get("sam_variant") is not None:
        return run["sam_variant"]
    adaptive = run.get("sam_adaptive")
    return None if adaptive is None else ("asam" if adaptive else "sam")


def study_methods(fixed_scaling: float | None = 0.4, methods: Sequence[str] = METHODS,
                  grid: Mapping[str, Mapping] | None = None) -> list:
    """The vision table's rows: `methods` (registered methods or search aliases, searched on the
    registry's paper grids, `grid` = {method: {param: values}} overriding them), then the
    fixed-coefficient ablation of every study method declaring one, at `fixed_scaling` (None: none), named as this report has always
    named it ("<method> (<symbol>=<value>)")."""
    from saft_hf.evaluation.study import default_study_methods

    rows = default_study_methods(methods, grids=grid, ablations=False)
    fixed = default_study_methods(fixed_coefficient=fixed_scaling) if fixed_scaling is not None else []
    for m in (m for m in fixed if m.ablation):  # every declared ablation, whichever methods are searched
        method = registry.get_method(m.merge)
        name = f"{m.merge} ({method.param(method.linear_param).symbol or method.linear_param}={fixed_scaling})"
        rows.append(dataclasses.replace(m, name=name))
    return [dataclasses.replace(m, label=m.name) for m in rows]


def run_merge_study(run_dirs: Sequence[str | Path], output_dir: str | Path, pretrained: str | None = None,
                    methods: Sequence[str] = METHODS, fixed_scaling: float | None = 0.4,
                    data_paths: Mapping[str, str] | None = None, search_max_samples: int | None = None,
                    test_max_samples: int | None = None, grid: Mapping[str, Mapping] | None = None,
                    head_cache_dir: str | None = None, batch_size: int = 128, device: str | None = None,
                    progress: bool = True, per_example: bool = True) -> dict:
    """Search, merge, evaluate (the shared driver, `saft_hf.evaluation.study`); write `merge_study.json`
    and `merge_study.md` (plus the driver's results.json / results.md / results.png) into `output_dir`.
    per_example: results.json records each test example's correctness (input of `saft-hf compare`;
    costs one test evaluation of each fine-tuned model on its own task)."""
    from saft_hf.evaluation.study import run_merge_study as run_study, write_study_report
    from saft_hf.vision.pools import VisionTaskPool, vision_model_pool

    from saft_hf.evaluation.study import check_study_output

    runs = read_runs(run_dirs)
    inputs = [r["dir"] for r in runs] + ([pretrained] if pretrained and Path(pretrained).exists() else [])
    check_study_output(output_dir, inputs)  # a bad report directory fails now, not after the study
    specs = study_methods(fixed_scaling, methods, grid)
    tasks = [r["task"] for r in runs]
    base_model = pretrained or runs[0]["base_model"]
    linearized = bool(runs[0].get("linearized"))
    model_pool = vision_model_pool(base_model, {r["task"]: r["dir"] for r in runs})
    task_pool = VisionTaskPool(tasks, base_model, data_paths=data_paths, head_cache_dir=head_cache_dir,
                               batch_size=batch_size, device=device, linearized=linearized, progress=progress)
    result = run_study(model_pool, task_pool, specs,
                       search_max_examples=search_max_samples, test_max_examples=test_max_samples,
                       individual="recorded", progress=progress, per_example=per_example)
    rows = {"pretrained (zero-shot)": result["zero_shot"], "fine-tuned (individual)": result["individual"]}
    details: dict = {}
    for name, row in result["methods"].items():
        rows[name] = {k: row[k] for k in ("tasks", "absolute", "absolute_mean", "normalized", "normalized_mean")}
        # a row merged at the method's defaults reports them (e.g. uniform weights: normalize only)
        params = row["params"] or registry.validate_params(row["method"], {}, num_tasks=len(tasks))
        details[name] = {"params": params, "search": row["search"]}
    report = {"tasks": tasks, "base_model": base_model, "linearized": linearized,
              "runs": {r["task"]: r["dir"] for r in runs}, "rows": rows, "methods": details,
              "finetuning": {"finetuning_mode": runs[0].get("finetuning_mode"), "sam_rho": runs[0].get("sam_rho"),
                             "sam_variant": _sam_variant(runs[0])}}
    table = markdown_table(rows, tasks)
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "merge_study.json", report)
    write_text_atomic(output_dir / "merge_study.md", table)
    write_study_report({**result, "label": f"{base_model} ({'linearized' if linearized else 'ordinary'})"},
                       output_dir, inputs=inputs)
    return report
