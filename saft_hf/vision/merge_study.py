"""The paper's merging table for one set of fine-tuned CLIP encoders: weighted average, task
arithmetic and TIES (coefficients searched on the validation splits), each evaluated on the test
splits, absolute and normalized, plus the pretrained (zero-shot) and individually fine-tuned rows.

Inputs are the fine-tuning recipe's output directories (encoder + `finetuned_accuracy.json`);
runs fine-tuned with FTTS are merged the same way and evaluated with the linearized forward.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

from saft_hf.evaluation import markdown_table, summarize
from saft_hf.io_utils import write_json_atomic, write_text_atomic
from saft_hf.merging import registry
from saft_hf.vision.evaluate import VisionEvaluator
from saft_hf.vision.finetune import FINETUNED_ACCURACY_FILE
from saft_hf.vision.model import load_vision_encoder

logger = logging.getLogger(__name__)

METHODS = tuple(registry.method_names(study_only=True))  # the registry's study methods, in order


def read_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    runs = []
    for d in run_dirs:
        path = Path(d) / FINETUNED_ACCURACY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {d} is not a finished fine-tuning run of "
                                    "recipes/clip_vision/finetune.py")
        runs.append({**json.loads(path.read_text()), "dir": str(d)})
    tasks = [r["task"] for r in runs]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"two runs for the same task in {tasks}; give one run directory per task")
    if len({bool(r.get("linearized")) for r in runs}) > 1:
        raise ValueError("mixing linearized (FTTS) and ordinary runs: merge runs of one fine-tuning mode")
    return runs


def merge_state_dict(method: str, pretrained: Mapping[str, torch.Tensor], finetuned: list, vectors: list,
                     params: Mapping, transforms=None) -> dict[str, torch.Tensor]:
    """Any registered method at `params` (methods without a pretrained model merge `finetuned`)."""
    from saft_hf.merging import merge, merge_finetuned

    if not registry.get_method(method).needs_pretrained:
        return merge_finetuned(method, None, finetuned, transforms=transforms, **params)
    return merge(method, pretrained, vectors, transforms=transforms, **params)


def run_merge_study(run_dirs: Sequence[str | Path], output_dir: str | Path, pretrained: str | None = None,
                    methods: Sequence[str] = METHODS, fixed_scaling: float | None = 0.4,
                    data_paths: Mapping[str, str] | None = None, search_max_samples: int | None = None,
                    test_max_samples: int | None = None, grid: Mapping[str, Mapping] | None = None,
                    head_cache_dir: str | None = None, batch_size: int = 128, device: str | None = None,
                    progress: bool = True) -> dict:
    """Search, merge, evaluate; write `merge_study.json` and `merge_study.md` into `output_dir`."""
    from saft_hf.merging import search_coefficients, task_vector

    runs = read_runs(run_dirs)
    tasks = [r["task"] for r in runs]
    base_model = pretrained or runs[0]["base_model"]
    linearized = bool(runs[0].get("linearized"))
    common = dict(base_model=base_model, data_paths=data_paths, head_cache_dir=head_cache_dir,
                  batch_size=batch_size, device=device, linearized=linearized, progress=progress)
    val_eval = VisionEvaluator(tasks, split="validation", max_samples=search_max_samples, **common)
    # Test sets are evaluated a handful of times only: stream them instead of holding SUN397 in RAM.
    test_eval = VisionEvaluator(tasks, split="test", max_samples=test_max_samples, cache_images=False, **common)

    theta0 = load_vision_encoder(base_model).state_dict()
    finetuned = [load_vision_encoder(r["dir"]).state_dict() for r in runs]
    vectors = [task_vector(theta0, ft) for ft in finetuned]
    ft_test = {r["task"]: r["test_accuracy"] for r in runs}
    ft_val = {r["task"]: r["validation_accuracy"] for r in runs}

    skipped = [m for m in methods if not registry.resolve_search_name(m)[0].accepts(len(runs))]
    if skipped:  # e.g. SLERP merges exactly two models
        logger.info("skipping %s: not defined for %d models", skipped, len(runs))
        methods = [m for m in methods if m not in skipped]
    rows = {"pretrained (zero-shot)": summarize(test_eval(theta0), ft_test),
            "fine-tuned (individual)": summarize(ft_test, ft_test)}
    details: dict = {}
    for method in methods:
        if not registry.resolve_search_name(method)[0].grid() and not (grid or {}).get(method):
            params, search, transforms = registry.validate_params(method, {}), None, None
        else:
            search = search_coefficients(theta0, vectors, val_eval, method=method, grid=(grid or {}).get(method),
                                         finetuned_accuracy=ft_val, progress=progress)
            best = search.best_merge_config()
            params, transforms = best["params"], best["transforms"]
        merged = merge_state_dict(registry.resolve_search_name(method)[0].name, theta0, finetuned, vectors, params,
                                  transforms)
        rows[method] = summarize(test_eval(merged), ft_test)
        details[method] = {"params": params, "search": search.to_dict() if search else None}
        logger.info("%s %s: test abs %.4f norm %.4f", method, params, rows[method]["absolute_mean"],
                    rows[method]["normalized_mean"])
    # the fixed-coefficient ablation (paper table 6) of every method declaring one, at fixed_scaling
    for method in (registry.method_names(study_only=True, num_tasks=len(runs)) if fixed_scaling is not None else []):
        m = registry.get_method(method)
        if not m.fixed_ablation or not m.linear_param:
            continue
        name = f"{method} ({m.param(m.linear_param).symbol or m.linear_param}={fixed_scaling})"
        fixed = {**m.fixed_ablation, m.linear_param: fixed_scaling}
        merged = merge_state_dict(method, theta0, finetuned, vectors, fixed)
        rows[name] = summarize(test_eval(merged), ft_test)
        details[name] = {"params": fixed, "search": None}

    report = {"tasks": tasks, "base_model": base_model, "linearized": linearized,
              "runs": {r["task"]: r["dir"] for r in runs}, "rows": rows, "methods": details,
              "finetuning": {k: runs[0].get(k) for k in ("finetuning_mode", "sam_rho", "sam_adaptive")}}
    table = markdown_table(rows, tasks)
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "merge_study.json", report)
    write_text_atomic(output_dir / "merge_study.md", table)
    return report
