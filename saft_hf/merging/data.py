"""The data a merge method may read (RegMean, Fisher merging, AdaMerging): the protocol a task
family implements, with no dependency on any family.

A `MergeData` gives, for every task being merged, its unlabeled input batches and a way to turn a
state dict into a model and a batch into that task's classification logits. Methods never see
labels: RegMean records the inputs of linear layers, Fisher merging differentiates the model's own
predictive distribution, AdaMerging minimises the entropy of its predictions.

Subclass `MergeData` (or build one from functions with `MergeData.from_functions`) and pass it as
`data=` to `merge(...)`, `regmean(...)`, `fisher_merging(...)`, `adamerging(...)`,
`search_coefficients(...)`, or name a callable returning one in a merge config
(`data: package.module:function`).
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

SPLITS = ("train", "validation", "test")


class MergeData:
    """What a data-reading merge needs from a task family. Implement:

    - `tasks`: the task names, one per model being merged. Models are matched to tasks by name
      (the merge config's model `name`, or the keys of a dict of state dicts / task vectors);
      if the names differ, by position (same count required).
    - `model(state_dict) -> nn.Module`: a module holding these weights (all keys of the merged
      state dict, float and buffers), in eval mode. It may return the same instance every time
      with the weights loaded in place: a method is done with one model before asking for the next.
    - `batches(task, split) -> iterable`: the task's input batches, labels not needed (ignored if
      present). `split` is "train", "validation" or "test". Every call starts again from the
      beginning in the same order (deterministic), so cached statistics stay valid.
    - `logits(model, batch, task) -> Tensor [N, C]`: the task's classification logits of `model`
      (its head included) on a batch of N examples. It must compute them by calling `model` (or
      its submodules): methods hook its linear layers, differentiate through it, and call it with
      substituted weights (torch.func.functional_call).

    Optional (defaults below):

    - `state_key(name) -> str | None`: the state-dict key of the model's parameter or buffer
      `name` (default: the same string); None if the tensor is not part of the merged state dict
      (e.g. a head the family adds around the merged encoder).
    - `fingerprint(task, split) -> str | None`: a string that changes whenever the inputs or the
      heads change (dataset and revision, number of examples, preprocessing, batch size, head
      weights). Statistics are cached on disk beside the checkpoints only when it is not None;
      without it they are cached in memory for the lifetime of this object.
    - `split_batch(batch) -> list`: the batch as single-example batches (Fisher merging needs
      per-example gradients). The default slices tensors along dim 0 inside dicts, lists and
      tuples, and copies anything else unchanged.
    """

    tasks: Sequence[str] = ()

    def model(self, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        raise NotImplementedError

    def batches(self, task: str, split: str) -> Iterable[Any]:
        raise NotImplementedError

    def logits(self, model: torch.nn.Module, batch: Any, task: str) -> torch.Tensor:
        raise NotImplementedError

    def state_key(self, name: str) -> str | None:
        return name

    def fingerprint(self, task: str, split: str) -> str | None:
        return None

    def split_batch(self, batch: Any) -> list:
        return split_batch(batch)

    @staticmethod
    def from_functions(tasks: Sequence[str], model: Callable, batches: Callable, logits: Callable,
                       state_key: Callable | None = None, fingerprint: Callable | None = None,
                       split_batch: Callable | None = None) -> "MergeData":
        """A MergeData from plain functions with the signatures of the methods above."""
        return _FunctionData(list(tasks), model, batches, logits, state_key, fingerprint, split_batch)


class _FunctionData(MergeData):
    def __init__(self, tasks, model, batches, logits, state_key, fingerprint, split):
        self.tasks = tasks
        self._model, self._batches, self._logits = model, batches, logits
        self._state_key, self._fingerprint, self._split = state_key, fingerprint, split

    def model(self, state_dict):
        return self._model(state_dict)

    def batches(self, task, split):
        return self._batches(task, split)

    def logits(self, model, batch, task):
        return self._logits(model, batch, task)

    def state_key(self, name):
        return name if self._state_key is None else self._state_key(name)

    def fingerprint(self, task, split):
        return None if self._fingerprint is None else self._fingerprint(task, split)

    def split_batch(self, batch):
        return split_batch(batch) if self._split is None else self._split(batch)


def _batch_size(batch) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        n = _batch_size(v)
        if n is not None:
            return n
    return None


def _take(batch, i: int, n: int):
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1] if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: _take(v, i, n) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_take(v, i, n) for v in batch)
    if isinstance(batch, list):
        return [_take(v, i, n) for v in batch] if len(batch) != n else [batch[i]]
    return batch


def split_batch(batch) -> list:
    """Single-example batches: tensors whose first dimension is the batch size are sliced (i:i+1),
    inside dicts, tuples and lists; other values are shared."""
    n = _batch_size(batch)
    if n is None:
        raise ValueError(f"cannot split a batch of type {type(batch).__name__} into examples (no tensor with a "
                         "batch dimension found); give the MergeData a split_batch method")
    return [_take(batch, i, n) for i in range(n)]


REQUIRED = ("model", "batches", "logits")


def check_merge_data(data, method: str) -> None:
    """Refuse an object that does not provide the protocol, naming what is missing."""
    if data is None:
        raise ValueError(f"method {method} reads each task's inputs: pass data=<a saft_hf.merging.data.MergeData> "
                         "(Python) or add `data: package.module:function` (a callable returning one) to the merge "
                         "config")
    missing = [m for m in REQUIRED if not callable(getattr(data, m, None))]
    tasks = getattr(data, "tasks", None)
    if tasks is None or isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        missing.append("tasks (a list of task names)")
    if missing:
        raise TypeError(f"the data for {method} ({type(data).__name__}) lacks {', '.join(missing)}; implement "
                        "saft_hf.merging.data.MergeData (see its docstring)")


def match_tasks(data, model_names: Sequence[str]) -> tuple[list[str], str | None]:
    """The data task of each model: by name when the names are the data's tasks, else by position.
    Returns (tasks, a note when matched by position)."""
    tasks = list(data.tasks)
    names = list(model_names)
    if sorted(names) == sorted(tasks) and len(set(names)) == len(names):
        return names, None
    if len(tasks) != len(names):
        raise ValueError(f"the data has {len(tasks)} task(s) {tasks} but {len(names)} model(s) {names} are merged; "
                         "give one task per model (matched by name, or by position)")
    return tasks, f"models {names} matched to data tasks {tasks} by position (the names differ)"


def module_key_map(model: torch.nn.Module, data, keys: Sequence[str], aliases: Mapping[str, str] | None = None,
                   buffers: bool = True) -> dict[str, str]:
    """{module tensor name: merged state-dict key} for the model's parameters (and buffers) that
    are merged tensors (tied names included, mapped to their canonical key)."""
    keyset, aliases = set(keys), dict(aliases or {})
    named = list(model.named_parameters(remove_duplicate=False))
    if buffers:
        named += list(model.named_buffers(remove_duplicate=False))
    out = {}
    for name, _ in named:
        key = data.state_key(name)
        key = aliases.get(key, key) if key is not None else None
        if key in keyset:
            out[name] = key
    return out


_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def check_data_spec(spec) -> None:
    """`package.module:function`, or {callable: "package.module:function", args: {...}}."""
    if isinstance(spec, Mapping):
        bad = set(spec) - {"callable", "args"}
        if bad or "callable" not in spec:
            raise ValueError(f"`data:` mapping must have `callable: package.module:function` and optional `args: "
                             f"{{...}}`, got keys {sorted(map(str, spec))}")
        if spec.get("args") is not None and not isinstance(spec["args"], Mapping):
            raise ValueError(f"`data: args:` must be a mapping of keyword arguments, got {spec['args']!r}")
        spec = spec["callable"]
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ValueError(f"`data:` must be `package.module:function` (a Python callable returning a "
                         f"saft_hf.merging.data.MergeData), got {spec!r}")


def load_data(spec):
    """Import and call the data callable of a merge config; returns its MergeData."""
    check_data_spec(spec)
    args = {}
    if isinstance(spec, Mapping):
        args = dict(spec.get("args") or {})
        spec = spec["callable"]
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"`data: {spec}`: cannot import module {module_name!r} ({exc}); put it on PYTHONPATH") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"`data: {spec}`: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"`data: {spec}` is not callable")
    return fn(**args)
