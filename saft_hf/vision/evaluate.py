"""Accuracy of CLIP image encoders (fine-tuned, merged, or pretrained) on the vision tasks.

`VisionEvaluator` loads each task's split and head once, keeps the preprocessed images in memory
as uint8 (224x224x3 bytes per image, 4x less than float32), and then evaluates any number of
encoder weights with forward passes only. `make_vision_evaluator(...)` returns it as the
`evaluate(state_dict) -> {task: accuracy}` callable that `saft_hf.merging.search_coefficients`
expects. With `linearized=True` the encoder runs its first-order Taylor expansion around the
pretrained weights (for models fine-tuned with FTTS and their merges).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from saft_hf.finetuning.linearized import LinearizedModel
from saft_hf.heads import ZeroShotHead
from saft_hf.tasks.vision import PAPER_TASKS, get_vision_task
from saft_hf.vision.data import (VALIDATION_FRACTION, VALIDATION_MAX, VALIDATION_SEED, ImageTransform,
                                 load_task_dataset, normalize_uint8, raw_class_names, split_train_validation)
from saft_hf.vision.model import DEFAULT_CLIP_MODEL, build_zero_shot_head, load_image_processor, load_vision_encoder

logger = logging.getLogger(__name__)

SPLITS = ("test", "validation", "train")


@dataclass
class _TaskCache:
    head: ZeroShotHead
    dataset: object  # the raw split, preprocessed on first use
    pixels: torch.Tensor | None = None  # uint8 [N, 3, H, W]
    labels: torch.Tensor | None = None


def load_split(task, split: str, data_path: str | None = None, max_samples: int | None = None, cache_dir=None):
    """(raw split dataset, raw class names); "validation" / "train" are the fine-tuning split
    (10% of train, at most 5000, seed 0) so the search never sees test data."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    ds = load_task_dataset(task, data_path, cache_dir)
    names = raw_class_names(ds[task.train_split], task)
    if split == "test":
        part = ds[task.test_split]
    else:
        train, validation = split_train_validation(ds[task.train_split], VALIDATION_FRACTION, VALIDATION_MAX,
                                                   VALIDATION_SEED)
        part = validation if split == "validation" else train
    if max_samples:
        part = part.shuffle(seed=0).select(range(min(max_samples, len(part)))) if max_samples < len(part) else part
    return part, names


