"""On-disk merge: checkpoints in, an HF model directory out (sharded safetensors + index, the
base model's config/tokenizer files, merge_config.yaml, README.md model card), written to a
temporary directory and renamed only when complete."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..io_utils import atomic_directory, write_text_atomic
from . import registry
from .card import model_card
from .engine import run_method
from .io import ADAPTER_CONFIG, ShardedSafetensorsSink, is_lora_adapter, open_source, parse_size, resolve_checkpoint, weight_files
from .plan import build_plan, check_extra_keys
from .registry import ParamError
from .taskvectors import CheckpointTaskVector, LoraTaskVector, prepare_task_vectors

logger = logging.getLogger(__name__)

_SKIP_COPY = {"README.md", ADAPTER_CONFIG, "merge_config.yaml", "merge_report.json"}


def _what(value) -> str:
    return f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


@dataclasses.dataclass
class MergeConfig:
    """What to merge. `models`: list of {path, name?} (HF dirs, .safetensors/.bin files, or PEFT
    LoRA adapter dirs). `method`: any registered method (`saft-hf merge --help` lists them);
    `params`: its parameters, checked against the registry. `transforms`: task-vector transforms
    in front of the method, e.g. [{name: dare, drop_rate: 0.5, seed: 0}] (`dare: {...}` is an
    alias of one DARE transform). `pretrained` may be omitted only for methods that do not need
    it (weighted_average). `allow_nonfinite`: merge even if a checkpoint holds NaN/Inf."""

    models: list[dict]
    method: str = "task_arithmetic"
    pretrained: str | None = None
    params: dict = dataclasses.field(default_factory=dict)
    transforms: list = dataclasses.field(default_factory=list)
    dare: dict | None = None
    max_shard_size: str = "2GB"
    allow_nonfinite: bool = False

    @classmethod
    def from_dict(cls, raw: dict) -> "MergeConfig":
        if not isinstance(raw, dict):
            raise ValueError("merge config must be a mapping with keys pretrained, models, method, params")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = set(raw) - set(allowed)
        if unknown:
            raise ValueError(f"unknown merge config key(s) {sorted(map(str, unknown))}; allowed: {sorted(allowed)}")
        cfg = cls(**{**raw, "models": raw.get("models")})
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path) -> "MergeConfig":
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"merge config {path} not found") from None
        return cls.from_dict(raw)

    def _check_models(self) -> None:
        models = self.models
        if not models:
            raise ValueError("merge config needs `models:` - a list of fine-tuned checkpoints (paths or {path, name})")
        if not isinstance(models, (list, tuple)):
            raise ValueError(f"`models:` must be a list of fine-tuned checkpoints (paths or {{path, name}}), got "
                             f"{_what(models)}; write one `- path` per line")
        out = []
        for i, m in enumerate(models):
            m = {"path": m} if isinstance(m, (str, Path)) else m
            if not isinstance(m, dict):
                raise ValueError(f"models[{i}] must be a path or a mapping {{path, name}}, got {_what(m)}")
            bad = set(m) - {"path", "name"}
            if bad:
                raise ValueError(f"models[{i}] has unknown key(s) {sorted(map(str, bad))}; allowed: name, path")
            if "path" not in m:
                raise ValueError(f"models[{i}] has no `path`")
            if not isinstance(m["path"], (str, Path)):
                raise ValueError(f"models[{i}].path must be one path, got {_what(m['path'])}")
            name = m.get("name", Path(str(m["path"])).name)
            if not isinstance(name, (str, int)):
                raise ValueError(f"models[{i}].name must be a string, got {_what(name)}")
            out.append({"path": str(m["path"]), "name": str(name)})
        self.models = out

    def transform_specs(self) -> list[tuple[str, dict]]:
        """[(transform name, resolved params)] in order; `dare:` first (alias)."""
        items = []
        if self.dare is not None:
            if not isinstance(self.dare, dict):
                raise ParamError(f"`dare:` must be a mapping like {{drop_rate: 0.5, seed: 0}}, got {_what(self.dare)}")
            items.append({"name": "dare", **self.dare})
        transforms = self.transforms if self.transforms is not None else []
        if not isinstance(transforms, (list, tuple)):
            raise ParamError(f"`transforms:` must be a list like [{{name: dare, drop_rate: 0.5}}], got {_what(transforms)}")
        items += list(transforms)
        specs = registry.parse_transforms(items)
        names = [n for n, _ in specs]
        if self.dare is not None and names.count("dare") > 1:
            raise ParamError("DARE is given twice (`dare:` and in `transforms:`); keep one")
        return specs

    def validate(self) -> None:
        self._check_models()
        method = registry.get_method(self.method)
        if self.pretrained is not None and not isinstance(self.pretrained, (str, Path)):
            raise ValueError(f"`pretrained:` must be one path (the model the fine-tuned ones started from), "
                             f"got {_what(self.pretrained)}")
        if self.pretrained is None and method.needs_pretrained:
            raise ValueError(f"method {self.method} needs `pretrained:` (the model the fine-tuned ones started from)")
        if not isinstance(self.allow_nonfinite, bool):
            raise ParamError(f"allow_nonfinite must be true or false (a YAML boolean), got {_what(self.allow_nonfinite)}")
        if isinstance(self.max_shard_size, bool) or not isinstance(self.max_shard_size, (str, int)):
            raise ValueError(f"max_shard_size must be a size like 2GB or 500MB, got {_what(self.max_shard_size)}")
        parse_size(self.max_shard_size)
        self.resolved_params()
        if self.transform_specs() and not method.takes_task_vectors:
            raise ValueError(f"transforms (DARE, ...) apply to task vectors: {self.method} merges the models "
                             f"themselves; use one of {[m for m in registry.method_names() if registry.get_method(m).takes_task_vectors]}")

    def resolved_params(self) -> dict:
        """The method's parameters as the registry resolves them (defaults filled in)."""
        return registry.validate_params(self.method, self.params, num_tasks=len(self.models))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _json_safe(obj):
    """Strict JSON: non-finite floats (only possible with allow_nonfinite) become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _copy_model_files(src_dir: Path | None, dst: Path) -> list[str]:
    if src_dir is None or not src_dir.is_dir():
        return []
    weights = {p.name for p in weight_files(src_dir)}
    copied = []
    for p in sorted(src_dir.iterdir()):
        if p.is_file() and p.name not in weights and p.name not in _SKIP_COPY and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def merge_models(config: MergeConfig | dict | str, output_dir, overwrite: bool = False, progress: bool = True) -> dict:
    """Merge the checkpoints named in `config` into `output_dir` (an HF model directory loadable
    with from_pretrained). Returns a report dict (also saved as merge_report.json)."""
    if isinstance(config, (str, Path)):
        config = MergeConfig.from_yaml(config)
    elif isinstance(config, dict):
        config = MergeConfig.from_dict(config)
    config.validate()
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"output {output_dir} already exists; choose another directory or pass --overwrite")
    method = registry.get_method(config.method)
    params = config.resolved_params()
    transforms = [(registry.get_transform(n), p) for n, p in config.transform_specs()]
    base_spec = config.pretrained
    if base_spec is None:  # a method without a pretrained model: the first model is the reference
        base_spec = config.models[0]["path"]
    if is_lora_adapter(base_spec):
        raise ValueError(f"pretrained {base_spec} is a LoRA adapter; give the base model it was trained on")
    base = open_source(base_spec)
    tasks, full_sources, notes = [], [], []
    for m in config.models:
        if is_lora_adapter(m["path"]):
            if config.pretrained is None:
                raise ValueError(f"{m['path']} is a LoRA adapter; set `pretrained:` to its base model")
            tasks.append(LoraTaskVector(m["path"], m["name"]))
        else:
            src = open_source(m["path"])
            full_sources.append(src)
            tasks.append(CheckpointTaskVector(src, m["name"]))
    plan = build_plan(base, full_sources)
    for src in full_sources:
        notes.extend(check_extra_keys(plan, base, src))
    for tv in tasks:
        notes.extend(tv.check(plan.keys, base))
    tasks = prepare_task_vectors(tasks, base, transforms)
    for t, tp in transforms:
        shown = ", ".join(f"{k}={v}" for k, v in tp.items())
        notes.append(f"{t.label} ({shown}) applied to every task vector"
                     + (" (seed + task index)" if "seed" in tp else ""))
    if config.allow_nonfinite:
        notes.append("allow_nonfinite: NaN/Inf in the checkpoints were not checked for")
    notes = plan.notes + notes
    if plan.aliases:
        notes.append(f"tied aliases {sorted(plan.aliases)} are not stored separately; from_pretrained re-ties them")
    for n in notes:
        logger.info(n)

    stats: dict[str, Any] = {"method": config.method, "params": params,
                             "transforms": [{"name": n, **p} for n, p in config.transform_specs()]}
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        layout = [(k, *base.info(k)) for k in plan.keys + plan.passthrough]
        sink = ShardedSafetensorsSink(tmp, layout, config.max_shard_size)
        stats.update(run_method(method, params, base, tasks, plan, sink, progress,
                                check_finite=not config.allow_nonfinite))
        shards = sink.close()
        base_dir = resolve_checkpoint(base_spec)
        copied = _copy_model_files(base_dir if base_dir.is_dir() else None, tmp)
        (tmp / "merge_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        (tmp / "README.md").write_text(model_card(config.to_dict(), notes, stats))
        stats.update(notes=notes, shards=[p.name for p in shards], copied_files=copied,
                     merged_tensors=len(plan.keys), copied_buffers=len(plan.passthrough),
                     tied_aliases=dict(plan.aliases), total_bytes=sink.total_bytes)
        stats = _json_safe(stats)
        write_text_atomic(tmp / "merge_report.json", json.dumps(stats, indent=2, allow_nan=False) + "\n")
    return stats
