"""Fine-tune Flan-T5 on one GLUE task, text-to-text, with SAFT (ASAM) or plain AdamW, full or LoRA.

The recipe `recipes/flan_t5_glue/finetune.py` only parses arguments (command line + YAML) and
calls `run_glue_finetuning`. After training, the model (or LoRA adapter) is saved to
`output_dir` with the tokenizer, and the task's validation scores are written next to it as
`glue_scores.json`: the fine-tuned reference that normalized accuracy of merged models divides by.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from saft_hf.finetuning.lora import LoraArguments, apply_lora, save_lora_adapter
from saft_hf.io_utils import write_json_atomic
from saft_hf.pools import FinetunedScores
from saft_hf.recipe_args import yaml_to_argv  # noqa: F401  (re-exported from its old home)
from saft_hf.tasks.glue import GLUE_HUB_DATASET, GLUE_TASKS, SCORE_KINDS, get_task

logger = logging.getLogger(__name__)
SCORES_FILE = "glue_scores.json"


@dataclass
class GlueModelArguments:
    model_name_or_path: str = field(
        default="google/flan-t5-base", metadata={"help": "Pretrained seq2seq model: Hub name or local directory."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (Hub name or directory); defaults to model_name_or_path."}
    )


@dataclass
class GlueDataArguments:
    task: str = field(default=None, metadata={"help": "GLUE task to fine-tune on.", "choices": sorted(GLUE_TASKS)})
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "Local data for the task instead of the Hub: a save_to_disk directory, or a directory of "
            "<split>.{parquet,jsonl,json,csv} files, with GLUE's column names."
        },
    )
    dataset_name: str = field(default=GLUE_HUB_DATASET, metadata={"help": "Hub dataset (config = task name)."})
    max_source_length: int = field(default=256, metadata={"help": "Input tokens kept (longer inputs truncated)."})
    max_target_length: int = field(default=8, metadata={"help": "Target tokens kept (label words are 1-3 tokens)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded subset of train, for quick runs."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Seeded subset of the validation split for the post-training scores."}
    )
    generation_max_new_tokens: int = field(default=5, metadata={"help": "Token budget of evaluation generations."})
    score: str = field(
        default="default",
        metadata={
            "help": "Which metric is the task score: 'default' (exact-match accuracy, STS-B Spearman) or 'glue' "
            "(CoLA MCC, MRPC/QQP F1, STS-B Spearman).",
            "choices": list(SCORE_KINDS),
        },
    )
    eval_after_training: bool = field(
        default=True,
        metadata={
            "help": "Score the validation split after training and write glue_scores.json (rank 0). Turn off "
            "under DeepSpeed ZeRO-3 and run `saft-hf evaluate glue` on the saved model instead."
        },
    )

    def __post_init__(self):
        if self.task is None:
            raise ValueError(f"--task is required: one of {sorted(GLUE_TASKS)}")
        self.task = get_task(self.task).name


def run_glue_finetuning(model_args: GlueModelArguments, data_args: GlueDataArguments, lora_args: LoraArguments,
                        training_args) -> dict:
    """Train, save the model (or adapter) and tokenizer to `training_args.output_dir`, score validation.

    Returns {"train": trainer metrics, "validation": task metrics or None}.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

    from saft_hf import SAFTSeq2SeqTrainer
    from saft_hf.glue.data import load_glue_split, tokenize_split
    from saft_hf.glue.predict import GlueEvaluator

    task = get_task(data_args.task)
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)
    if lora_args.enabled:
        model = apply_lora(model, lora_args)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("LoRA r=%d on %s: %d trainable parameters", lora_args.lora_r, lora_args.lora_target_modules, trainable)

    with training_args.main_process_first(desc="GLUE data"):
        raw = load_glue_split(task, "train", data_args.data_path, data_args.dataset_name, data_args.max_train_samples,
                              seed=training_args.seed)
        train = tokenize_split(task, raw, tokenizer, data_args.max_source_length, data_args.max_target_length)
    train = train.remove_columns(["reference"])

    trainer = SAFTSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    if data_args.eval_after_training and _zero_stage(trainer) == 3:
        # Generation on rank 0 alone would wait forever for the other ranks' parameter shards.
        raise ValueError(
            "eval_after_training needs full parameters on rank 0, which DeepSpeed ZeRO-3 does not keep: pass "
            "--eval_after_training false and score the saved model with `saft-hf evaluate glue` afterwards"
        )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    output_dir = Path(training_args.output_dir)
    if lora_args.enabled:
        if trainer.is_world_process_zero():
            save_lora_adapter(trainer.model, output_dir, tokenizer)
    else:
        trainer.save_model(str(output_dir))  # model + tokenizer (processing_class), all ranks take part
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)

    validation = None
    if data_args.eval_after_training and trainer.is_world_process_zero():
        evaluator = GlueEvaluator(
            [task],
            trainer.model,
            tokenizer,
            split="validation",
            max_samples=data_args.max_eval_samples,
            data_paths={task.name: data_args.data_path} if data_args.data_path else None,
            dataset_name=data_args.dataset_name,
            batch_size=training_args.per_device_eval_batch_size,
            max_new_tokens=data_args.generation_max_new_tokens,
            max_source_length=data_args.max_source_length,
            score=data_args.score,
        )
        validation = evaluator.evaluate()[task.name]
        write_json_atomic(
            output_dir / SCORES_FILE,
            {
                "task": task.name,
                "split": task.validation_split,
                "score_metric": validation["score_metric"],
                "score": validation["score"],
                "metrics": validation,
                "model": model_args.model_name_or_path,
                "lora_r": lora_args.lora_r,
                "sam_rho": getattr(training_args, "sam_rho", 0.0),
                "sam_variant": getattr(training_args, "sam_variant", None),
                "max_eval_samples": data_args.max_eval_samples,
            },
        )
        FinetunedScores(task.name, "glue", validation["score_metric"], {"validation": validation["score"]},
                        model_args.model_name_or_path,
                        {"split": task.validation_split, "metrics": validation, "lora_r": lora_args.lora_r,
                         "sam_rho": getattr(training_args, "sam_rho", 0.0),
                         "sam_variant": getattr(training_args, "sam_variant", None),
                         "max_eval_samples": data_args.max_eval_samples}).write(output_dir)
        logger.info("%s validation: %s", task.name, validation)
    return {"train": result.metrics, "validation": validation}


def _zero_stage(trainer) -> int:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return 0
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage or 0)


def read_finetuned_score(path: str | Path, task: str | None = None) -> float:
    """The fine-tuned validation score of a run (a run dir or its score file): finetuned_scores.json,
    or the glue_scores.json of runs made before it (`saft_hf.pools.read_finetuned_scores`)."""
    from saft_hf.pools import read_finetuned_scores

    return read_finetuned_scores(path, get_task(task).name if task is not None else None).score("validation")


# ------------------------------------------------------------------------------ argument parsing


def parse_glue_arguments(argv: list[str] | None = None):
    """(model, data, lora, training) arguments from `--config file.yaml` plus command-line overrides
    (`saft_hf.recipe_args.parse_recipe_args`: command line wins, unknown YAML keys are rejected)."""
    from saft_hf import SAFTSeq2SeqTrainingArguments
    from saft_hf.recipe_args import parse_recipe_args

    return parse_recipe_args((GlueModelArguments, GlueDataArguments, LoraArguments, SAFTSeq2SeqTrainingArguments),
                             argv)
