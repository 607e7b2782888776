"""On-disk merge: checkpoints in, an HF model directory out (sharded safetensors + index, the
base model's config/tokenizer files, merge_config.yaml, README.md model card), written to a
temporary directory and renamed only when complete."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from ..io_utils import atomic_directory, write_text_atomic
from . import registry
from .card import model_card
from .data import check_data_spec, load_data
from .datastats import checkpoint_location
from .engine import run_method
from .io import ShardedSafetensorsSink, is_lora_adapter, open_source, parse_size
from .outputs import check_merge_output, copy_model_files, model_files_source
from .plan import build_plan, check_extra_keys
from .mergekit_config import is_mergekit_config
from .mergekit_config import translate as mergekit_translate
from .registry import ParamError
from .taskvectors import CheckpointTaskVector, LoraTaskVector, prepare_task_vectors

logger = logging.getLogger(__name__)

OUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _what(value) -> str:
    return f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


@dataclasses.dataclass
class MergeConfig:
    """What to merge. `models`: list of {path, name?} (HF dirs, .safetensors/.bin files, or PEFT
    LoRA adapter dirs). `method`: any registered method (`saft-hf merge --help` lists them);
    `params`: its parameters, checked against the registry. `transforms`: task-vector transforms
    in front of the method, e.g. [{name: dare, drop_rate: 0.5, seed: 0}] (`dare: {...}` is an
    alias of one DARE transform). `pretrained` may be omitted only for methods that do not need
    it (weighted_average). `allow_nonfinite`: merge even if a checkpoint holds NaN/Inf.
    `out_dtype`: float16 | bfloat16 | float32 for the merged floating-point weights (default: the
    pretrained model's dtype); the computation is float32 either way.

    A mergekit config (a mapping with `merge_method:`) is translated by `mergekit_config` into
    this format; `mergekit_source` then holds the original (written as mergekit_config.yml).
    `data`: for methods that read data (RegMean, Fisher merging, AdaMerging), a Python callable
    `package.module:function` (or {callable: ..., args: {...}}) returning a saft_hf.merging.data.MergeData."""

    models: list[dict]
    method: str = "task_arithmetic"
    pretrained: str | None = None
    params: dict = dataclasses.field(default_factory=dict)
    transforms: list = dataclasses.field(default_factory=list)
    dare: dict | None = None
    max_shard_size: str = "2GB"
    config: str | None = None  # where config.json/tokenizer come from if not beside `pretrained` (outputs.py)
    allow_nonfinite: bool = False
    out_dtype: str | None = None
    data: Any = None  # methods that read data: `package.module:function` returning a data.MergeData

    @classmethod
    def from_dict(cls, raw: dict, require_data: bool = True) -> "MergeConfig":
        if not isinstance(raw, dict):
            raise ValueError("merge config must be a mapping with keys pretrained, models, method, params")
        if is_mergekit_config(raw):
            translated, notes = mergekit_translate(raw)
            cfg = cls.from_dict(translated)
            cfg.mergekit_source, cfg.mergekit_notes = dict(raw), notes
            return cfg
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = set(raw) - set(allowed)
        if unknown:
            raise ValueError(f"unknown merge config key(s) {sorted(map(str, unknown))}; allowed: {sorted(allowed)}")
        cfg = cls(**{**raw, "models": raw.get("models")})
        cfg.validate(require_data)
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
                raise ValueError(f"models[{i}] has unknown key(s) {sorted(map(str, bad))}; allowed: name, path. "
                                 "Per-model settings go in `params:` as lists with one value per model "
                                 "(e.g. ties `density: [0.2, 0.5]`, `weights: [1.0, 0.5]`); a mergekit config "
                                 "(`merge_method:`, `models: [{model, parameters}]`) is also accepted")
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

    def validate(self, require_data: bool = True) -> None:
        """`require_data=False`: a data-reading method without `data:` is accepted (the MergeData
        object is given to `merge_models(data=...)`, e.g. by `--search` from the evaluator's task pool)."""
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
        if self.out_dtype is not None and self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {list(OUT_DTYPES)} (the dtype of the merged weights; the "
                             f"computation is float32 either way), got {_what(self.out_dtype)}")
        self.resolved_params()
        if method.needs_data and self.data is None and require_data:
            raise ValueError(f"method {self.method} reads each task's inputs: add `data: package.module:function` to "
                             "the merge config (a Python callable returning a saft_hf.merging.data.MergeData, e.g. "
                             "an adapter of a task family)")
        if self.data is not None and not method.needs_data:
            raise ValueError(f"`data:` is given but method {self.method} does not read data; remove it (methods that "
                             f"do: {[m for m in registry.method_names() if registry.get_method(m).needs_data]})")
        if self.data is not None:
            check_data_spec(self.data)
        if self.transform_specs() and not method.takes_task_vectors:
            raise ValueError(f"transforms (DARE, ...) apply to task vectors: {self.method} merges the models "
                             f"themselves; use one of {[m for m in registry.method_names() if registry.get_method(m).takes_task_vectors]}")

    def resolved_params(self) -> dict:
        """The method's parameters as the registry resolves them (defaults filled in)."""
        return registry.validate_params(self.method, self.params, num_tasks=len(self.models))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def torch_out_dtype(self):
        return None if self.out_dtype is None else OUT_DTYPES[self.out_dtype]


def _json_safe(obj):
    """Strict JSON: non-finite floats (only possible with allow_nonfinite) become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def merge_models(config: MergeConfig | dict | str, output_dir, overwrite: bool = False, progress: bool = True,
                 data=None) -> dict:
    """Merge the checkpoints named in `config` into `output_dir` (an HF model directory loadable
    with from_pretrained). Returns a report dict (also saved as merge_report.json). `data`: a
    MergeData object for a data-reading method, used instead of the config's `data:` callable."""
    if isinstance(config, (str, Path)):
        config = MergeConfig.from_yaml(config)
    elif isinstance(config, dict):
        config = MergeConfig.from_dict(config, require_data=data is None)
    config.validate(require_data=data is None)
    output_dir = Path(output_dir)
    inputs = check_merge_output(config, output_dir, overwrite)  # never is/contains/lies inside an input
    method = registry.get_method(config.method)
    params = config.resolved_params()
    transforms = [(registry.get_transform(n), p) for n, p in config.transform_specs()]
    base_spec = config.pretrained
    if base_spec is None:  # a method without a pretrained model: the first model is the reference
        base_spec = config.models[0]["path"]
    if is_lora_adapter(base_spec):
        raise ValueError(f"pretrained {base_spec} is a LoRA adapter; give the base model it was trained on")
    base = open_source(base_spec)
    model_files, notes = model_files_source(base_spec, config.config)
    tasks, full_sources = [], []
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
    notes = getattr(config, "mergekit_notes", []) + plan.notes + notes
    out_dtype = config.torch_out_dtype()
    if out_dtype is not None:
        notes.append(f"merged floating-point weights written as {config.out_dtype} (computed in float32)")
    if plan.aliases:
        notes.append(f"tied aliases {sorted(plan.aliases)} are not stored separately; from_pretrained re-ties them")
    for n in notes:
        logger.info(n)

    locations = None
    if not method.needs_data:
        data = None
    else:
        data = load_data(config.data) if data is None else data
        lora = [is_lora_adapter(m["path"]) for m in config.models]
        locations = [checkpoint_location(m["path"], config.pretrained if is_lora else None)
                     for m, is_lora in zip(config.models, lora)]
    stats: dict[str, Any] = {"method": config.method, "params": params,
                             "transforms": [{"name": n, **p} for n, p in config.transform_specs()]}
    with atomic_directory(output_dir, overwrite=overwrite, inputs=inputs) as tmp:
        layout = [(k, *base.info(k)) for k in plan.keys + plan.passthrough]
        if out_dtype is not None:
            layout = [(k, shape, out_dtype if k in plan.keys else dt) for k, shape, dt in layout]
        sink = ShardedSafetensorsSink(tmp, layout, config.max_shard_size)
        stats.update(run_method(method, params, base, tasks, plan, sink, progress,
                                check_finite=not config.allow_nonfinite, out_dtype=out_dtype, data=data,
                                stats_locations=locations))
        shards = sink.close()
        copied = copy_model_files(model_files, tmp)
        (tmp / "merge_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if getattr(config, "mergekit_source", None) is not None:  # the config as the user wrote it
            (tmp / "mergekit_config.yml").write_text(yaml.safe_dump(config.mergekit_source, sort_keys=False))
        (tmp / "README.md").write_text(model_card(config.to_dict(), notes, stats))
        stats.update(notes=notes, shards=[p.name for p in shards], copied_files=copied,
                     merged_tensors=len(plan.keys), copied_buffers=len(plan.passthrough),
                     tied_aliases=dict(plan.aliases), total_bytes=sink.total_bytes)
        stats = _json_safe(stats)
        write_text_atomic(tmp / "merge_report.json", json.dumps(stats, indent=2, allow_nan=False) + "\n")
    return stats
