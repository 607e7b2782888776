"""Merge GLUE fine-tuned Flan-T5 models with the coefficient chosen on validation data (the paper's protocol).

`search_glue_merge` scores every grid point of `saft_hf.merging.search_coefficients` with a
`GlueEvaluator` (validation split, optionally a seeded subset), then writes the merged model at
the best point with `saft_hf.merging.merge_models` (an HF model dir with tokenizer, model card
and merge config) plus `search.json` with every grid point's scores.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from saft_hf.tasks.glue import get_task

SEARCH_FILE = "search.json"


def task_vector_for(path: str | os.PathLike, name: str):
    """A streamed task vector for a fine-tuned HF model dir or a PEFT LoRA adapter dir."""
    from saft_hf.merging.io import is_lora_adapter, open_source
    from saft_hf.merging.taskvectors import CheckpointTaskVector, LoraTaskVector

    if is_lora_adapter(path):
        return LoraTaskVector(path, name)
    return CheckpointTaskVector(open_source(str(path)), name)


def search_glue_merge(
    pretrained: str | os.PathLike,
    finetuned: Mapping[str, str | os.PathLike],
    output_dir: str | os.PathLike,
    method: str = "task_arithmetic",
    grid: Mapping[str, list] | None = None,
    finetuned_scores: Mapping[str, float] | None = None,
    data_paths: Mapping[str, str] | None = None,
    max_samples: int | None = None,
    overwrite: bool = False,
    device: str | None = None,
    **evaluator_kwargs,
) -> dict:
    """Search merging coefficients for `finetuned` ({task: run dir}) on validation, save the best merge.

    Returns {"search": SearchResult.to_dict(), "merge": merge report, "best_params": ...}.
    """
    import torch

    from saft_hf.glue.predict import make_glue_evaluator
    from saft_hf.io_utils import write_json_atomic
    from saft_hf.merging import merge_models, open_source, registry, search_coefficients

    if method not in registry.search_names():
        raise ValueError(f"method must be one of {registry.search_names()}, got {method!r}")
    tasks = [get_task(t).name for t in finetuned]
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; choose another output directory or pass overwrite=True")
    pretrained = resolve_model_dir(pretrained)
    base = open_source(pretrained)
    pretrained_state = {k: base.get(k) for k in base.keys()}
    vectors = {t: task_vector_for(finetuned[t], t) for t in finetuned}
    evaluator = make_glue_evaluator(tasks, str(pretrained), split="validation", max_samples=max_samples,
                                    data_paths=data_paths, **evaluator_kwargs)
    evaluator.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = search_coefficients(pretrained_state, list(vectors.values()), evaluator, method=method, grid=grid,
                                 finetuned_accuracy=finetuned_scores)
    best = dict(result.best.params)
    config = {"pretrained": str(pretrained), "models": [{"name": t, "path": str(finetuned[t])} for t in finetuned],
              **result.best_merge_config()}
    merge_report = merge_models(config, output_dir, overwrite=overwrite, progress=False)
    record = {"search": result.to_dict(), "best_params": best, "merge_config": config,
              "max_samples": max_samples, "tasks": tasks}
    write_json_atomic(output_dir / SEARCH_FILE, record)
    return {**record, "merge": merge_report}


def resolve_model_dir(name_or_path: str | os.PathLike) -> str:
    """A local directory for a model: the path itself, or the Hub snapshot (downloaded or from the cache).

    Merging reads weight files directly, so a Hub name such as google/flan-t5-base is turned into
    its local snapshot directory first.
    """
    if Path(name_or_path).exists():
        return str(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as exc:  # offline and not cached, unknown repo, ...
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local directory nor obtainable from the Hub ({exc}); "
            "download it once (huggingface-cli download ...) or pass a local directory"
        ) from exc


def summary_table(reports: Mapping[str, str | os.PathLike]) -> str:
    """One Markdown table over several `glue_eval.json` reports ({row name: path})."""
    import json

    from saft_hf.evaluation import markdown_table

    rows = {name: json.loads(Path(path).read_text()) for name, path in reports.items()}
    return markdown_table(rows)


def export_pretrained(name_or_path: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """Save the base model and tokenizer exactly as transformers loads them, to `output_dir`.

    Fine-tune from this directory and use it as the merge's `pretrained`: then the pretrained and
    fine-tuned checkpoints have the same tensor names and ties. (A Hub checkpoint can hold tensors
    the loaded model ties or drops, e.g. a separate `lm_head.weight`; task vectors would then be
    taken against weights the fine-tuning never started from.)
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from saft_hf.io_utils import atomic_directory
    from saft_hf.model_paths import hub_load_errors

    with hub_load_errors(name_or_path, "pretrained model"):
        model = AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    with atomic_directory(output_dir, inputs=[name_or_path]) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return str(output_dir)


