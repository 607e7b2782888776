"""On-disk merge: checkpoints in, an HF model directory out (sharded safetensors + index, the
base model's config/tokenizer files, merge_config.yaml, README.md model card), written to a
temporary directory and renamed only when complete."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import yaml

from ..io_utils import atomic_directory, write_json_atomic
from .card import model_card
from .engine import check_ties_args, linear_merge, per_task, ties_merge
from .io import ShardedSafetensorsSink, is_lora_adapter, open_source
from .outputs import check_merge_output, copy_model_files, model_files_source
from .plan import build_plan, check_extra_keys
from .taskvectors import CheckpointTaskVector, DareTaskVector, LoraTaskVector, check_dare_args

logger = logging.getLogger(__name__)

METHODS = {
    "weighted_average": {"weights": None, "normalize": True},
    "task_arithmetic": {"scaling": 0.4},
    "ties": {"scaling": 1.0, "density": 0.2, "trim_scope": "global", "sign_method": "sum", "disjoint": "mean",
             "zero_sign": "majority"},
}
DARE_KEYS = {"drop_rate", "seed", "rescale"}


@dataclasses.dataclass
class MergeConfig:
    """What to merge. `models`: list of {path, name?} (HF dirs, .safetensors/.bin files, or PEFT
    LoRA adapter dirs). `pretrained` may be omitted only for weighted_average."""

    models: list[dict]
    method: str = "task_arithmetic"
    pretrained: str | None = None
    params: dict = dataclasses.field(default_factory=dict)
    dare: dict | None = None
    max_shard_size: str = "2GB"
    config: str | None = None  # where config.json/tokenizer come from if not beside `pretrained` (outputs.py)

    @classmethod
    def from_dict(cls, raw: dict) -> "MergeConfig":
        if not isinstance(raw, dict):
            raise ValueError("merge config must be a mapping with keys pretrained, models, method, params")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - allowed
        if unknown:
            raise ValueError(f"unknown merge config key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        if "models" not in raw or not raw["models"]:
            raise ValueError("merge config needs `models:` - a list of fine-tuned checkpoints (paths or {path, name})")
        models = [m if isinstance(m, dict) else {"path": str(m)} for m in raw["models"]]
        for i, m in enumerate(models):
            if "path" not in m:
                raise ValueError(f"models[{i}] has no `path`")
            m.setdefault("name", Path(str(m["path"])).name)
        cfg = cls(**{**raw, "models": models})
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path) -> "MergeConfig":
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"merge config {path} not found") from None
        return cls.from_dict(raw)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; choose one of {list(METHODS)}")
        unknown = set(self.params or {}) - set(METHODS[self.method])
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {self.method}; allowed: {sorted(METHODS[self.method])}")
        if self.pretrained is None and self.method != "weighted_average":
            raise ValueError(f"method {self.method} needs `pretrained:` (the model the fine-tuned ones started from)")
        p = self.resolved_params()
        if self.method == "ties":
            check_ties_args(p["density"], p["trim_scope"], p["sign_method"], p["disjoint"], p["zero_sign"])
        if self.dare:
            bad = set(self.dare) - DARE_KEYS
            if bad or "drop_rate" not in self.dare:
                raise ValueError(f"`dare:` takes drop_rate (required), seed, rescale; got {sorted(self.dare)}")
            check_dare_args(float(self.dare["drop_rate"]), self.dare.get("rescale", True))
            if self.method == "weighted_average":
                raise ValueError("DARE applies to task vectors: use it with task_arithmetic or ties")

    def resolved_params(self) -> dict:
        return {**METHODS[self.method], **(self.params or {})}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def merge_models(config: MergeConfig | dict | str, output_dir, overwrite: bool = False, progress: bool = True) -> dict:
    """Merge the checkpoints named in `config` into `output_dir` (an HF model directory loadable
    with from_pretrained). Returns a report dict (also saved as merge_report.json)."""
    if isinstance(config, (str, Path)):
        config = MergeConfig.from_yaml(config)
    elif isinstance(config, dict):
        config = MergeConfig.from_dict(config)
    config.validate()
    output_dir = Path(output_dir)
    inputs = check_merge_output(config, output_dir, overwrite)  # never is/contains/lies inside an input
    params = config.resolved_params()
    base_spec = config.pretrained
    if base_spec is None:  # weighted average without a pretrained model: the first model is the reference
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
    if config.dare:
        seed = int(config.dare.get("seed", 0))
        tasks = [DareTaskVector(tv, float(config.dare["drop_rate"]), seed + i, config.dare.get("rescale", True))
                 for i, tv in enumerate(tasks)]
        for tv in tasks:
            tv.base_source = base
        notes.append(f"DARE drop_rate={config.dare['drop_rate']} applied to every task vector (seed {seed} + task index)")
    notes = plan.notes + notes
    if plan.aliases:
        notes.append(f"tied aliases {sorted(plan.aliases)} are not stored separately; from_pretrained re-ties them")
    for n in notes:
        logger.info(n)

    stats: dict[str, Any] = {"method": config.method, "params": params}
    with atomic_directory(output_dir, overwrite=overwrite, inputs=inputs) as tmp:
        layout = [(k, *base.info(k)) for k in plan.keys + plan.passthrough]
        sink = ShardedSafetensorsSink(tmp, layout, config.max_shard_size)
        if config.method == "task_arithmetic":
            linear_merge(base, tasks, plan, per_task(params["scaling"], len(tasks), "scaling"), 1.0, sink, progress,
                         desc="task arithmetic")
        elif config.method == "weighted_average":
            w = per_task(1.0 if params.get("weights") is None else params["weights"], len(tasks), "weights")
            if params.get("normalize", True):
                w = [x / sum(w) for x in w]
            # sum_t w_t theta_t = (sum_t w_t) theta_0 + sum_t w_t tau_t
            linear_merge(base, tasks, plan, w, sum(w), sink, progress, desc="weighted average")
        else:
            s = ties_merge(base, tasks, plan, float(params["scaling"]), float(params["density"]), params["trim_scope"],
                           params["sign_method"], params["disjoint"], params["zero_sign"], sink, progress)
            stats.update(thresholds=s.thresholds, majority_sign=s.majority_sign, deferred_keys=s.deferred_keys)
        shards = sink.close()
        copied = copy_model_files(model_files, tmp)
        (tmp / "merge_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        (tmp / "README.md").write_text(model_card(config.to_dict(), notes, stats))
        stats.update(notes=notes, shards=[p.name for p in shards], copied_files=copied,
                     merged_tensors=len(plan.keys), copied_buffers=len(plan.passthrough),
                     tied_aliases=dict(plan.aliases), total_bytes=sink.total_bytes)
        write_json_atomic(tmp / "merge_report.json", stats)
    return stats
