"""Per-task statistics of data-reading merge methods (RegMean's Gram matrices, Fisher merging's
diagonal Fisher): computed with each task's fine-tuned model in one pass over its data (the
method's `collect` hook), then cached.

Cache: in memory for the lifetime of the MergeData object (key: method, the parameters the
statistics depend on, the data's fingerprint, and a hash of the model's weights); and, for
checkpoints on disk when the data has a fingerprint, in
`<checkpoint>/.saft_merge_stats/<method>-<hash>.safetensors` (key: the same, with the weight
files' names, sizes and modification times instead of a hash of their contents), written
atomically. The kernel reads a task's statistics lazily, one tensor at a time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..io_utils import atomic_path
from .data import check_merge_data, match_tasks
from .taskvectors import compute_dtype

logger = logging.getLogger(__name__)

STATS_DIRNAME = ".saft_merge_stats"
STATS_VERSION = 1  # bump when a collect hook changes what it computes


@dataclass
class StatsLocation:
    """Where one task's statistics may be cached on disk: `directory` (None: memory only) and an
    `identity` string that changes when the model's weight files change."""

    directory: Path | None = None
    identity: str | None = None


def _file_identity(paths: Sequence[Path]) -> list:
    out = []
    for p in sorted(paths):
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def checkpoint_location(path, base_path=None) -> StatsLocation:
    """The cache location of a checkpoint (HF directory or weight file) merged from `path`; a
    LoRA adapter's statistics also depend on its base model (`base_path`)."""
    from .io import resolve_checkpoint, weight_files

    def files(p: Path) -> list[Path]:
        if p.is_dir():
            found = [f for f in weight_files(p)] + [f for f in p.glob("adapter_model.*")]
            return sorted(set(found))
        return [p]

    try:
        p = resolve_checkpoint(path)
        directory = p if p.is_dir() else p.parent
        ident = _file_identity(files(p))
        if base_path is not None:
            ident += _file_identity(files(resolve_checkpoint(base_path)))
        return StatsLocation(directory, json.dumps(ident))
    except OSError as exc:
        logger.warning("statistics of %s will not be cached on disk: %s", path, exc)
        return StatsLocation()


class TaskStats:
    """One task's statistics: `get(name)` -> tensor or None, from memory or read lazily from disk."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, path: Path | None = None):
        self._tensors = dict(tensors) if tensors is not None else None
        self.path = path
        if self._tensors is None:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                self._names = set(f.keys())
        else:
            self._names = set(self._tensors)

    def names(self) -> set[str]:
        return set(self._names)

    def get(self, name: str) -> torch.Tensor | None:
        if name not in self._names:
            return None
        if self._tensors is not None:
            return self._tensors[name]
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)


_MEMORY: dict[int, dict] = {}


def _memory_cache(data) -> dict | None:
    """A dict living as long as `data` (None if it cannot be weakly referenced)."""
    k = id(data)
    if k not in _MEMORY:
        try:
            weakref.finalize(data, _MEMORY.pop, k, None)
        except TypeError:
            return None
        _MEMORY[k] = {}
    return _MEMORY[k]


def _hash_weights(state_dict: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state_dict):
        t = state_dict[k].detach().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def finetuned_state_dict(base, task, plan) -> dict[str, torch.Tensor]:
    """theta_0 + tau for every merged key, non-float buffers from the base, tied aliases shared."""
    sd = {}
    for k in plan.keys:
        pre = base.get(k)
        sd[k] = (pre.to(compute_dtype(pre.dtype)) + task.get(k, pre)).to(pre.dtype)
    for k in plan.passthrough:
        sd[k] = base.get(k)
    for alias, canonical in plan.aliases.items():
        sd[alias] = sd[canonical]
    return sd


def _cache_key(method, params: Mapping, task: str, fingerprint, model_id: str) -> str:
    spec = {"method": method.name, "version": STATS_VERSION, "task": task, "data": fingerprint, "model": model_id,
            "params": {p: params.get(p) for p in method.data_params}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _check_stats(stats, method: str) -> dict[str, torch.Tensor]:
    if not isinstance(stats, Mapping) or not all(isinstance(v, torch.Tensor) for v in stats.values()):
        raise TypeError(f"collect of {method} must return a dict name -> tensor")
    return {k: v.detach().contiguous() for k, v in stats.items()}


def prepare(ctx, data, locations: Sequence[StatsLocation] | None = None) -> None:
    """Attach the data to `ctx` and, if the method has a `collect` hook, each task's statistics."""
    method = ctx.method
    check_merge_data(data, method.name)
    ctx.data = data
    tasks, note = match_tasks(data, [tv.name for tv in ctx.tasks])
    ctx.data_tasks = tasks
    info = {"tasks": tasks}
    if note:
        info["note"] = note
    ctx.report["data"] = info
    if method.collect is None:
        return
    locations = list(locations) if locations is not None else [StatsLocation()] * len(ctx.tasks)
    memory = _memory_cache(data)
    split = ctx.params.get("split")
    cache_log = []
    ctx.stats = []
    for t, (tv, task) in enumerate(zip(ctx.tasks, tasks)):
        fingerprint = data.fingerprint(task, split) if split is not None else data.fingerprint(task, "")
        loc = locations[t]
        disk_path = None
        if loc.directory is not None and loc.identity is not None and fingerprint is not None:
            key = _cache_key(method, ctx.params, task, fingerprint, loc.identity)
            disk_path = Path(loc.directory) / STATS_DIRNAME / f"{method.name}-{key}.safetensors"
            if disk_path.exists():
                try:
                    ctx.stats.append(TaskStats(path=disk_path))
                    cache_log.append({"task": task, "source": "disk cache", "path": str(disk_path)})
                    continue
                except Exception as exc:  # a damaged cache file: recompute and replace it
                    logger.warning("ignoring unreadable statistics cache %s: %s", disk_path, exc)
        state_dict = finetuned_state_dict(ctx.base, tv, ctx.plan)
        mem_key = None
        if memory is not None and disk_path is None:  # on disk: never keep every task's statistics in RAM
            mem_key = _cache_key(method, ctx.params, task, fingerprint, _hash_weights(state_dict))
            if mem_key in memory:
                ctx.stats.append(TaskStats(memory[mem_key]))
                cache_log.append({"task": task, "source": "memory cache"})
                continue
        model = data.model(state_dict)
        model.eval()
        stats = _check_stats(method.collect(model, task, data, ctx), method.name)
        del model, state_dict
        entry = {"task": task, "source": "computed"}
        if mem_key is not None:
            memory[mem_key] = stats
        stored = None
        if disk_path is not None:
            try:
                from safetensors.torch import save_file

                with atomic_path(disk_path) as tmp:
                    save_file(stats, str(tmp), metadata={"method": method.name, "task": task})
                entry["path"] = str(disk_path)
                stored = TaskStats(path=disk_path)
                del stats
            except OSError as exc:
                logger.warning("could not cache statistics of %s in %s: %s", task, disk_path, exc)
        ctx.stats.append(stored if stored is not None else TaskStats(stats))
        cache_log.append(entry)
    info["statistics"] = cache_log
