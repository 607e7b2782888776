"""The CLIP vision family's task pool and model pool (saft_hf.pools protocol).

Models are `CLIPVisionModelWithProjection` state dicts (what the fine-tuning recipe saves); each
task is scored by its frozen zero-shot head (accuracy). `max_examples` takes a fixed seeded subset
(`VisionEvaluator`'s `max_samples`). One `VisionEvaluator` per (split, max_examples) is built on first
use and kept: validation images stay in memory (searched many times), test images stream.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from saft_hf.pools import CheckpointModelPool, PerExampleScores, TaskInfo, TaskPool
from saft_hf.tasks.vision import get_vision_task

CACHE_IMAGES = {"validation": True, "test": False}


class VisionTaskPool(TaskPool):
    family = "vision"

    def __init__(self, tasks: Sequence[str], base_model: str, data_paths: Mapping[str, str] | None = None,
                 head_cache_dir: str | None = None, batch_size: int = 128, device: str | None = None,
                 linearized: bool = False, dataset_cache_dir: str | None = None, progress: bool = True,
                 cache_images: Mapping[str, bool] | None = None):
        self._tasks = [get_vision_task(t).name for t in tasks]
        self.base_model, self.linearized = base_model, linearized
        self._common = dict(base_model=base_model, data_paths=data_paths, head_cache_dir=head_cache_dir,
                            batch_size=batch_size, device=device, linearized=linearized,
                            dataset_cache_dir=dataset_cache_dir, progress=progress)
        self._cache_images = {**CACHE_IMAGES, **(cache_images or {})}
        self._evaluators: dict = {}

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def task_info(self, task: str) -> TaskInfo:
        self.check_tasks([task])
        return TaskInfo(task, "zero_shot_classifier", "accuracy", get_vision_task(task).num_classes)

    def evaluator(self, split: str, max_examples: int | None = None):
        """The `VisionEvaluator` of a split and subset size (built once)."""
        from saft_hf.vision.evaluate import VisionEvaluator

        self.check_split(split)
        key = (split, max_examples)
        if key not in self._evaluators:
            self._evaluators[key] = VisionEvaluator(self._tasks, split=split, max_samples=max_examples,
                                                    cache_images=self._cache_images[split], **self._common)
        return self._evaluators[key]

    def evaluate(self, model, split="validation", tasks=None, max_examples=None):
        tasks = self.check_tasks(tasks)
        state = model.state_dict() if isinstance(model, torch.nn.Module) else model
        return self.evaluator(split, max_examples).evaluate(state, tasks)

    def evaluate_per_example(self, model, split="test", tasks=None, max_examples=None):
        tasks = self.check_tasks(tasks)
        state = model.state_dict() if isinstance(model, torch.nn.Module) else model
        hits = self.evaluator(split, max_examples).evaluate_per_example(state, tasks)
        return PerExampleScores({t: int(h.sum()) / max(h.numel(), 1) for t, h in hits.items()},
                                {t: h.numpy() for t, h in hits.items()})

    def unlabeled_inputs(self, task, split="validation", max_examples=None):
        from saft_hf.vision.data import normalize_uint8

        ev = self.evaluator(split, max_examples)
        for pixels, _labels in ev.batches(task):
            yield {"pixel_values": normalize_uint8(pixels, ev.processor)}


    def _merge_evaluator(self, split: str, max_examples: int | None):
        from saft_hf.vision.evaluate import VisionEvaluator

        key = ("merge_data", split, max_examples)
        if key not in self._evaluators:
            common = {**self._common, "progress": False}
            self._evaluators[key] = VisionEvaluator(self._tasks, split=split, max_samples=max_examples,
                                                    cache_images=split == "validation", **common)
        return self._evaluators[key]

    def merge_data(self, max_examples: int | None = None):
        """MergeData over the vision tasks: preprocessed image batches of "train" / "validation" /
        "test" (the fine-tuning splits; `max_examples`: the evaluator's fixed seeded subset) and
        logits = the task's frozen CLIP zero-shot head on the image embeddings."""
        from saft_hf.merging.pooldata import PoolMergeData, tensor_digest
        from saft_hf.vision.data import normalize_uint8

        if self.linearized:
            raise ValueError("vision merge data: the task pool is linearized; data-reading merges need the plain "
                             "CLIP encoder (build the pool with linearized=False)")
        holder = self._merge_evaluator("validation", max_examples)

        def batches(task, split):
            ev = self._merge_evaluator(split, max_examples)
            for pixels, _labels in ev.batches(task):
                yield {"pixel_values": normalize_uint8(pixels.to(ev.device), ev.processor)}

        def load(state_dict):
            holder.load_weights(state_dict)
            return holder.encoder

        def logits(model, batch, task):
            return holder.head(task)(model(pixel_values=batch["pixel_values"]).image_embeds)

        def describe(task, split):
            paths = self._common["data_paths"] or {}
            return (f"vision|{self.base_model}|{paths.get(task)}|{split}|n={max_examples}|"
                    f"batch={self._common['batch_size']}|{tensor_digest([holder.head(task).weight])}")

        return PoolMergeData(self.tasks, batches, load, logits, describe, family="vision")


def merge_data(tasks: Sequence[str], base_model: str, max_examples: int | None = None, **pool_args):
    """The vision tasks' MergeData for a merge config: `data: {callable: saft_hf.vision.pools:merge_data,
    args: {tasks: [dtd, eurosat], base_model: PRETRAINED_DIR, data_paths: {...}}}` (other args: VisionTaskPool's)."""
    return VisionTaskPool(tasks, base_model, **pool_args).merge_data(max_examples)


def _load_encoder_state(path: str) -> dict[str, torch.Tensor]:
    from saft_hf.vision.model import load_vision_encoder

    return load_vision_encoder(path).state_dict()


def vision_model_pool(pretrained: str, checkpoints: Mapping[str, str]) -> CheckpointModelPool:
    """Fine-tuning recipe output directories ({task: run dir}) and the CLIP they started from."""
    return CheckpointModelPool(pretrained, checkpoints, _load_encoder_state)