class VisionEvaluator:
    """Evaluate encoder weights on several tasks; data and heads are prepared once."""

    def __init__(self, tasks: Sequence[str] = PAPER_TASKS, base_model: str = DEFAULT_CLIP_MODEL, split: str = "test",
                 data_paths: Mapping[str, str] | None = None, head_cache_dir: str | None = None,
                 max_samples: int | None = None, batch_size: int = 128, device: str | None = None,
                 linearized: bool = False, cache_images: bool = True, dataset_cache_dir: str | None = None,
                 progress: bool = True):
        self.tasks = [get_vision_task(t).name for t in tasks]
        self.base_model = base_model
        self.batch_size = batch_size
        self.cache_images = cache_images
        self.progress = progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.processor = load_image_processor(base_model)
        self.encoder = load_vision_encoder(base_model, attn_implementation="eager" if linearized else None)
        self.encoder.requires_grad_(False)
        # The linearized forward expands around the pretrained (base) weights loaded just now.
        self.model = LinearizedModel(_all_trainable(self.encoder)) if linearized else self.encoder
        self.model.to(self.device).eval()
        self.encoder.requires_grad_(False)
        data_paths = dict(data_paths or {})
        self._cache: dict[str, _TaskCache] = {}
        for name in self.tasks:
            task = get_vision_task(name)
            dataset, raw_names = load_split(task, split, data_paths.get(name), max_samples, dataset_cache_dir)
            head = build_zero_shot_head(base_model, task, task.class_names(raw_names), head_cache_dir)
            self._cache[name] = _TaskCache(head.to(self.device), dataset)

    # weights -----------------------------------------------------------------------------------

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy encoder weights in place (extra keys, e.g. a full CLIP's text tower, are ignored)."""
        own = self.encoder.state_dict()
        missing = [k for k in own if k not in state_dict and not _is_index_buffer(k)]
        if missing:
            raise KeyError(f"the weights lack {len(missing)} encoder tensor(s), e.g. {missing[:3]}; pass a "
                           "CLIPVisionModelWithProjection state dict (keys vision_model.*, visual_projection.*)")
        with torch.no_grad():
            for key, value in own.items():
                if key in state_dict:
                    if state_dict[key].shape != value.shape:
                        raise ValueError(f"tensor {key}: shape {tuple(state_dict[key].shape)} does not match the "
                                         f"encoder's {tuple(value.shape)} (different CLIP architecture?)")
                    value.copy_(state_dict[key])

    # evaluation --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, state_dict: Mapping[str, torch.Tensor] | None = None,
                 tasks: Sequence[str] | None = None) -> dict[str, float]:
        """{task: accuracy} of the current weights (after loading `state_dict`, if given), on
        `tasks` (default: all of this evaluator's tasks)."""
        if state_dict is not None:
            self.load_weights(state_dict)
        return {name: self._task_accuracy(name) for name in (self.tasks if tasks is None else tasks)}

    def head(self, name: str) -> ZeroShotHead:
        """The frozen zero-shot head of one task."""
        return self._cache[name].head

    def batches(self, name: str):
        """(uint8 pixels, labels) batches of one task (preprocessed once when images are cached)."""
        return self._batches(name)

    __call__ = evaluate

    @torch.no_grad()
    def evaluate_per_example(self, state_dict: Mapping[str, torch.Tensor] | None = None,
                             tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """{task: bool correctness per example}, in the split's fixed (subset) order; its mean is
        `evaluate`'s accuracy."""
        if state_dict is not None:
            self.load_weights(state_dict)
        return {name: self._task_correct(name) for name in (self.tasks if tasks is None else tasks)}

    def _task_correct(self, name: str) -> torch.Tensor:
        cache = self._cache[name]
        hits = []
        for pixels, labels in self._batches(name):
            features = self.model(pixel_values=normalize_uint8(pixels.to(self.device), self.processor)).image_embeds
            hits.append(cache.head(features).argmax(dim=-1).cpu() == labels)
        return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)

    def _task_accuracy(self, name: str) -> float:
        hits = self._task_correct(name)
        return int(hits.sum()) / max(hits.numel(), 1)

    def _batches(self, name: str):
        cache = self._cache[name]
        if cache.pixels is not None:
            for i in range(0, len(cache.labels), self.batch_size):
                yield cache.pixels[i:i + self.batch_size], cache.labels[i:i + self.batch_size]
            return
        task = get_vision_task(name)
        transform = ImageTransform(self.processor, task.image_column, task.label_column, normalize=False)
        pixels, labels = [], []
        n = len(cache.dataset)
        for i in tqdm(range(0, n, self.batch_size), desc=f"preprocess {name}", disable=not self.progress,
                      unit="batch"):
            batch = transform(cache.dataset[i:i + self.batch_size])
            if self.cache_images:
                pixels.append(batch["pixel_values"])
                labels.append(batch["labels"])
            yield batch["pixel_values"], batch["labels"]
        if self.cache_images:
            cache.pixels, cache.labels = torch.cat(pixels), torch.cat(labels)


def make_vision_evaluator(tasks: Sequence[str] = PAPER_TASKS, split: str = "validation", **kwargs
                          ) -> Callable[[Mapping[str, torch.Tensor]], dict[str, float]]:
    """`evaluate(state_dict) -> {task: accuracy}` for the coefficient search (validation split by
    default, so merging coefficients are never chosen on test data). Keyword arguments go to
    `VisionEvaluator` (base_model, data_paths, max_samples, linearized, batch_size, ...)."""
    return VisionEvaluator(tasks, split=split, **kwargs)


def _all_trainable(module: torch.nn.Module) -> torch.nn.Module:
    # LinearizedModel linearizes the parameters that require grad; evaluation needs all of them.
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def _is_index_buffer(key: str) -> bool:
    return key.endswith("position_ids")
