"""The Flan-T5 GLUE family's hooks for the command line (`saft_hf.commands`): evaluate, analyze, pools."""
from __future__ import annotations

import argparse

from saft_hf.glue.evaluate_cli import __doc__ as EVALUATE_HELP  # noqa: N812
from saft_hf.glue.evaluate_cli import add_arguments as add_evaluate_arguments
from saft_hf.glue.evaluate_cli import run as run_evaluate
from saft_hf.glue.pools import GlueTaskPool, first_step_logits, glue_model_pool, label_word_heads

__all__ = ["EVALUATE_HELP", "add_evaluate_arguments", "run_evaluate", "add_analyze_arguments", "build_probe",
           "task_pool", "model_pool", "merge_task_pool"]

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
    from saft_hf.tasks.glue import get_task

    data_paths = {}
    for item in args.data or []:
        task, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--data expects TASK=PATH, got {item!r}")
        data_paths[get_task(task).name] = path
    pool = GlueTaskPool(tasks, args.pretrained, tokenizer=args.tokenizer, data_paths=data_paths or None,
                        max_source_length=args.max_source_length, device="cpu")
    token_ids = {}
    for name in pool.tasks:
        encoded = pool.evaluator(args.split, [name]).encoded[name]
        token_ids[name] = (encoded["input_ids"], encoded["reference"])
    return TaskProbe.from_token_ids(pool.model, label_word_heads(pool.tokenizer, pool.tasks), token_ids,
                                    pad_id=pool.tokenizer.pad_token_id or 0, subset_size=args.subset_size,
                                    seed=args.seed, batch_size=args.batch_size, features=first_step_logits)


def merge_task_pool(pretrained: str, tasks, **args) -> GlueTaskPool:
    """`saft-hf merge --search` with `evaluator: {family: glue, ...}`: args are `GlueTaskPool`'s
    (data_paths, batch_size, test_split, score, device, ...; `model` defaults to the config's pretrained).
    GLUE hides its test labels: give `test_split: validation` (as the family's merge study does) or a
    local test split with labels."""
    return GlueTaskPool(tasks, args.pop("model", pretrained), **args)
