"""The demo family's hooks for the command line (`saft_hf.commands`): analyze probe and pools.

`saft-hf analyze --family demo` rebuilds the demo's text tasks and frozen heads the way the
checkpoints were trained (logit scale / max length read from their `saft_demo_training.json`).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from saft_hf.demo.pools import DemoTaskPool, demo_model_pool, demo_task_pool

__all__ = ["add_analyze_arguments", "build_probe", "task_pool", "model_pool", "merge_task_pool", "DemoTaskPool"]

task_pool = demo_task_pool
model_pool = demo_model_pool


def add_analyze_arguments(parser) -> None:
    parser.add_argument("--cache-dir", default=None, help="demo family: data cache (default as `saft-hf demo`)")
    parser.add_argument("--logit-scale", type=float, default=None,
                        help="demo family: head logit scale (default: read from the checkpoints' training record)")
    parser.add_argument("--max-length", type=int, default=None, help="demo family: max tokens (default: from the record)")


def _training_signature(checkpoints: dict[str, dict[str, str]]) -> dict:
    for by_task in checkpoints.values():
        for ckpt in by_task.values():
            info = Path(ckpt) / "saft_demo_training.json"
            if info.exists():
                return json.loads(info.read_text()).get("signature", {})
    return {}


def build_probe(args: argparse.Namespace, tasks: list[str], checkpoints: dict[str, dict[str, str]]):
    """Evaluation subsets and heads of the demo's text tasks, matching how the checkpoints were trained."""
    from saft_hf.analysis.probe import TaskProbe
    from saft_hf.demo.model import check_text_encoder

    check_text_encoder(args.pretrained)  # a ViT / T5 is named here, not deep inside a forward pass
    record = _training_signature(checkpoints)
    logit_scale = args.logit_scale if args.logit_scale is not None else record.get("logit_scale")
    pool = demo_task_pool(args.pretrained, tasks, cache_dir=args.cache_dir, logit_scale=logit_scale,
                          max_length=args.max_length or record.get("max_length"),
                          test_fraction=record.get("test_fraction"))
    split = {n: pool.split(n, args.split) for n in pool.tasks}
    return TaskProbe.from_token_ids(copy.deepcopy(pool.encoder), pool.heads,
                                    {n: (s.input_ids, s.labels) for n, s in split.items()},
                                    pad_id=pool.pad_id, subset_size=args.subset_size, seed=args.seed,
                                    batch_size=args.batch_size)


def merge_task_pool(pretrained: str, tasks, **args) -> DemoTaskPool:
    """`saft-hf merge --search` with `evaluator: {family: demo, ...}`: args are `demo_task_pool`'s
    (cache_dir, logit_scale, max_length, test_fraction, batch_size; `pretrained` defaults to the config's)."""
    return demo_task_pool(args.pop("pretrained", pretrained), tasks, **args)
