"""Fine-tune Flan-T5 on one GLUE task, text-to-text, with SAFT (ASAM) or plain AdamW, full or LoRA.

The recipe `recipes/flan_t5_glue/finetune.py` only parses arguments (command line + YAML) and
calls `run_glue_finetuning`. After training, the model (or LoRA adapter) is saved to
`output_dir` with the tokenizer, and the task's validation scores are written next to it as
`glue_scores.json`: the fine-tuned reference that normalized accuracy of merged models divides by.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from saft_hf.finetuning.lora import LoraArguments, apply_lora, save_lora_adapter
from saft_hf.io_utils import write_json_atomic
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
        logger.info("%s validation: %s", task.name, validation)
    return {"train": result.metrics, "validation": validation}


def _zero_stage(trainer) -> int:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return 0
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage or 0)


def read_finetuned_score(path: str | Path, task: str | None = None) -> float:
    """The fine-tuned validation score stored by `run_glue_finetuning` (a run dir or the JSON file)."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no fine-tuned scores at {path}; run the GLUE fine-tuning recipe (it writes {SCORES_FILE}) or "
            "`saft-hf evaluate glue` on the fine-tuned model"
        )
    record = json.loads(path.read_text())
    if task is not None and record.get("task") != get_task(task).name:
        raise ValueError(f"{path} holds scores for task {record.get('task')!r}, not {task!r}")
    return float(record["score"])


# ------------------------------------------------------------------------------ argument parsing

def yaml_to_argv(config: dict) -> list[str]:
    """A YAML mapping as `--key value` command-line items (lists expand, booleans as true/false)."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append(str(value).lower())
        elif isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            import json

            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def parse_glue_arguments(argv: list[str] | None = None):
    """(model, data, lora, training) arguments from `--config file.yaml` plus command-line overrides.

    Values on the command line win over the YAML file (they are parsed after it).
    """
    import yaml
    from transformers import HfArgumentParser

    from saft_hf import SAFTSeq2SeqTrainingArguments

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        config_path = Path(argv[i + 1])
        if not config_path.exists():
            raise FileNotFoundError(f"config file {config_path} not found")
        config = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a mapping of argument names to values")
        argv = yaml_to_argv(config) + argv[:i] + argv[i + 2 :]
    parser = HfArgumentParser((GlueModelArguments, GlueDataArguments, LoraArguments, SAFTSeq2SeqTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)
