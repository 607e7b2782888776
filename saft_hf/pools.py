"""The task-family protocol: a model pool, a task pool, and one fine-tuned-score file format.

Every task family (the demo's text tasks, CLIP vision, Flan-T5 GLUE) implements these once; the
merge-study driver (`saft_hf.evaluation.study`), `saft-hf evaluate` and `saft-hf analyze` only
talk to them. This module is core: it imports no family.

- `ModelPool`: the pretrained weights, one fine-tuned checkpoint per task, and the scores
  recorded when each was fine-tuned (`FinetunedScores`).
- `TaskPool`: `evaluate(model or state dict, split, tasks, max_examples) -> {task: score}`,
  `evaluate_per_example(...) -> PerExampleScores` (the same scores plus each example's 0/1
  correctness, for paired statistics: `saft_hf.stats`), the task names, each task's head/metric kind (`TaskInfo`), and unlabeled inputs per task (for
  data-based merges such as RegMean / AdaMerging).
- `FinetunedScores`: the one JSON schema of `finetuned_scores.json`, written next to every
  fine-tuned checkpoint; `read_finetuned_scores` also reads the files the families wrote before
  (`finetuned_accuracy.json`, `glue_scores.json`, `saft_demo_training.json`).
"""
from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

SPLITS = ("validation", "test")
SCORE_FILE = "finetuned_scores.json"
SCORE_SCHEMA = "saft_hf.finetuned_scores"
SCORE_SCHEMA_VERSION = 1
# Read (never written) for runs made before the one schema existed, in this order of preference.
LEGACY_SCORE_FILES = ("finetuned_accuracy.json", "glue_scores.json", "saft_demo_training.json")


# --- the fine-tuned-score file ------------------------------------------------------------------


@dataclass
class FinetunedScores:
    """What one fine-tuning run recorded about itself.

    JSON (`finetuned_scores.json`)::

        {"schema": "saft_hf.finetuned_scores", "version": 1,
         "family": "vision" | "glue" | "demo" | ...,
         "task": "dtd",
         "metric": "accuracy",                       # what the scores measure (GLUE: mcc, f1, ...)
         "scores": {"validation": 0.91, "test": 0.88},  # split -> score in [0, 1]; either may be absent
         "base_model": "openai/clip-vit-base-patch32",  # pretrained weights the run started from, or null
         "training": {...}}                           # free-form run details (optimizer, sam_rho, mode, ...)
    """

    task: str
    family: str
    metric: str = "accuracy"
    scores: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the file it was read from (not serialized)

    def score(self, split: str) -> float:
        if split not in self.scores:
            where = f" ({self.source})" if self.source else ""
            raise KeyError(f"no fine-tuned {split} score recorded for task {self.task!r}{where}; it has "
                           f"{sorted(self.scores) or 'none'}")
        return self.scores[split]

    def to_json_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "source"}
        return {"schema": SCORE_SCHEMA, "version": SCORE_SCHEMA_VERSION, **data}

    @classmethod
    def from_json_dict(cls, data: Mapping, source: str | None = None) -> "FinetunedScores":
        if data.get("schema") != SCORE_SCHEMA:
            raise ValueError(f"{source or 'scores'}: not a {SCORE_FILE} (schema {data.get('schema')!r}, "
                             f"expected {SCORE_SCHEMA!r})")
        if int(data.get("version", 0)) > SCORE_SCHEMA_VERSION:
            raise ValueError(f"{source}: {SCORE_FILE} version {data['version']} is newer than this saft-hf "
                             f"reads ({SCORE_SCHEMA_VERSION}); upgrade saft-hf")
        bad = [s for s in data.get("scores", {}) if s not in SPLITS]
        if bad:
            raise ValueError(f"{source}: unknown split(s) {bad} in scores; use {SPLITS}")
        return cls(task=data["task"], family=data["family"], metric=data.get("metric", "accuracy"),
                   scores={k: float(v) for k, v in data.get("scores", {}).items()},
                   base_model=data.get("base_model"), training=dict(data.get("training", {})), source=source)

    def write(self, directory: str | Path) -> Path:
        from saft_hf.io_utils import write_json_atomic

        path = Path(directory) / SCORE_FILE
        write_json_atomic(path, self.to_json_dict())
        return path


