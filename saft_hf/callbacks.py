"""`MergeMonitorCallback`: watch how well the model being fine-tuned would merge, while it trains.

Every `every_n_steps` optimizer steps the callback takes the current task vector (current weights
minus `pretrained`; with a peft LoRA model the merged-adapter delta B@A*scale), merges it with the
other tasks' task vectors (checkpoint or adapter directories read lazily from disk through
`saft_hf.merging`, or in-memory task-vector dicts) by each method in `methods`, scores the merged
weights with `evaluator(state_dict) -> {task: accuracy}` and logs, through the trainer's own
`log` (so the values land in `trainer.state.log_history`, TensorBoard, W&B, ...):

    merged_<method>_<task>_accuracy / _normalized, merged_<method>_mean_accuracy / _mean_normalized,
    merged_mean_accuracy / merged_mean_normalized (the first method), merge_monitor_sharpness
    (sam_perturbed_loss - loss of the latest training log, SAFTTrainer only), merge_monitor_seconds
    (this call) and merge_monitor_share (monitor time / training time so far).

With `eval_strategy` set, the same values are added to the evaluation metrics as `eval_merged_...`
(computed for the step being evaluated), so `metric_for_best_model="eval_merged_mean_normalized"`
with `load_best_model_at_end=True` keeps the checkpoint that merges best.

The live model is never modified: the merge produces a new state dict that only the evaluator
sees. Under DDP only rank 0 merges and evaluates; the other ranks wait in a broadcast that hands
them rank 0's numbers, and every rank logs the same values (as the Trainer logs the all-reduced
loss on every rank), so `state.best_metric` / `best_model_checkpoint` agree across ranks.
FSDP and DeepSpeed ZeRO-3 (sharded weights) are not supported.
"""
from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import TrainerCallback

from .live_taskvector import live_task_vector

logger = logging.getLogger(__name__)



