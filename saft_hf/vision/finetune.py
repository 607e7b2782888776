"""Fine-tune a CLIP image encoder on one vision task: the logic behind `recipes/clip_vision/finetune.py`.

Model: `CLIPVisionModelWithProjection` + the task's frozen zero-shot head. Modes: full, FTLO
(attention linear layers only), FTTS (linearized, `LinearizedModel`); each with plain AdamW
(`sam_rho 0`) or SAM / ASAM through `SAFTTrainer`. The best checkpoint (validation accuracy) is
kept, evaluated on the test split, and written as a normal vision-encoder directory:

    OUTPUT_DIR/config.json, model.safetensors, preprocessor_config.json   <- the fine-tuned encoder
    OUTPUT_DIR/finetuned_accuracy.json                                    <- test / validation accuracy
    OUTPUT_DIR/checkpoint-*                                               <- Trainer checkpoints (resume)

For FTTS the saved weights are theta0 + delta (a normal checkpoint); `finetuned_accuracy.json`
records `"linearized": true` and the base model, which evaluation needs for the linearized forward.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saft_hf.finetuning.linearized import LinearizedModel
from saft_hf.finetuning.partial import FINETUNING_MODES, apply_finetuning_mode, count_parameters
from saft_hf.io_utils import write_json_atomic
from saft_hf.metrics import accuracy
from saft_hf.tasks.vision import get_vision_task
from saft_hf.vision.data import VALIDATION_FRACTION, VALIDATION_MAX, VALIDATION_SEED, prepare_task_data
from saft_hf.vision.model import (DEFAULT_CLIP_MODEL, build_classifier, build_zero_shot_head, load_image_processor,
                                  load_vision_encoder, resolve_model_name)

logger = logging.getLogger(__name__)

FINETUNED_ACCURACY_FILE = "finetuned_accuracy.json"


@dataclass
class VisionModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_CLIP_MODEL,
        metadata={"help": "CLIP checkpoint (Hub name, short name ViT-B-32 / ViT-B-16 / ViT-L-14, or local dir). "
                  "Its text tower builds the zero-shot head; its image tower is fine-tuned."},
    )
    finetuning_mode: str = field(
        default="full",
        metadata={"help": "full: every encoder weight; ftlo: attention q/k/v/out projections only; "
                  "ftts: linearized fine-tuning in the tangent space of the pretrained weights.",
                  "choices": list(FINETUNING_MODES)},
    )
    ftlo_include_bias: bool = field(
        default=True, metadata={"help": "FTLO: also train the biases of the attention linear layers."})
    head_cache_dir: str | None = field(
        default=None, metadata={"help": "Where zero-shot heads are cached (default $SAFT_HF_CACHE/heads or "
                                "~/.cache/saft_hf/heads)."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel (sdpa, eager, ...); FTTS always uses eager (forward-mode AD)."})


@dataclass
class VisionDataArguments:
    task: str | None = field(default=None, metadata={
        "help": "Task name: cars, dtd, eurosat, gtsrb, mnist, resisc45, sun397, svhn (saft_hf/tasks/vision.py)."})
    data_path: str | None = field(default=None, metadata={
        "help": "Local dataset instead of the Hub one: a save_to_disk directory, an imagefolder, or another Hub name."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache directory."})
    validation_fraction: float = field(default=VALIDATION_FRACTION, metadata={
        "help": "Fraction of train held out for validation (paper: 0.1)."})
    validation_max: int = field(default=VALIDATION_MAX, metadata={"help": "At most this many validation examples."})
    split_seed: int = field(default=VALIDATION_SEED, metadata={"help": "Seed of the train/validation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate train (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate validation (debugging)."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Truncate test (debugging)."})


# --- command line -------------------------------------------------------------------------------


def parse_vision_arguments(argv: list[str] | None = None):
    """(model, data, training) arguments from `--config file.yaml` and command-line overrides
    (`saft_hf.recipe_args.parse_recipe_args`: command line wins, unknown YAML keys are rejected)."""
    from saft_hf import SAFTTrainingArguments
    from saft_hf.recipe_args import parse_recipe_args

    return parse_recipe_args((VisionModelArguments, VisionDataArguments, SAFTTrainingArguments), argv,
                             required=("task",))


# --- training -----------------------------------------------------------------------------------


def compute_accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return {"accuracy": accuracy(np.argmax(logits, axis=-1), labels)}


def collate_images(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.stack([torch.as_tensor(e["labels"]) for e in examples])}


def build_task_model(model_args: VisionModelArguments, task, class_names, main_process_first=None):
    """(EncoderClassifier, trainable parameter names) for `model_args.finetuning_mode`."""
    import contextlib

    ctx = main_process_first or contextlib.nullcontext
    with ctx():  # one process builds and caches the head, the others read the cache
        head = build_zero_shot_head(model_args.model_name_or_path, task, class_names, model_args.head_cache_dir)
    mode = model_args.finetuning_mode.lower()
    attn = "eager" if mode == "ftts" else model_args.attn_implementation
    encoder = load_vision_encoder(model_args.model_name_or_path, attn_implementation=attn)
    trainable = apply_finetuning_mode(encoder, mode, include_bias=model_args.ftlo_include_bias)
    if mode == "ftts":
        encoder = LinearizedModel(encoder)
    return build_classifier(encoder, head), trainable


def run_vision_finetuning(model_args: VisionModelArguments, data_args: VisionDataArguments, training_args) -> dict:
    """Fine-tune, select the best checkpoint on validation, test it, save encoder + accuracy JSON."""
    from saft_hf import SAFTTrainer

    task = get_vision_task(data_args.task)
    if training_args.remove_unused_columns:
        # The model takes **inputs, so Trainer would drop the image column before the transform runs.
        training_args.remove_unused_columns = False
    processor = load_image_processor(model_args.model_name_or_path)
    with training_args.main_process_first(desc="load dataset"):
        data = prepare_task_data(
            task, processor, data_args.data_path, data_args.dataset_cache_dir, data_args.validation_fraction,
            data_args.validation_max, data_args.split_seed, data_args.max_train_samples,
            data_args.max_eval_samples, data_args.max_test_samples)
    model, trainable = build_task_model(
        model_args, task, data.class_names,
        main_process_first=lambda: training_args.main_process_first(desc="zero-shot head"))
    n_train, n_total = count_parameters(model)
    logger.info("task %s: %d classes, %d train / %d validation / %d test; mode %s trains %d of %d parameters "
                "(%d tensors); sam_rho=%s sam_variant=%s", task.name, len(data.class_names), len(data.train),
                len(data.validation), len(data.test), model_args.finetuning_mode, n_train, n_total, len(trainable),
                training_args.sam_rho, training_args.sam_variant)

    trainer = SAFTTrainer(model=model, args=training_args, train_dataset=data.train, eval_dataset=data.validation,
                          data_collator=collate_images, compute_metrics=compute_accuracy)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    validation = trainer.evaluate(data.validation, metric_key_prefix="eval")
    test = trainer.evaluate(data.test, metric_key_prefix="test")
    result = {
        "task": task.name,
        "test_accuracy": float(test["test_accuracy"]),
        "validation_accuracy": float(validation["eval_accuracy"]),
        "finetuning_mode": model_args.finetuning_mode,
        "linearized": model_args.finetuning_mode == "ftts",
        "ftlo_include_bias": model_args.ftlo_include_bias,
        "base_model": resolve_model_name(model_args.model_name_or_path),
        "sam_rho": training_args.sam_rho,
        "sam_variant": training_args.sam_variant,
        "global_step": train_result.global_step,
        "train_loss": train_result.training_loss,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "loss_curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h and "step" in h],
        "class_names": data.class_names,
        "num_examples": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
    }
    if trainer.is_world_process_zero():
        encoder = trainer.accelerator.unwrap_model(trainer.model).encoder
        encoder = encoder.unwrap() if isinstance(encoder, LinearizedModel) else encoder
        save_encoder(encoder, processor, training_args.output_dir)
        # The family-independent score file (saft_hf.pools), then the legacy one, written last: its
        # presence means the directory holds a complete fine-tuned model (run_all.sh resumes on it).
        scores_record(result).write(training_args.output_dir)
        write_json_atomic(Path(training_args.output_dir) / FINETUNED_ACCURACY_FILE, result)
        trainer.log_metrics("test", test)
    return result


def scores_record(result: dict):
    """The run's `saft_hf.pools.FinetunedScores` (finetuned_scores.json) from its result record."""
    from saft_hf.pools import FinetunedScores

    training = {k: v for k, v in result.items()
                if k not in ("task", "test_accuracy", "validation_accuracy", "base_model", "loss_curve")}
    return FinetunedScores(result["task"], "vision", "accuracy",
                           {"validation": result["validation_accuracy"], "test": result["test_accuracy"]},
                           result["base_model"], training)


def save_encoder(encoder, processor, output_dir: str | os.PathLike) -> None:
    """`save_pretrained` into a temporary directory, then move each file into place (each rename is
    atomic, so no half-written weight file ever appears under its final name)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".encoder.", dir=output_dir))
    try:
        encoder.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config last
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
