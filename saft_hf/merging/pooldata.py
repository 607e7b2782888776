"""A `MergeData` built from a task family's pieces: per-task example sources per split, a model
holder and a logits function. Each family (saft_hf/<family>/pools.py) fills one in from its own
task pool; this module is core (no family import).

The fingerprint hashes what the statistics depend on (the family's description of its dataset
and preprocessing, the example count, the batch size, the head tensors), so RegMean / Fisher
statistics are cached on disk beside the checkpoints and recomputed when any of them changes.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .data import SPLITS, MergeData


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of tensors' shapes, dtypes and bytes (heads, token ids)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PoolMergeData(MergeData):
    """tasks; `batches_fn(task, split) -> iterable of input dicts` (labels not included);
    `load(state_dict) -> module` (the family's reusable model with the weights loaded);
    `logits_fn(model, batch, task) -> [N, C]`; `describe(task, split) -> str | None`: everything
    about the inputs and head that the statistics depend on (None: no disk cache)."""

    def __init__(self, tasks: Sequence[str], batches_fn: Callable[[str, str], Iterable[Any]],
                 load: Callable[[Mapping[str, torch.Tensor]], torch.nn.Module],
                 logits_fn: Callable[[torch.nn.Module, Any, str], torch.Tensor],
                 describe: Callable[[str, str], str | None] | None = None, family: str = ""):
        self.tasks = list(tasks)
        self.family = family
        self._batches, self._load, self._logits, self._describe = batches_fn, load, logits_fn, describe

    def _check(self, task: str, split: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"{self.family or 'task'} merge data: unknown task {task!r}; it has {self.tasks}")
        if split not in SPLITS:
            raise ValueError(f"{self.family or 'task'} merge data: unknown split {split!r}; choose one of {SPLITS}")

    def model(self, state_dict):
        return self._load(state_dict).eval()

    def batches(self, task, split):
        self._check(task, split)
        return self._batches(task, split)

    def logits(self, model, batch, task):
        return self._logits(model, batch, task)

    def fingerprint(self, task, split):
        self._check(task, split)
        if self._describe is None:
            return None
        text = self._describe(task, split)
        return None if text is None else hashlib.sha256(f"{self.family}|{task}|{split}|{text}".encode()).hexdigest()
