"""`TaskProbe`: one encoder, per-task frozen heads and fixed evaluation subsets, for the diagnostics.

Every diagnostic in `saft_hf.analysis` asks the same few questions of a model at some point
theta in weight space: "what are the logits / the loss / the per-block features on task t?".
The probe answers them without repeated work:

* evaluation subsets are chosen once (fixed seed) and preprocessed once into batches of tensors;
* `set_weights` copies new weights into the encoder's existing tensors in place (no reallocation,
  so cached views of the parameters stay valid and moving around the grid costs one fused copy);
* `loss(task, params=...)` goes through `torch.func.functional_call`, so it is differentiable with
  respect to `params` (Hessian-vector products) without touching the stored weights.

The probe is generic for any `EncoderClassifier`-style model: an encoder module, a feature function
from `saft_hf.heads.FEATURE_FUNCTIONS` ("mean_pooled_text", "clip_image") that maps
`(encoder, inputs) -> [batch, dim]`, and a head per task mapping features to logits.
Task vectors and `set_weights` use the encoder's own `state_dict` keys (what
`model.encoder.save_pretrained` writes); keys prefixed with ``encoder.`` (an `EncoderClassifier`
state dict) are accepted too.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from saft_hf.heads import FEATURE_FUNCTIONS

Batch = dict[str, torch.Tensor]

__all__ = ["TaskProbe", "find_transformer_blocks", "fixed_subset_indices", "batches_from_tensors"]


# --- helpers used when building a probe -------------------------------------------------------------


def fixed_subset_indices(num_examples: int, subset_size: int | None, seed: int = 0) -> list[int]:
    """The same `subset_size` example indices for a given (num_examples, seed), sorted.

    `subset_size=None` (or >= num_examples) keeps every example.
    """
    if num_examples <= 0:
        raise ValueError("fixed_subset_indices: the task has no examples; give a non-empty evaluation split")
    if subset_size is None or subset_size >= num_examples:
        return list(range(num_examples))
    if subset_size <= 0:
        raise ValueError(f"subset_size must be positive, got {subset_size}")
    gen = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(num_examples, generator=gen)[:subset_size].tolist())


def batches_from_tensors(inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, batch_size: int) -> tuple[list[Batch], torch.Tensor]:
    """Split already-preprocessed tensors (first dim = examples) into batches."""
    n = labels.shape[0]
    for k, v in inputs.items():
        if v.shape[0] != n:
            raise ValueError(f"input {k!r} has {v.shape[0]} rows but there are {n} labels")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches = [{k: v[i:i + batch_size] for k, v in inputs.items()} for i in range(0, n, batch_size)]
    return batches, labels.long()


def find_transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks of `model`, found generically.

    The blocks are the children of the longest `nn.ModuleList` whose children all share one class
    (BERT/MiniLM: ``encoder.layer.N``; CLIP vision: ``vision_model.encoder.layers.N``; T5:
    ``encoder.block.N``). Pass explicit names to `TaskProbe(block_names=...)` for anything else.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and (best is None or len(module) > best[0]):
                best = (len(module), name, module)
    if best is None:
        raise ValueError(
            f"could not find transformer blocks in {type(model).__name__} (no nn.ModuleList of identical modules); "
            "pass block_names=[...] with the module names whose outputs to record"
        )
    _, prefix, module_list = best
    return [f"{prefix}.{i}" if prefix else str(i) for i in range(len(module_list))]


class _FeatureModel(nn.Module):
    """encoder + feature function as one module, so `functional_call` can reparametrize it."""

    def __init__(self, encoder: nn.Module, features: Callable[[nn.Module, dict], torch.Tensor]):
        super().__init__()
        self.encoder = encoder
        self._features = features

    def forward(self, **inputs):
        return self._features(self.encoder, inputs)


# --- the probe ----------------------------------------------------------------------------------------


class TaskProbe:
    """Evaluate one encoder with several frozen task heads on fixed, preprocessed subsets.

    Args:
        encoder: the module task vectors cover (e.g. `BertModel`, `CLIPVisionModelWithProjection`).
        heads: task name -> head module mapping features `[batch, dim]` to logits (`ZeroShotHead`).
        data: task name -> (list of input batches, labels tensor of all examples in batch order).
            Build it once (fixed-seed subset, tokenized / pixel tensors); see `from_tensors`, `from_texts`.
        features: a key of `saft_hf.heads.FEATURE_FUNCTIONS` or a callable `(encoder, inputs) -> features`.
        block_names: module names (inside `encoder`) whose outputs `layer_features` records;
            default: found by `find_transformer_blocks`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        data: Mapping[str, tuple[Sequence[Batch], torch.Tensor]],
        features: str | Callable[[nn.Module, dict], torch.Tensor] = "mean_pooled_text",
        block_names: Sequence[str] | None = None,
    ):
        if isinstance(features, str):
            if features not in FEATURE_FUNCTIONS:
                raise ValueError(f"unknown feature function {features!r}; choose one of {sorted(FEATURE_FUNCTIONS)} or pass a callable")
            feature_fn = FEATURE_FUNCTIONS[features]
        else:
            feature_fn = features
        missing = set(data) - set(heads)
        if missing:
            raise ValueError(f"tasks {sorted(missing)} have data but no head; give a head for every task")
        if not data:
            raise ValueError("TaskProbe needs at least one task in `data`")
        self.encoder = encoder.eval()
        self.features = features
        self._model = _FeatureModel(self.encoder, feature_fn).eval()
        self.heads = {t: heads[t].eval() for t in data}
        self._batches: dict[str, list[Batch]] = {}
        self._labels: dict[str, torch.Tensor] = {}
        for task, (batches, labels) in data.items():
            batches = list(batches)
            n = sum(_batch_len(b) for b in batches)
            if n != labels.shape[0]:
                raise ValueError(f"task {task!r}: batches hold {n} examples but labels has {labels.shape[0]}")
            self._batches[task] = batches
            self._labels[task] = labels.long()
        self.block_names = list(block_names) if block_names is not None else find_transformer_blocks(self.encoder)
        modules = dict(self.encoder.named_modules())
        unknown = [b for b in self.block_names if b not in modules]
        if unknown:
            raise ValueError(f"block_names {unknown} are not modules of {type(self.encoder).__name__}")
        self._blocks = [modules[b] for b in self.block_names]
        # name -> the live tensor behind each state_dict entry (params and buffers), for in-place writes.
        self._weights: dict[str, torch.Tensor] = dict(self.encoder.state_dict(keep_vars=True))
        for name in self._weights:
            self._weights[name] = self._weights[name].data

    # --- construction helpers -------------------------------------------------------------------

    @classmethod
    def from_tensors(
        cls,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        tensors: Mapping[str, tuple[Mapping[str, torch.Tensor], torch.Tensor]],
        features: str | Callable = "mean_pooled_text",
        subset_size: int | None = 128,
        seed: int = 0,
        batch_size: int = 64,
        block_names: Sequence[str] | None = None,
    ) -> "TaskProbe":
        """Build from preprocessed tensors per task: `{task: ({"input_ids": ..., ...}, labels)}`.

        A fixed-seed subset of `subset_size` examples is taken per task (same seed for every task).
        """
        data = {}
        for task, (inputs, labels) in tensors.items():
            idx = torch.tensor(fixed_subset_indices(labels.shape[0], subset_size, seed))
            data[task] = batches_from_tensors({k: v[idx] for k, v in inputs.items()}, labels[idx], batch_size)
        return cls(encoder, heads, data, features=features, block_names=block_names)

    @classmethod
    def from_texts(
        cls,
        encoder: nn.Module,
        tokenizer,
        heads: Mapping[str, nn.Module],
        texts: Mapping[str, tuple[Sequence[str], Sequence[int]]],
        subset_size: int | None = 128,
        seed: int = 0,
        batch_size: int = 64,
        max_length: int = 128,
        features: str | Callable = "mean_pooled_text",
        block_names: Sequence[str] | None = None,
    ) -> "TaskProbe":
        """Build a text probe: `{task: (texts, labels)}`; the subset is tokenized once.

        Every task's subset is padded to one common length (its longest example) so per-block features
        of all batches line up for `layer_features`.
        """
        data = {}
        for task, (task_texts, labels) in texts.items():
            if len(task_texts) != len(labels):
                raise ValueError(f"task {task!r}: {len(task_texts)} texts but {len(labels)} labels")
            idx = fixed_subset_indices(len(task_texts), subset_size, seed)
            enc = tokenizer([task_texts[i] for i in idx], padding="longest", truncation=True,
                            max_length=max_length, return_tensors="pt")
            inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            data[task] = batches_from_tensors(inputs, torch.tensor([int(labels[i]) for i in idx]), batch_size)
        return cls(encoder, heads, data, features=features, block_names=block_names)

    @classmethod
    def from_token_ids(
        cls,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        token_ids: Mapping[str, tuple[Sequence[Sequence[int]], Sequence[int]]],
        pad_id: int = 0,
        subset_size: int | None = 128,
        seed: int = 0,
        batch_size: int = 64,
        features: str | Callable = "mean_pooled_text",
        block_names: Sequence[str] | None = None,
    ) -> "TaskProbe":
        """Build a text probe from already tokenized examples: `{task: (list of token-id lists, labels)}`.

        The fixed-seed subset is ordered by length before batching so each batch pads little
        (the order is fixed too; labels follow it).
        """
        data = {}
        for task, (ids, labels) in token_ids.items():
            if len(ids) != len(labels):
                raise ValueError(f"task {task!r}: {len(ids)} token sequences but {len(labels)} labels")
            idx = sorted(fixed_subset_indices(len(ids), subset_size, seed), key=lambda i: (len(ids[i]), i))
            batches = []
            for start in range(0, len(idx), batch_size):
                rows = [list(ids[i]) for i in idx[start:start + batch_size]]
                width = max(len(r) for r in rows)
                input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, row in enumerate(rows):
                    input_ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
                    mask[r, :len(row)] = 1
                batches.append({"input_ids": input_ids, "attention_mask": mask})
            data[task] = (batches, torch.tensor([int(labels[i]) for i in idx], dtype=torch.long))
        return cls(encoder, heads, data, features=features, block_names=block_names)

    # --- what the diagnostics use -------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return list(self._batches)

    def num_examples(self, task: str) -> int:
        return int(self._labels[self._task(task)].shape[0])

    def batches(self, task: str) -> list[Batch]:
        """The preprocessed input batches of `task` (do not modify)."""
        return self._batches[self._task(task)]

    def labels(self, task: str) -> torch.Tensor:
        return self._labels[self._task(task)]

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """state_dict key -> the live tensor in the encoder (write into these in place; no grad)."""
        return self._weights

    def canonical_key(self, key: str) -> str:
        """Map a task-vector key to the encoder's own state_dict key (accepts an ``encoder.`` prefix)."""
        if key in self._weights:
            return key
        if key.startswith("encoder.") and key[len("encoder."):] in self._weights:
            return key[len("encoder."):]
        raise KeyError(
            f"weight {key!r} is not in the probed encoder ({type(self.encoder).__name__}); task vectors must be "
            "computed from the same architecture's encoder state dict"
        )

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A detached copy of the encoder's current weights (state_dict keys)."""
        return {k: v.detach().clone() for k, v in self._weights.items()}

    @torch.no_grad()
    def set_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy `state_dict` into the encoder's existing tensors in place (one fused copy).

        Keys not in `state_dict` keep their current values, so a partial dict is fine.
        """
        dst, src = [], []
        for key, value in state_dict.items():
            target = self._weights[self.canonical_key(key)]
            if target.shape != value.shape:
                raise ValueError(f"weight {key!r}: shape {tuple(value.shape)} does not match the encoder's {tuple(target.shape)}")
            dst.append(target)
            src.append(value.to(device=target.device, dtype=target.dtype))
        if dst:
            torch._foreach_copy_(dst, src)

    def logits(self, task: str) -> torch.Tensor:
        """Logits `[n, num_classes]` of the current weights on the task's subset."""
        task = self._task(task)
        head = self.heads[task]
        with torch.inference_mode():
            return torch.cat([head(self._model(**b)) for b in self._batches[task]])

    def loss(self, task: str, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean cross-entropy on the task's subset (a 0-d tensor).

        Without `params`: the current weights, no autograd. With `params` (state_dict keys -> tensors,
        a partial dict is fine): computed by `torch.func.functional_call` with those tensors in place of
        the encoder's, differentiable with respect to them (for gradients and Hessian-vector products).
        """
        task = self._task(task)
        if params is None:
            return F.cross_entropy(self.logits(task), self._labels[task])
        total = None
        for index in range(len(self._batches[task])):
            part = self.batch_loss(task, index, params) * self.batch_size(task, index)
            total = part if total is None else total + part
        return total / self._labels[task].shape[0]

    def num_batches(self, task: str) -> int:
        return len(self._batches[self._task(task)])

    def batch_size(self, task: str, index: int) -> int:
        return _batch_len(self._batches[self._task(task)][index])

    def batch_loss(self, task: str, index: int, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean cross-entropy on batch `index` of the task's subset; differentiable w.r.t. `params` if given.

        `loss` is the size-weighted mean of these; per-batch terms keep Hessian-vector products in
        bounded memory (one batch's graph at a time).
        """
        task = self._task(task)
        batch = self._batches[task][index]
        start = sum(_batch_len(b) for b in self._batches[task][:index])
        labels = self._labels[task][start:start + _batch_len(batch)]
        if params is None:
            with torch.inference_mode():
                return F.cross_entropy(self.heads[task](self._model(**batch)), labels)
        call_params = {f"encoder.{self.canonical_key(k)}": v for k, v in params.items()}
        feats = torch.func.functional_call(self._model, call_params, args=(), kwargs=batch, strict=False)
        return F.cross_entropy(self.heads[task](feats), labels)

    def parameter_keys(self) -> list[str]:
        """state_dict keys of the encoder's floating-point parameters (not buffers): what a Hessian covers."""
        return [k for k, p in self.encoder.named_parameters() if torch.is_floating_point(p)]

    def layer_features(self, task: str) -> list[torch.Tensor]:
        """Per-block outputs on the task's subset: one tensor `[n, ...]` per block in `block_names`.

        Padding tokens (where the batch has `attention_mask == 0`) are zeroed, and batches of
        different sequence lengths are zero-padded to the longest, so rows compare position by position.
        """
        task = self._task(task)
        per_block: list[list[torch.Tensor]] = [[] for _ in self._blocks]
        current: dict[str, torch.Tensor | None] = {"mask": None}

        def make_hook(i):
            def hook(_module, _args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                if hasattr(out, "last_hidden_state"):
                    out = out.last_hidden_state
                out = out.detach().float()
                mask = current["mask"]
                if mask is not None and out.dim() == 3 and out.shape[1] == mask.shape[1]:
                    out = out * mask.unsqueeze(-1).to(out.dtype)
                per_block[i].append(out.clone())
            return hook

        handles = [blk.register_forward_hook(make_hook(i)) for i, blk in enumerate(self._blocks)]
        try:
            with torch.inference_mode():
                for b in self._batches[task]:
                    current["mask"] = b.get("attention_mask")
                    self._model(**b)
        finally:
            for h in handles:
                h.remove()
        return [_cat_padded(parts) for parts in per_block]

    # --- internals ------------------------------------------------------------------------------

    def _task(self, task: str) -> str:
        if task not in self._batches:
            raise KeyError(f"unknown task {task!r}; this probe has tasks {self.tasks}")
        return task

    @contextlib.contextmanager
    def weights(self, state_dict: Mapping[str, torch.Tensor]):
        """Temporarily set `state_dict`; restore the previous weights afterwards."""
        keys = [self.canonical_key(k) for k in state_dict]
        saved = {k: self._weights[k].clone() for k in keys}
        self.set_weights(state_dict)
        try:
            yield self
        finally:
            self.set_weights(saved)


def _batch_len(batch: Batch) -> int:
    for v in batch.values():
        return int(v.shape[0])
    raise ValueError("empty batch (no input tensors)")


def _cat_padded(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    parts = list(parts)
    if len({p.shape[1:] for p in parts}) <= 1:
        return torch.cat(parts)
    # sequence lengths differ between batches: zero-pad every dim to the largest
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        pad = []
        for d in reversed(range(1, p.dim())):
            pad += [0, shape[d - 1] - p.shape[d]]
        padded.append(F.pad(p, pad))
    return torch.cat(padded)
