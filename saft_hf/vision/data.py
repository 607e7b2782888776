"""Vision task data: load (Hub name or local path), carve validation from train, preprocess lazily.

Preprocessing is CLIP's own (`CLIPImageProcessor` via `AutoImageProcessor`: resize the shortest
edge, center crop, rescale, normalize); no torchvision is needed. It runs lazily in
`Dataset.with_transform`, so nothing is materialized up front.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saft_hf.tasks.vision import VisionTask

VALIDATION_FRACTION = 0.1
VALIDATION_MAX = 5000
VALIDATION_SEED = 0


def load_task_dataset(task: VisionTask, data_path: str | os.PathLike | None = None, cache_dir: str | None = None):
    """The task's `DatasetDict` with at least its train and test splits.

    `data_path` replaces the Hub name: a directory written by `save_to_disk`, any directory or
    file pattern `datasets.load_dataset` understands (e.g. an imagefolder), or another Hub name.
    """
    import datasets

    from saft_hf.model_paths import ModelPathError, check_model_path

    source = os.fspath(data_path) if data_path else task.dataset
    if data_path:
        check_model_path(source, f"dataset of task {task.name!r}", hub_kind="dataset")
    try:
        if os.path.isdir(source) and (Path(source, "dataset_dict.json").exists() or Path(source, "state.json").exists()):
            ds = datasets.load_from_disk(source)
        elif os.path.isdir(source):
            ds = datasets.load_dataset(source, cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(source, task.config if not data_path else None, cache_dir=cache_dir)
    except ConnectionError:  # the Hub is unreachable and nothing is cached: say what to pass instead
        raise ModelPathError(f"dataset {source} of task {task.name!r} is not cached and the Hugging Face Hub is "
                             f"unreachable (offline?); pass a local copy with --data {task.name}=PATH", source) from None
    if isinstance(ds, datasets.Dataset):
        raise ValueError(f"{source} holds a single Dataset; task {task.name!r} needs a DatasetDict with splits "
                         f"{task.train_split!r} and {task.test_split!r}")
    missing = [s for s in (task.train_split, task.test_split) if s not in ds]
    if missing:
        raise ValueError(f"dataset {source} for task {task.name!r} has splits {list(ds)}, missing {missing}")
    for column in (task.image_column, task.label_column):
        if column not in ds[task.train_split].column_names:
            raise ValueError(f"dataset {source} has columns {ds[task.train_split].column_names}; task {task.name!r} "
                             f"expects {column!r} (see saft_hf/tasks/vision.py)")
    return ds


def raw_class_names(dataset, task: VisionTask) -> list[str]:
    feature = dataset.features[task.label_column]
    names = getattr(feature, "names", None)
    if not names:
        raise ValueError(f"column {task.label_column!r} of task {task.name!r} is not a ClassLabel with names; cast it "
                         "with dataset.cast_column(..., ClassLabel(names=[...])) so prompts can name the classes")
    return list(names)


def split_train_validation(train, fraction: float = VALIDATION_FRACTION, max_size: int = VALIDATION_MAX,
                           seed: int = VALIDATION_SEED):
    """(train, validation): `fraction` of train (at most `max_size`) held out with a fixed seed."""
    size = min(int(round(len(train) * fraction)), max_size)
    if size < 1 or size >= len(train):
        raise ValueError(f"cannot hold out {size} validation examples from a train split of {len(train)}")
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


class ImageTransform:
    """Batched `with_transform` function: images -> CLIP `pixel_values`, labels -> `labels`.

    `normalize=False` returns the resized, center-cropped images as uint8 (4x less memory than
    float32; `normalize_uint8` finishes the job), used by the evaluator's in-memory cache.
    """

    def __init__(self, processor, image_column: str = "image", label_column: str = "label", normalize: bool = True):
        self.processor = processor
        self.image_column = image_column
        self.label_column = label_column
        self.normalize = normalize

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        images = [img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img for img in batch[self.image_column]]
        kwargs = {} if self.normalize else {"do_rescale": False, "do_normalize": False}
        pixels = self.processor(images=images, return_tensors="pt", **kwargs)["pixel_values"]
        if not self.normalize:
            pixels = pixels.round().clamp(0, 255).to(torch.uint8)
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch[self.label_column], dtype=torch.long)}


def normalize_uint8(pixels: torch.Tensor, processor) -> torch.Tensor:
    """What the processor's rescale + normalize does, on uint8 [N, 3, H, W] images."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() * float(processor.rescale_factor) - mean) / std


@dataclass
class TaskData:
    task: VisionTask
    class_names: list[str]
    train: Any
    validation: Any
    test: Any


def prepare_task_data(task: VisionTask, processor, data_path: str | None = None, cache_dir: str | None = None,
                      validation_fraction: float = VALIDATION_FRACTION, validation_max: int = VALIDATION_MAX,
                      split_seed: int = VALIDATION_SEED, max_train_samples: int | None = None,
                      max_eval_samples: int | None = None, max_test_samples: int | None = None) -> TaskData:
    """Train / validation / test datasets of a task, preprocessed lazily, plus prompt class names."""
    ds = load_task_dataset(task, data_path, cache_dir)
    class_names = task.class_names(raw_class_names(ds[task.train_split], task))
    train, validation = split_train_validation(ds[task.train_split], validation_fraction, validation_max, split_seed)
    test = ds[task.test_split]
    train, validation, test = (_head(d, n) for d, n in
                               ((train, max_train_samples), (validation, max_eval_samples), (test, max_test_samples)))
    transform = ImageTransform(processor, task.image_column, task.label_column)
    return TaskData(task, class_names, *(d.with_transform(transform) for d in (train, validation, test)))


def _head(dataset, n: int | None):
    return dataset.select(range(min(n, len(dataset)))) if n else dataset
