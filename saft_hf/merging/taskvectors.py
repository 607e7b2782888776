"""Lazy task vectors tau = theta_ft - theta_0, one key at a time: from a fine-tuned checkpoint,
from an in-memory task-vector dict, from a PEFT LoRA adapter (delta = B @ A * scale), and DARE
(random drop + rescale) on top of any of them."""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Mapping

import torch

from .io import ADAPTER_CONFIG, CheckpointError, SafetensorsSource, TensorSource, TorchBinSource


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Deltas of fp16/bf16 weights lose most of their bits in half precision: compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TaskVector:
    """One task's delta, read per key. `get(key, base)` gets the pretrained tensor (already loaded)."""

    name: str = "task"
    description: str = "task vector"

    def get(self, key: str, base: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The delta for `key` (or its rows start:stop); `base` is the matching pretrained piece."""
        raise NotImplementedError

    def check(self, keys: list[str], base: TensorSource) -> list[str]:
        """Validate against the base keys; return notes for the log/card."""
        return []

    def get_into(self, out: torch.Tensor, key: str, base: torch.Tensor, rows=None) -> None:
        """Write the delta into `out` (a row of a preallocated stack)."""
        out.copy_(self.get(key, base, rows))


class CheckpointTaskVector(TaskVector):
    def __init__(self, finetuned: TensorSource, name: str | None = None):
        self.source = finetuned
        self.name = name or finetuned.name
        self.description = f"{self.name} - pretrained"

    def get(self, key, base, rows=None):
        ft = self.source.get(key) if rows is None else self.source.get_rows(key, *rows)
        dt = compute_dtype(base.dtype)
        if self.source.fresh_tensors and ft.dtype == dt:
            return ft.sub_(base)  # our own buffer: subtract in place, no extra allocation
        return ft.to(dt) - base.to(dt)

    def get_into(self, out, key, base, rows=None):
        if out.dtype == base.dtype:  # read straight into the stack, then subtract in place
            self.source.read_into(key, out, rows)
            out.sub_(base)
        else:
            out.copy_(self.get(key, base, rows))

    def check(self, keys, base):
        own = set(self.source.keys())
        for k in keys:
            if k not in own:
                raise CheckpointError(
                    f"key {k!r} of the pretrained model is missing from fine-tuned checkpoint {self.name}; "
                    "both must come from the same architecture (saved with save_pretrained)"
                )
            s_base, d_base = base.info(k)
            s_ft, d_ft = self.source.info(k)
            if s_base != s_ft:
                hint = " (vocabulary size differs? resize the embeddings to the base size first)" if "embed" in k or "lm_head" in k or "shared" in k else ""
                raise CheckpointError(f"shape mismatch for {k!r}: pretrained {list(s_base)} vs {self.name} {list(s_ft)}{hint}")
            if d_base != d_ft:
                raise CheckpointError(
                    f"dtype mismatch for {k!r}: pretrained {d_base} vs {self.name} {d_ft}; save both in the same "
                    "dtype (e.g. model.to(torch.float32).save_pretrained(...))"
                )
        return []


class DictTaskVector(TaskVector):
    def __init__(self, deltas: Mapping[str, torch.Tensor], name: str = "task"):
        self.deltas = deltas
        self.name = name
        self.description = f"task vector {name}"

    def get(self, key, base, rows=None):
        d = self.deltas[key] if rows is None else self.deltas[key][rows[0]:rows[1]]
        return d.to(compute_dtype(base.dtype))

    def check(self, keys, base):
        for k in keys:
            if k not in self.deltas:
                raise KeyError(f"task vector {self.name} has no entry for {k!r}; build it with task_vector(pretrained, finetuned)")
            if tuple(self.deltas[k].shape) != base.info(k)[0]:
                raise ValueError(f"shape mismatch for {k!r}: pretrained {list(base.info(k)[0])} vs task vector {self.name} {list(self.deltas[k].shape)}")
        return []


def _pattern_value(patterns: Mapping[str, float], module: str, default):
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?{pat}$", module):
            return val
    return default


class LoraTaskVector(TaskVector):
    """Task vector of a PEFT LoRA adapter: for each adapted module the full delta
    `B @ A * lora_alpha / r` (or / sqrt(r) with rsLoRA), transposed for fan_in_fan_out layers;
    weights saved in full (modules_to_save, trained biases) contribute `saved - pretrained`;
    every other parameter has a zero delta."""

    PREFIX = "base_model.model."

    def __init__(self, adapter_dir: str | Path, name: str | None = None):
        adapter_dir = Path(adapter_dir)
        self.name = name or str(adapter_dir)
        self.description = f"LoRA adapter {self.name}: full delta B@A*scale merged as the task vector"
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{adapter_dir} is a {cfg.get('peft_type')} adapter; only LoRA adapters can be merged")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{adapter_dir} uses DoRA, whose delta is not B@A*scale; merge_and_unload() it first and pass the merged model")
        self.config = cfg
        files = sorted(adapter_dir.glob("adapter_model*.safetensors"))
        if files:
            src: TensorSource = SafetensorsSource(files, self.name, adapter_dir)
        elif (adapter_dir / "adapter_model.bin").exists():
            src = TorchBinSource([adapter_dir / "adapter_model.bin"], self.name, adapter_dir)
        else:
            raise CheckpointError(f"no adapter_model.safetensors or adapter_model.bin in {adapter_dir}")
        self.source = src
        self.pairs: dict[str, tuple[str, str, str]] = {}  # base key -> (A key, B key, kind)
        self.full: dict[str, str] = {}  # base key -> saved full tensor key
        for k in src.keys():
            inner = k[len(self.PREFIX):] if k.startswith(self.PREFIX) else k
            m = re.fullmatch(r"(.*)\.lora_(A|embedding_A)(?:\.default)?(?:\.weight)?", inner)
            if m:
                module = m.group(1)
                emb = m.group(2) == "embedding_A"
                a_key = k
                b_key = k.replace("lora_embedding_A", "lora_embedding_B") if emb else k.replace("lora_A", "lora_B")
                self.pairs[f"{module}.weight"] = (a_key, b_key, "embedding" if emb else "linear", module)
                continue
            if re.search(r"\.lora_(B|embedding_B)", inner):
                continue
            inner = inner.replace(".modules_to_save.default", "")
            self.full[inner] = k

    def _scale(self, module: str, r: int) -> float:
        alpha = _pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8))
        return alpha / (r ** 0.5 if self.config.get("use_rslora") else r)

    def delta(self, key: str, dtype: torch.dtype, rows=None) -> torch.Tensor | None:
        if key in self.pairs:
            a_key, b_key, kind, module = self.pairs[key]
            A = self.source.get(a_key).to(dtype)
            B = self.source.get(b_key).to(dtype)
            if A.dim() != 2 or B.dim() != 2:
                raise CheckpointError(f"LoRA on {module} is not a linear/embedding layer (A shape {list(A.shape)}); merge_and_unload() it first")
            scale = self._scale(module, A.shape[0])
            if kind == "embedding" or self.config.get("fan_in_fan_out"):
                # delta = (B @ A).T, whose rows are columns of A
                return (B @ (A if rows is None else A[:, rows[0]:rows[1]])).T * scale
            return (B if rows is None else B[rows[0]:rows[1]]) @ A * scale
        return None

    def get(self, key, base, rows=None):
        dt = compute_dtype(base.dtype)
        d = self.delta(key, dt, rows)
        if d is not None:
            if tuple(d.shape) != tuple(base.shape):
                raise CheckpointError(f"LoRA delta for {key!r} has shape {list(d.shape)} but the pretrained weight is {list(base.shape)}")
            return d
        if key in self.full:
            saved = self.source.get(self.full[key]) if rows is None else self.source.get_rows(self.full[key], *rows)
            return saved.to(dt) - base.to(dt)
        return torch.zeros(base.shape, dtype=dt)

    def check(self, keys, base):
        known = set(keys)
        unknown = [k for k in list(self.pairs) + list(self.full) if k not in known]
        if unknown:
            raise CheckpointError(
                f"LoRA adapter {self.name} targets parameters missing from the pretrained model: {unknown[:5]}; "
                "is it an adapter for this base model?"
            )
        return [f"{self.name}: LoRA adapter merged as the full delta B@A*scale for {len(self.pairs)} module(s)"
                + (f", plus {len(self.full)} fully saved tensor(s)" if self.full else "")]


# ----------------------------------------------------------------------------------------------
# DARE


def key_seed(seed: int, key: str) -> int:
    """A seed per (seed, key), independent of read order, so repeated passes drop the same entries."""
    return (zlib.crc32(key.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def dare_tensor(delta: torch.Tensor, drop_rate: float, seed: int, key: str, rescale="inverse") -> torch.Tensor:
    if drop_rate == 0:
        return delta
    gen = torch.Generator().manual_seed(key_seed(seed, key))
    keep = torch.rand(delta.shape, generator=gen) >= drop_rate
    kept = delta * keep
    if rescale in (True, "inverse"):
        return kept / (1.0 - drop_rate)
    if rescale == "l1":
        # mergekit-style: survivors scaled so the tensor's L1 norm matches the original.
        norm_kept = kept.abs().sum()
        return kept * (delta.abs().sum() / norm_kept) if norm_kept > 0 else kept
    return kept


def check_dare_args(drop_rate: float, rescale) -> str:
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"DARE drop_rate must be in [0, 1), got {drop_rate}")
    if rescale is True:
        return "inverse"
    if rescale in (False, None, "none"):
        return "none"
    if rescale not in ("inverse", "l1"):
        raise ValueError(f"DARE rescale must be True/'inverse' (1/(1-p)), 'l1' (match L1 norm) or False, got {rescale!r}")
    return rescale


class TransformedTaskVector(TaskVector):
    """A task vector with a registered transform (DARE, ...) applied tensor by tensor.

    The transform sees the whole tensor (so a random mask does not depend on how the merge
    splits it into row blocks); row blocks then take their slice of the cached result.
    """

    def __init__(self, inner: TaskVector, transform, params: dict, task_index: int, base_source=None):
        self.inner, self.transform, self.params, self.task_index = inner, transform, dict(params), task_index
        self.base_source = base_source  # set by check(); needed to rebuild whole tensors for row blocks
        self.name = inner.name
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items())
        self.description = f"{inner.description} with {transform.label}({shown})"
        self._full_cache = None

    def _apply(self, key, full_delta):
        return self.transform.apply(full_delta, key, self.task_index, self.params)

    def get(self, key, base, rows=None):
        if rows is None:
            return self._apply(key, self.inner.get(key, base))
        if self._full_cache is None or self._full_cache[0] != key:
            self._full_cache = None  # drop the previous tensor first
            full_base = self.base_source.get(key)
            self._full_cache = (key, self._apply(key, self.inner.get(key, full_base)))
        return self._full_cache[1][rows[0]:rows[1]]

    def check(self, keys, base):
        self.base_source = base
        return self.inner.check(keys, base)


def all_finite(t: torch.Tensor) -> bool:
    """True if no entry is NaN or Inf. Fast path: one sum (NaN and Inf propagate through it);
    only a non-finite sum (which large finite values can also cause) triggers the exact check."""
    if t.numel() == 0:
        return True
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


class NonFiniteError(CheckpointError):
    """NaN or Inf in a checkpoint (the message names the model and the tensor)."""


def nonfinite_error(kind: str, name: str, key: str) -> NonFiniteError:
    return NonFiniteError(f"{kind} {name}: tensor {key!r} holds non-finite values (NaN or Inf); fix or re-export "
                          "that checkpoint (or pass allow_nonfinite: true to merge anyway)")


def prepare_task_vectors(tasks: list[TaskVector], base: TensorSource, transforms=()) -> list[TaskVector]:
    """The task vectors with the transforms [(Transform, params), ...] applied in the given
    order, each task with its index."""
    for transform, params in transforms:
        tasks = [TransformedTaskVector(tv, transform, params, i, base) for i, tv in enumerate(tasks)]
    return tasks
