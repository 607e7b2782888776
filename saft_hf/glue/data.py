"""GLUE data: load a task's split (Hub or local files), reject malformed rows, tokenize text-to-text.

Sources, in order of precedence:
- a local path for the task: a `Dataset.save_to_disk` / `DatasetDict.save_to_disk` directory, a
  directory holding `<split>.{parquet,jsonl,json,csv}` files, or one such file;
- otherwise the Hub dataset (`nyu-mll/glue`, config = task name).
Local data must have GLUE's column names (e.g. CoLA: `sentence`, `label`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from saft_hf.tasks.glue import GLUE_HUB_DATASET, STSB_MAX, STSB_MIN, GlueTask, format_input, format_target

LOCAL_FILE_TYPES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class MalformedGlueData(ValueError):
    """A GLUE row that cannot be trained or scored on (names task, split, row and column)."""


def resolve_split(task: GlueTask, split: str) -> str:
    """'validation' means the task's validation split (MNLI: validation_matched)."""
    return task.validation_split if split == "validation" else split


def _load_local(task: GlueTask, path: Path, split: str):
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"GLUE task {task.name!r}: split {split!r} not in {path} (has {list(loaded)})")
            return loaded[split]
        return loaded
    if path.is_dir():
        candidates = [path / f"{split}{ext}" for ext in LOCAL_FILE_TYPES]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(
                f"GLUE task {task.name!r}: no data for split {split!r} in {path}; expected a save_to_disk "
                f"directory or one of {[c.name for c in candidates]}"
            )
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"GLUE task {task.name!r}: data path {path} does not exist")
    file_type = LOCAL_FILE_TYPES.get(path.suffix.lower())
    if file_type is None:
        raise ValueError(f"GLUE task {task.name!r}: cannot read {path}; use one of {sorted(LOCAL_FILE_TYPES)}")
    return datasets.load_dataset(file_type, data_files={split: str(path)}, split=split)


def load_glue_split(
    task: GlueTask,
    split: str,
    data_path: str | os.PathLike | None = None,
    dataset_name: str = GLUE_HUB_DATASET,
    max_samples: int | None = None,
    seed: int = 0,
    validate: bool = True,
):
    """One split of one task as a `datasets.Dataset`, checked row by row (see `validate_rows`).

    `max_samples` keeps a seeded random subset (the same one each call), for quick evaluation.
    """
    split = resolve_split(task, split)
    if data_path is not None:
        dataset = _load_local(task, Path(data_path), split)
    else:
        import datasets

        from saft_hf.model_paths import ModelPathError

        try:
            dataset = datasets.load_dataset(dataset_name, task.config_name, split=split)
        except ConnectionError:  # offline and not cached: say what to pass instead
            raise ModelPathError(f"dataset {dataset_name} ({task.config_name}) is not cached and the Hugging Face Hub "
                                 f"is unreachable (offline?); pass local data with --data {task.name}=PATH or "
                                 "--data_root DIR", dataset_name) from None
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    if validate:
        validate_rows(task, dataset, split)
    return dataset


def validate_rows(task: GlueTask, dataset, split: str) -> None:
    """Raise MalformedGlueData for the first bad row: missing column, empty text, label outside the task's set."""
    where = f"GLUE task {task.name!r}, split {split!r}"
    needed = [*task.text_columns, "label"]
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise MalformedGlueData(
            f"{where}: missing column(s) {missing}; found {dataset.column_names}. "
            f"Local data must use GLUE's column names {needed}."
        )
    for column in task.text_columns:
        for row, text in enumerate(dataset[column]):
            if not isinstance(text, str) or not text.strip():
                raise MalformedGlueData(f"{where}, row {row}, column {column!r}: empty or non-text value {text!r}")
    for row, label in enumerate(dataset["label"]):
        problem = _label_problem(task, label)
        if problem:
            raise MalformedGlueData(f"{where}, row {row}, column 'label': {problem}")


def _label_problem(task: GlueTask, label: Any) -> str | None:
    if task.is_regression:
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
            return f"expected a similarity score in [{STSB_MIN}, {STSB_MAX}], got {label!r}"
        if not STSB_MIN <= label <= STSB_MAX:
            return f"similarity score {label!r} outside [{STSB_MIN}, {STSB_MAX}]"
        return None
    valid = range(task.num_labels)
    is_int = isinstance(label, int) and not isinstance(label, bool)
    if not is_int or label not in valid:
        hint = " (GLUE test splits have hidden labels, -1: evaluate on validation)" if label == -1 else ""
        return f"label {label!r} is not one of {list(valid)} ({', '.join(task.label_words)}){hint}"
    return None


def tokenize_split(
    task: GlueTask,
    dataset,
    tokenizer,
    max_source_length: int = 256,
    max_target_length: int = 8,
    with_targets: bool = True,
    desc: str | None = None,
):
    """Text-to-text features: `input_ids`, `attention_mask` and (with targets) `labels` token ids.

    Other columns are dropped; a `reference` column keeps the original label for scoring.
    """

    def encode(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        sources = [format_input(task, row) for row in rows]
        features = tokenizer(sources, max_length=max_source_length, truncation=True)
        features = {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"]}
        if with_targets:
            targets = [format_target(task, row["label"]) for row in rows]
            features["labels"] = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)[
                "input_ids"
            ]
        features["reference"] = [float(r["label"]) if task.is_regression else int(r["label"]) for r in rows]
        return features

    return dataset.map(
        encode,
        batched=True,
        remove_columns=dataset.column_names,
        desc=desc or f"tokenizing {task.name}",
    )