def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class MergeMonitorCallback(TrainerCallback):
    """Log merged accuracy (absolute and normalized) of the model being fine-tuned every N steps.

    Args:
        other_task_vectors: the other tasks' task vectors, as a list or {name: ...}; each is a path
            (a fine-tuned checkpoint - HF model dir, .safetensors, .bin - or a peft LoRA adapter
            dir, read lazily tensor by tensor at every merge), an in-memory task-vector dict
            {key: finetuned - pretrained}, or a `saft_hf.merging.taskvectors.TaskVector`.
        evaluator: `evaluate(state_dict) -> {task: accuracy in [0, 1]}` on the merged weights
            (keyed like `pretrained`), or an object with such an `evaluate` method. It owns the
            model it loads the weights into. Called on rank 0 only.
        every_n_steps: run after every N-th optimizer step (0 = only at evaluation).
        methods: registered merge methods (`saft_hf.merging.registry.method_names()`); the first
            one also provides `merged_mean_*` (the metric for best-model selection).
        pretrained: the pretrained weights (state dict, or a checkpoint path loaded once, on rank 0
            only, at the first call); its floating-point keys define the task vector. They may be
            those of a submodule (e.g. the encoder of a model with a head): the prefix is inferred.
        finetuned_accuracy: {task: accuracy of that task's individually fine-tuned model}; gives
            the normalized accuracy (merged / fine-tuned). Without it only absolute accuracy is logged.
        method_params: {method: params} overriding the method's registered defaults
            (e.g. {"task_arithmetic": {"scaling": 0.3}}); validated by the registry.
        max_examples: passed as `evaluator(state_dict, max_examples=...)` when not None.
        model_prefix: how pretrained keys are named inside the training model (inferred if None).
        current_name: name of the task being trained (only used in merge notes/errors).
        inject_eval_metrics: add `eval_merged_*` to evaluation metrics (for metric_for_best_model).

    Attributes after/while training: `records` (one dict per call: step, seconds, metrics),
    `total_seconds`, `seconds_per_call`, `train_seconds`, `share` (monitor time / training time).
    """

    def __init__(self, other_task_vectors, evaluator, every_n_steps: int, methods: Sequence[str] = ("task_arithmetic",),
                 *, pretrained, finetuned_accuracy: Mapping[str, float] | None = None,
                 method_params: Mapping[str, Mapping[str, Any]] | None = None, max_examples: int | None = None,
                 model_prefix: str | None = None, current_name: str = "current", inject_eval_metrics: bool = True,
                 metric_prefix: str = "merged"):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an integer >= 0 (0 = only at evaluation), got {every_n_steps!r}")
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        from .merging import registry

        if not methods:
            raise ValueError("methods is empty; give at least one of " + ", ".join(registry.method_names()))
        unknown = [m for m in methods if m not in registry.method_names()]
        if unknown:
            raise ValueError(f"unknown merge method(s) {unknown}; choose among {registry.method_names()}")
        reads_data = [m for m in methods if registry.get_method(m).needs_data]
        if reads_data:
            raise ValueError(f"merge method(s) {reads_data} read task data, which the monitor callback does not have; "
                             "choose among " + str([m for m in registry.method_names()
                                                    if not registry.get_method(m).needs_data]))
        method_params = dict(method_params or {})
        extra = [m for m in method_params if m not in methods]
        if extra:
            raise ValueError(f"method_params given for {extra}, which are not in methods={list(methods)}")
        # validated now (types, ranges); per-task lengths are checked at the first merge
        self.params = {m: registry.validate_params(m, dict(method_params.get(m, {}))) for m in methods}
        self._evaluate = self._as_evaluator(evaluator)
        self.others_spec = self._check_others(other_task_vectors)
        if pretrained is None:
            raise ValueError("pretrained is required: the pretrained state dict (or its checkpoint path) the task vectors are relative to")
        if isinstance(pretrained, (str, os.PathLike)) and not Path(pretrained).exists():
            raise FileNotFoundError(f"pretrained checkpoint {pretrained} does not exist")
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
            raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
        if isinstance(pretrained, torch.nn.Module):
            pretrained = pretrained.state_dict()
        if isinstance(pretrained, Mapping):
            # copy now: a state dict of the model about to train holds views of the live weights
            pretrained = {k: v.detach().to("cpu", copy=True) for k, v in pretrained.items()}
        elif not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"pretrained must be a state dict, a module or a checkpoint path, got {type(pretrained).__name__}")
        self.pretrained_spec = pretrained
        self.every_n_steps = every_n_steps
        self.methods = methods
        self.finetuned_accuracy = dict(finetuned_accuracy) if finetuned_accuracy is not None else None
        self.max_examples = max_examples
        self.model_prefix = model_prefix
        self.current_name = current_name
        self.inject_eval_metrics = inject_eval_metrics
        self.prefix = metric_prefix

        self.trainer = None
        self.records: list[dict] = []
        self.total_seconds = 0.0
        self.train_seconds: float | None = None
        self._train_start: float | None = None
        self._pretrained: dict | None = None
        self._others: list | None = None
        self._deferred_step: int | None = None
        self._sharpness: tuple[float, int] | None = None  # (value, step of the training log)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _as_evaluator(evaluator) -> Callable:
        if hasattr(evaluator, "evaluate") and callable(evaluator.evaluate):
            return evaluator.evaluate
        if callable(evaluator):
            return evaluator
        raise TypeError(f"evaluator must be a callable evaluate(state_dict) -> {{task: accuracy}} or have an "
                        f"evaluate method; got {type(evaluator).__name__}")

    @staticmethod
    def _check_others(others) -> list[tuple[str, Any]]:
        from .merging.taskvectors import TaskVector

        if isinstance(others, Mapping) and others and all(isinstance(v, torch.Tensor) for v in others.values()):
            raise TypeError("other_task_vectors looks like one task vector (a dict of tensors); pass a list of "
                            "task vectors or {task name: task vector}")
        items = list(others.items()) if isinstance(others, Mapping) else [(f"task{i}", v) for i, v in enumerate(others)]
        if not items:
            raise ValueError("other_task_vectors is empty; the monitor merges the current task with at least one other task")
        for name, spec in items:
            if isinstance(spec, (str, os.PathLike)):
                if not Path(spec).exists():
                    raise FileNotFoundError(f"task vector {name!r}: checkpoint {spec} does not exist")
            elif not isinstance(spec, (Mapping, TaskVector)):
                raise TypeError(f"task vector {name!r}: expected a checkpoint path, a task-vector dict or a TaskVector, "
                                f"got {type(spec).__name__}")
        return [(str(n), s) for n, s in items]

    def attach(self, trainer):
        """Register with `trainer` (same as passing it in `callbacks=`) and return the trainer."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return trainer

    def _find_trainer(self):
        """The Trainer running this callback: found on the call stack (callback events receive the
        model, not the trainer), unless given with `attach`."""
        if self.trainer is not None:
            return self.trainer
        from transformers import Trainer

        frame = inspect.currentframe()
        try:
            while frame is not None:
                obj = frame.f_locals.get("self")
                if isinstance(obj, Trainer) and self in getattr(obj.callback_handler, "callbacks", ()):
                    self.trainer = obj
                    return obj
                frame = frame.f_back
        finally:
            del frame
        raise RuntimeError("MergeMonitorCallback could not find its Trainer; register it with callback.attach(trainer)")

    def _load_inputs(self) -> None:
        """Pretrained weights and the other task vectors (opened lazily; tensors read per merge)."""
        from .merging.io import is_lora_adapter, open_source
        from .merging.taskvectors import CheckpointTaskVector, DictTaskVector, LoraTaskVector, TaskVector

        if self._pretrained is None:
            spec = self.pretrained_spec
            if isinstance(spec, (str, os.PathLike)):
                src = open_source(spec)
                try:
                    self._pretrained = {k: src.get(k).clone() for k in src.keys()}
                finally:
                    src.close()
            else:
                self._pretrained = spec
        if self._others is None:
            others = []
            for name, spec in self.others_spec:
                if isinstance(spec, TaskVector):
                    others.append(spec)
                elif isinstance(spec, Mapping):
                    others.append(DictTaskVector(spec, name))
                elif is_lora_adapter(spec):
                    others.append(LoraTaskVector(spec, name))
                else:
                    others.append(CheckpointTaskVector(open_source(spec), name))
            self._others = others

    def _check_supported(self, trainer) -> None:
        if getattr(trainer, "is_fsdp_enabled", False):
            raise NotImplementedError("MergeMonitorCallback does not support FSDP (sharded weights); use DDP or ZeRO-1/2")
        if any(hasattr(p, "ds_id") and getattr(p, "ds_numel", p.numel()) != p.numel() for p in trainer.model.parameters()):
            raise NotImplementedError("MergeMonitorCallback does not support DeepSpeed ZeRO-3 (partitioned weights)")

    # ------------------------------------------------------------------ the measurement
    def _merge_and_evaluate(self, model) -> dict[str, float]:
        from .evaluation import normalized_accuracy
        from .merging import merge
        from .merging.taskvectors import DictTaskVector

        self._load_inputs()
        current = DictTaskVector(live_task_vector(model, self._pretrained, self.model_prefix), self.current_name)
        tvs = [current] + list(self._others)
        metrics: dict[str, float] = {}
        for i, method in enumerate(self.methods):
            params = self.params[method]
            merged = merge(method, self._pretrained, tvs, **params)
            with torch.no_grad():
                acc = self._evaluate(merged) if self.max_examples is None else self._evaluate(merged, max_examples=self.max_examples)
            del merged
            if not isinstance(acc, Mapping) or not acc:
                raise TypeError(f"evaluator must return a non-empty {{task: accuracy}} dict, got {acc!r}")
            p = f"{self.prefix}_{method}"
            for task, value in acc.items():
                metrics[f"{p}_{task}_accuracy"] = float(value)
            metrics[f"{p}_mean_accuracy"] = sum(float(v) for v in acc.values()) / len(acc)
            if self.finetuned_accuracy is not None:
                missing = [t for t in acc if t not in self.finetuned_accuracy]
                if missing:
                    raise KeyError(f"finetuned_accuracy has no entry for task(s) {missing}; give every task the evaluator "
                                   "scores (e.g. the individually fine-tuned accuracy from an earlier run)")
                norm = {t: normalized_accuracy(float(v), float(self.finetuned_accuracy[t])) for t, v in acc.items()}
                for task, value in norm.items():
                    metrics[f"{p}_{task}_normalized"] = value
                metrics[f"{p}_mean_normalized"] = sum(norm.values()) / len(norm)
            if i == 0:
                metrics[f"{self.prefix}_mean_accuracy"] = metrics[f"{p}_mean_accuracy"]
                if f"{p}_mean_normalized" in metrics:
                    metrics[f"{self.prefix}_mean_normalized"] = metrics[f"{p}_mean_normalized"]
        return metrics

    def _run(self, args, state, model) -> dict[str, float]:
        """Measure on rank 0, hand the numbers to every rank, log them on every rank."""
        trainer = self._find_trainer()
        start = time.perf_counter()
        payload: dict = {}
        if state.is_world_process_zero:
            try:
                self._check_supported(trainer)
                payload = {"metrics": self._merge_and_evaluate(model)}
            except Exception as exc:  # tell the waiting ranks, then fail everywhere
                if not _distributed():
                    raise
                logger.exception("MergeMonitorCallback failed on rank 0 at step %d", state.global_step)
                payload = {"error": f"{type(exc).__name__}: {exc}"}
            now = time.perf_counter()
            payload["seconds"] = now - start
            # rank 0's clock for every rank, so all ranks log identical values
            payload["elapsed"] = now - self._train_start if self._train_start is not None else None
        if _distributed():
            box = [payload]
            torch.distributed.broadcast_object_list(box, src=0)
            payload = box[0]
        if "error" in payload:
            raise RuntimeError(f"MergeMonitorCallback failed on rank 0 at step {state.global_step}: {payload['error']}")
        seconds = float(payload["seconds"])
        self.total_seconds += seconds
        logs = dict(payload["metrics"])
        if self._sharpness is not None:
            logs["merge_monitor_sharpness"] = self._sharpness[0]
            logs["merge_monitor_sharpness_step"] = float(self._sharpness[1])
        logs["merge_monitor_seconds"] = seconds
        elapsed = payload.get("elapsed")
        if elapsed:
            logs["merge_monitor_share"] = self.total_seconds / elapsed
        self.records.append({"step": state.global_step, "seconds": seconds, "metrics": dict(logs)})
        trainer.log(dict(logs))
        return logs

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self._find_trainer()
        self._train_start = time.perf_counter()
        if not state.is_world_process_zero and isinstance(self.pretrained_spec, Mapping):
            self.pretrained_spec = {}  # only rank 0 merges: other ranks free their copy

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._deferred_step is not None:
            logger.warning("MergeMonitorCallback: the training log expected at step %d did not come; that step was "
                           "not measured", self._deferred_step)
            self._deferred_step = None
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            if control.should_log:
                # the training log of this step comes right after: measure then, with its sharpness
                self._deferred_step = state.global_step
            else:
                self._run(args, state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and "sam_perturbed_loss" in logs:
            self._sharpness = (float(logs["sam_perturbed_loss"]) - float(logs["loss"]), state.global_step)
        if "loss" in logs and self._deferred_step == state.global_step:
            self._deferred_step = None
            self._run(args, state, model)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self.inject_eval_metrics or metrics is None:
            return
        # the evaluation log entry was written just before this event: keep it in step
        hist = state.log_history
        eval_entry = hist[-1] if hist and hist[-1].get("step") == state.global_step and any(
            k.startswith("eval_") for k in hist[-1]) else None
        last = self.records[-1] if self.records else None
        if last is None or last["step"] != state.global_step:
            self._deferred_step = None
            logs = self._run(args, state, model)
        else:
            logs = last["metrics"]
        injected = {f"eval_{k}": v for k, v in logs.items() if k.startswith(f"{self.prefix}_")}
        metrics.update(injected)  # the dict Trainer reads metric_for_best_model from
        if eval_entry is not None:
            eval_entry.update(injected)

    def on_train_end(self, args, state, control, **kwargs):
        if self._train_start is not None:
            self.train_seconds = time.perf_counter() - self._train_start
        for other in self._others or []:
            source = getattr(other, "source", None)
            if source is not None:
                source.close()
        self._others = None

    # ------------------------------------------------------------------ cost
    @property
    def seconds_per_call(self) -> float:
        return self.total_seconds / len(self.records) if self.records else float("nan")

    @property
    def share(self) -> float:
        """Monitor time / training time (wall clock, the monitor included)."""
        if self.train_seconds:
            return self.total_seconds / self.train_seconds
        if self._train_start is not None:
            return self.total_seconds / max(time.perf_counter() - self._train_start, 1e-9)
        return float("nan")