def run_glue_merge_study(
    pretrained: str | os.PathLike,
    finetuned: Mapping[str, str | os.PathLike],
    output_dir: str | os.PathLike,
    alphas: list[float] | None = None,
    densities: list[float] | None = None,
    fixed_alpha: float | None = 0.4,
    data_paths: Mapping[str, str] | None = None,
    search_max_samples: int | None = None,
    test_max_samples: int | None = None,
    device: str | None = None,
    progress: bool = True,
    merges: Sequence[str] | None = None,
    per_example: bool = True,
    **pool_kwargs,
) -> dict:
    """`merges`: the methods to run (default: every study method; data-reading ones such as
    regmean read each task's prompts through the label-word head, `GlueTaskPool.merge_data`).
    Every study method of the merge-method registry (each searched, plus the fixed-coefficient
    ablations at `fixed_alpha`; None drops them) on full fine-tuned runs through the shared driver
    (`saft_hf.evaluation.study`): coefficients chosen by mean normalized validation score
    (normalized by each run's recorded validation score), reported on `STUDY_TEST_SPLIT` (GLUE's
    validation split: its test labels are hidden). `alphas` / `densities` replace the registry's
    grid of every method searching `scaling` / `density`. Writes results.json, results.md and
    results.png into `output_dir`; returns the study dict. per_example: results.json records each
    test example's correctness for the classification tasks (input of `saft-hf compare`)."""
    from saft_hf.evaluation.study import (check_study_output, default_study_methods, grids_for_params,
                                          run_merge_study, write_study_report)
    from saft_hf.glue.pools import STUDY_TEST_SPLIT, GlueTaskPool, glue_model_pool
    from saft_hf.merging.io import is_lora_adapter

    lora = [t for t, p in finetuned.items() if is_lora_adapter(p)]
    if lora:
        raise ValueError(f"runs for {lora} are LoRA adapters; the study needs full fine-tuned runs "
                         "(merge adapters with search_glue_merge / merge_search.py without --study)")
    tasks = [get_task(t).name for t in finetuned]
    pretrained = resolve_model_dir(pretrained)
    inputs = [str(p) for p in finetuned.values()] + [str(pretrained)]
    check_study_output(output_dir, inputs)  # a bad report directory fails now, not after the study
    methods = default_study_methods(merges, grids=grids_for_params({"scaling": alphas, "density": densities}, merges),
                                    fixed_coefficient=fixed_alpha, ablations=fixed_alpha is not None)
    model_pool = glue_model_pool(pretrained, {get_task(t).name: str(p) for t, p in finetuned.items()})
    task_pool = GlueTaskPool(tasks, pretrained, data_paths=data_paths, device=device, **pool_kwargs)
    result = run_merge_study(model_pool, task_pool, methods, search_max_examples=search_max_samples,
                             test_max_examples=test_max_samples, test_split=STUDY_TEST_SPLIT, progress=progress,
                             per_example=per_example,
                             label=f"{Path(str(pretrained)).name}, GLUE {' '.join(tasks)}")
    write_study_report(result, output_dir, inputs=inputs)
    return result