def _from_legacy(name: str, data: Mapping, source: str) -> FinetunedScores:
    if name == "finetuned_accuracy.json":  # vision recipe
        training = {k: v for k, v in data.items()
                    if k not in ("task", "test_accuracy", "validation_accuracy", "base_model", "loss_curve")}
        scores = {s: float(data[f"{s}_accuracy"]) for s in SPLITS if f"{s}_accuracy" in data}
        return FinetunedScores(data["task"], "vision", "accuracy", scores, data.get("base_model"), training, source)
    if name == "glue_scores.json":  # GLUE recipe: the validation score only
        training = {k: v for k, v in data.items() if k not in ("task", "score", "score_metric", "model", "split")}
        return FinetunedScores(data["task"], "glue", data.get("score_metric", "score"),
                               {"validation": float(data["score"])}, data.get("model"), training, source)
    # saft_demo_training.json: the demo evaluates individual accuracy at study time, no scores here
    return FinetunedScores(data.get("task", ""), "demo", "accuracy", {}, (data.get("signature") or {}).get("model"),
                           dict(data), source)


def find_score_file(path: str | Path) -> Path | None:
    """The score file of a run directory (the unified one first, then the legacy names), or None."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (SCORE_FILE, *LEGACY_SCORE_FILES):
        if (path / name).is_file():
            return path / name
    return None


def read_finetuned_scores(path: str | Path, task: str | None = None) -> FinetunedScores:
    """Read a run directory's (or a file's) fine-tuned scores, in the unified or a legacy format."""
    found = find_score_file(path)
    if found is None:
        raise FileNotFoundError(
            f"no fine-tuned scores at {path}: expected {SCORE_FILE} (or a legacy "
            f"{' / '.join(LEGACY_SCORE_FILES)}); fine-tune with the family's recipe, which writes it")
    data = json.loads(found.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{found}: expected a JSON object")
    scores = (FinetunedScores.from_json_dict(data, str(found)) if "schema" in data
              else _from_legacy(found.name if found.name in LEGACY_SCORE_FILES else _guess_legacy(data),
                                data, str(found)))
    if task is not None and scores.task and scores.task != task:
        raise ValueError(f"{found} holds scores for task {scores.task!r}, not {task!r}")
    return scores


def _guess_legacy(data: Mapping) -> str:
    if "test_accuracy" in data or "validation_accuracy" in data:
        return "finetuned_accuracy.json"
    if "score" in data:
        return "glue_scores.json"
    raise ValueError(f"unrecognized fine-tuned score file (keys {sorted(data)[:8]}); expected the "
                     f"{SCORE_SCHEMA} schema")


# --- per-example correctness -------------------------------------------------------------------


@dataclass
class PerExampleScores:
    """`TaskPool.evaluate_per_example`: `scores` exactly as `evaluate` returns them, and `correct`
    {task: bool array}, one entry per evaluated example in the split's fixed order (the same order
    on every call, so two models' arrays pair example by example). A task whose metric has no
    per-example correctness (a regression task such as STS-B) is absent from `correct` and named in
    `excluded` with the reason."""

    scores: dict[str, float]
    correct: dict[str, "np.ndarray"]
    excluded: dict[str, str] = field(default_factory=dict)


def correctness_to_bits(correct) -> str:
    """A 0/1 correctness array as a compact string of '0' and '1' (one character per example)."""
    import numpy as np

    arr = np.asarray(correct)
    if arr.ndim != 1:
        raise ValueError(f"correctness must be one-dimensional, got shape {arr.shape}")
    return "".join("1" if bool(x) else "0" for x in arr.tolist())


def bits_to_correctness(bits: str) -> "np.ndarray":
    """The inverse of `correctness_to_bits`: a bool array."""
    import numpy as np

    if not isinstance(bits, str) or set(bits) - {"0", "1"}:
        raise ValueError(f"expected a string of '0'/'1' (per-example correctness), got {str(bits)[:40]!r}")
    return np.frombuffer(bits.encode("ascii"), dtype=np.uint8) == ord("1")


# --- the pools ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """How a task is scored. head: "zero_shot_classifier" (frozen text-embedding head on an
    encoder) or "text_to_text" (label words generated by a seq2seq model); metric: what
    `TaskPool.evaluate` returns for it (accuracy, mcc, f1, spearman, ...)."""

    name: str
    head: str
    metric: str = "accuracy"
    num_classes: int | None = None


class TaskPool(abc.ABC):
    """Evaluation data and heads of one task family. Scores are fractions (higher is better)."""

    family: str = ""

    @property
    @abc.abstractmethod
    def tasks(self) -> list[str]:
        """The task names, in report order."""

    @abc.abstractmethod
    def task_info(self, task: str) -> TaskInfo:
        ...

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module | Mapping[str, torch.Tensor], split: str = "validation",
                 tasks: Sequence[str] | None = None, max_examples: int | None = None) -> dict[str, float]:
        """{task: score} of a model (module, or a state dict for the family's backbone) on `split`.
        `max_examples` caps each task's examples (a fixed subset, the same on every call)."""

    def evaluate_per_example(self, model: torch.nn.Module | Mapping[str, torch.Tensor], split: str = "test",
                             tasks: Sequence[str] | None = None, max_examples: int | None = None) -> PerExampleScores:
        """The scores of `evaluate` plus each example's correctness (`PerExampleScores`), from one
        pass over the data. Families implement it; the merge-study driver calls it for every test
        evaluation when asked for per-example results (`run_merge_study(per_example=True)`)."""
        raise NotImplementedError(
            f"{type(self).__name__} ({self.family or 'this family'}) does not record per-example correctness; "
            "implement TaskPool.evaluate_per_example, or run the study with per_example=False")

    @abc.abstractmethod
    def unlabeled_inputs(self, task: str, split: str = "validation",
                         max_examples: int | None = None) -> Iterable[dict[str, torch.Tensor]]:
        """Model-input batches (no labels) of one task, for data-based merges (RegMean, AdaMerging)."""

    def merge_data(self, max_examples: int | None = None):
        """A `saft_hf.merging.data.MergeData` over this pool's tasks: unlabeled inputs of the
        "train", "validation" and "test" splits and logits through the family's own heads, with
        a fingerprint (so RegMean / Fisher statistics are cached on disk). `max_examples` caps
        each split (the first N, the same every call). Families that support data-reading merges
        override this."""
        raise NotImplementedError(f"{type(self).__name__} does not provide merge data (RegMean, Fisher merging, "
                                  "AdaMerging); use a data-free merge method or implement TaskPool.merge_data")

    def check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__}: unknown split {split!r}; choose one of {SPLITS}")

    def check_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        tasks = list(self.tasks if tasks is None else tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise KeyError(f"{type(self).__name__}: unknown task(s) {unknown}; this pool has {self.tasks}")
        return tasks


class ModelPool(abc.ABC):
    """The pretrained weights, one fine-tuned model per task, and their recorded scores."""

    @property
    @abc.abstractmethod
    def tasks(self) -> list[str]:
        ...

    @abc.abstractmethod
    def pretrained_state_dict(self) -> dict[str, torch.Tensor]:
        ...

    @abc.abstractmethod
    def finetuned_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        ...

    def finetuned_scores(self, task: str) -> FinetunedScores | None:
        """The scores recorded at fine-tuning (None when the run recorded none)."""
        return None

    def recorded_scores(self, split: str) -> dict[str, float] | None:
        """{task: fine-tuned score on split} when every task recorded one, else None."""
        out = {}
        for task in self.tasks:
            rec = self.finetuned_scores(task)
            if rec is None or split not in rec.scores:
                return None
            out[task] = rec.scores[split]
        return out


class CheckpointModelPool(ModelPool):
    """A model pool on disk: `pretrained` and {task: run dir}; `load(path) -> state dict` is the
    family's loader. Scores come from each run dir's score file (`read_finetuned_scores`)."""

    def __init__(self, pretrained: str, checkpoints: Mapping[str, str], load, require_scores: bool = False):
        self.pretrained, self.checkpoints, self._load = str(pretrained), dict(checkpoints), load
        self._scores: dict[str, FinetunedScores | None] = {}
        for task, path in self.checkpoints.items():
            if find_score_file(path) is None:
                if require_scores:
                    read_finetuned_scores(path, task)  # raises with the expected file names
                self._scores[task] = None
            else:
                self._scores[task] = read_finetuned_scores(path, task)

    @property
    def tasks(self) -> list[str]:
        return list(self.checkpoints)

    def pretrained_state_dict(self):
        return self._load(self.pretrained)

    def finetuned_state_dict(self, task):
        return self._load(self.checkpoints[task])

    def finetuned_scores(self, task):
        return self._scores[task]


class InMemoryModelPool(ModelPool):
    """A model pool of state dicts already in memory (the demo; tests)."""

    def __init__(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]],
                 scores: Mapping[str, FinetunedScores] | None = None):
        self._pretrained, self._finetuned, self._scores = dict(pretrained), dict(finetuned), dict(scores or {})

    @property
    def tasks(self):
        return list(self._finetuned)

    def pretrained_state_dict(self):
        return self._pretrained

    def finetuned_state_dict(self, task):
        return self._finetuned[task]

    def finetuned_scores(self, task):
        return self._scores.get(task)
