"""The CLIP vision family's hooks for the command line (`saft_hf.commands`): evaluate, analyze, pools."""
from __future__ import annotations

import argparse

import torch

from saft_hf.vision.evaluate_cli import __doc__ as EVALUATE_HELP  # noqa: N812
from saft_hf.vision.evaluate_cli import add_arguments as add_evaluate_arguments
from saft_hf.vision.evaluate_cli import run as run_evaluate
from saft_hf.vision.pools import VisionTaskPool, vision_model_pool

__all__ = ["EVALUATE_HELP", "add_evaluate_arguments", "run_evaluate", "add_analyze_arguments", "build_probe",
           "task_pool", "model_pool", "merge_task_pool"]

task_pool = VisionTaskPool
model_pool = vision_model_pool


def add_analyze_arguments(parser) -> None:
    parser.add_argument("--head-cache-dir", default=None, help="vision family: zero-shot head cache directory")


def _parse_data(items) -> dict[str, str]:
    out = {}
    for item in items or []:
        task, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--data expects TASK=PATH, got {item!r}")
        out[task] = path
    return out


def build_probe(args: argparse.Namespace, tasks: list[str], checkpoints: dict[str, dict[str, str]]):
    """A `TaskProbe` on the CLIP image encoder with each task's frozen zero-shot head, on a fixed
    subset of the chosen split (`--subset-size`, seed `--seed`). Heads and preprocessing come from
    `--pretrained` (a CLIP or CLIPVisionModelWithProjection directory)."""
    from saft_hf.analysis.probe import TaskProbe
    from saft_hf.vision.data import normalize_uint8

    pool = VisionTaskPool(tasks, args.pretrained, data_paths=_parse_data(args.data),
                          head_cache_dir=args.head_cache_dir, batch_size=args.batch_size, device="cpu",
                          progress=not args.no_progress, cache_images={"test": True})
    ev = pool.evaluator(args.split)
    tensors = {}
    for task in pool.tasks:
        pixels, labels = zip(*ev.batches(task))
        tensors[task] = ({"pixel_values": normalize_uint8(torch.cat(pixels), ev.processor)}, torch.cat(labels))
    heads = {t: ev.head(t) for t in pool.tasks}
    return TaskProbe.from_tensors(ev.encoder, heads, tensors, features="clip_image", subset_size=args.subset_size,
                                  seed=args.seed, batch_size=args.batch_size)


def merge_task_pool(pretrained: str, tasks, **args) -> VisionTaskPool:
    """`saft-hf merge --search` with `evaluator: {family: vision, ...}`: args are `VisionTaskPool`'s
    (data_paths, head_cache_dir, batch_size, device, ...; `base_model` defaults to the config's pretrained)."""
    return VisionTaskPool(tasks, args.pop("base_model", pretrained), **args)
