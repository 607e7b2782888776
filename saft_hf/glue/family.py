"""The Flan-T5 GLUE family's hooks for the command line (`saft_hf.commands`): evaluate, analyze, pools."""
from __future__ import annotations

import argparse

from saft_hf.glue.evaluate_cli import __doc__ as EVALUATE_HELP  # noqa: N812
from saft_hf.glue.evaluate_cli import add_arguments as add_evaluate_arguments
from saft_hf.glue.evaluate_cli import run as run_evaluate
from saft_hf.glue.pools import GlueTaskPool, first_step_logits, glue_model_pool, label_word_heads

__all__ = ["EVALUATE_HELP", "add_evaluate_arguments", "run_evaluate", "add_analyze_arguments", "build_probe",
           "task_pool", "model_pool"]

task_pool = GlueTaskPool
model_pool = glue_model_pool


def add_analyze_arguments(parser) -> None:
    parser.add_argument("--tokenizer", default=None, help="glue family: tokenizer (default: the one in --pretrained)")
    parser.add_argument("--max-source-length", type=int, default=256, help="glue family: max input tokens")


def build_probe(args: argparse.Namespace, tasks: list[str], checkpoints: dict[str, dict[str, str]]):
    """A `TaskProbe` on the whole seq2seq model: inputs are the task prompts, class logits are the
    first decoded token's logits of each label word (`LabelWordHead`), so its loss is the seq2seq loss
    of the label words over the task's classes and its accuracy the label-word choice."""
    from saft_hf.analysis.probe import TaskProbe
    from saft_hf.glue.data import load_glue_split, tokenize_split
    from saft_hf.glue.predict import load_seq2seq_model
    from saft_hf.tasks.glue import get_task
    from transformers import AutoTokenizer

    data_paths = {}
    for item in args.data or []:
        task, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--data expects TASK=PATH, got {item!r}")
        data_paths[get_task(task).name] = path
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.pretrained)
    model = load_seq2seq_model(args.pretrained)
    token_ids = {}
    for name in tasks:
        task = get_task(name)
        raw = load_glue_split(task, args.split, data_paths.get(task.name))
        encoded = tokenize_split(task, raw, tokenizer, max_source_length=args.max_source_length, with_targets=False)
        token_ids[task.name] = (encoded["input_ids"], encoded["reference"])
    return TaskProbe.from_token_ids(model, label_word_heads(tokenizer, list(token_ids)), token_ids,
                                    pad_id=tokenizer.pad_token_id or 0, subset_size=args.subset_size, seed=args.seed,
                                    batch_size=args.batch_size, features=first_step_logits)
