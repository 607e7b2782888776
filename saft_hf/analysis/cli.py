"""`saft-hf analyze`: the paper's diagnostics on your checkpoints, numbers as JSON, plots as PNG + SVG.

Fine-tuned checkpoints are named per method and task, either one by one

    saft-hf analyze --pretrained BASE --output out/ \\
        --method AdamW sst2=ckpt/adamw/sst2 cola=ckpt/adamw/cola \\
        --method ASAM  sst2=ckpt/asam/sst2  cola=ckpt/asam/cola

or discovered under a root laid out as <method>[-seedN]/<task>/ (what `saft-hf demo` caches):

    saft-hf analyze --pretrained BASE --checkpoints-root ~/.cache/saft_hf/demo/checkpoints/<hash> --output out/

The evaluation data and frozen heads come from a task family: `--family demo|vision|glue` builds the
family's probe (saft_hf.<family>.family.build_probe); `--probe-factory module:function` calls your
own `function(pretrained_path, tasks) -> TaskProbe` for anything else. (This module is core: the
command-line layer, saft_hf.commands.analyze, adds --family and passes the family's probe builder.)
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from saft_hf.analysis.run import ANALYSES

_SEED_SUFFIX = re.compile(r"^(?P<method>.+?)-seed(?P<seed>\d+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__
    parser.add_argument("--pretrained", required=True, help="pretrained encoder: HF model directory (or hub name)")
    parser.add_argument("--method", nargs="+", action="append", default=[], metavar="NAME_OR_TASK=DIR",
                        help="a method name followed by TASK=CHECKPOINT_DIR pairs; repeat per method")
    parser.add_argument("--checkpoints-root", default=None,
                        help="directory laid out as <method>[-seedN]/<task>/ with HF checkpoints (first seed is used)")
    parser.add_argument("--output", required=True, help="output directory for JSON and plots")
    parser.add_argument("--probe-factory", default=None, metavar="MODULE:FUNCTION",
                        help="build the probe in Python: FUNCTION(pretrained_path, tasks) -> saft_hf.analysis.TaskProbe")
    parser.add_argument("--split", default="validation", choices=["validation", "test"],
                        help="which split the evaluation subsets come from")
    parser.add_argument("--analyses", nargs="+", default=list(ANALYSES), choices=list(ANALYSES))
    parser.add_argument("--pair", nargs=2, default=None, metavar=("TASK1", "TASK2"),
                        help="the two tasks of the coefficient plane (default: the first two)")
    parser.add_argument("--subset-size", type=int, default=128, help="evaluation examples per task (fixed seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed evaluation subset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grid-size", type=int, default=21, help="points per plane axis (paper: 21)")
    parser.add_argument("--grid-range", nargs=2, type=float, default=[-0.5, 1.5], metavar=("LOW", "HIGH"))
    parser.add_argument("--others-coefficient", type=float, default=0.3, help="all-task setting: other tasks' coefficient")
    parser.add_argument("--ctl-lambda", type=float, default=0.3)
    parser.add_argument("--hessian-gammas", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--hessian-max-iter", type=int, default=20)
    parser.add_argument("--hessian-tol", type=float, default=1e-3)
    parser.add_argument("--barrier-steps", type=int, default=11)
    parser.add_argument("--merge-scaling", type=float, default=0.3, help="task-arithmetic coefficient of the merged model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")


def parse_methods(method_args: list[list[str]]) -> dict[str, dict[str, str]]:
    """[["AdamW", "a=dir1", "b=dir2"], ...] -> {"AdamW": {"a": "dir1", "b": "dir2"}}."""
    out: dict[str, dict[str, str]] = {}
    for group in method_args:
        name, pairs = group[0], group[1:]
        if "=" in name or not pairs:
            raise ValueError(f"--method {' '.join(group)}: write a method name, then TASK=CHECKPOINT_DIR pairs")
        if name in out:
            raise ValueError(f"--method {name} given twice")
        out[name] = {}
        for pair in pairs:
            task, sep, path = pair.partition("=")
            if not sep or not task or not path:
                raise ValueError(f"--method {name}: {pair!r} is not TASK=CHECKPOINT_DIR")
            out[name][task] = path
    return out


def discover_checkpoints(root: str | Path) -> dict[str, dict[str, str]]:
    """<root>/<method>[-seedN]/<task>/ -> {method: {task: dir}}; for each method the lowest seed is kept."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--checkpoints-root {root} is not a directory")
    chosen: dict[str, tuple[int, Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _SEED_SUFFIX.match(sub.name)
        method, seed = (m["method"], int(m["seed"])) if m else (sub.name, 0)
        if method not in chosen or seed < chosen[method][0]:
            chosen[method] = (seed, sub)
    out = {}
    for method, (_, sub) in chosen.items():
        tasks = {t.name: str(t) for t in sorted(sub.iterdir()) if t.is_dir() and (t / "config.json").exists()}
        if tasks:
            out[method] = tasks
    if not out:
        raise FileNotFoundError(f"no <method>/<task>/config.json checkpoints under {root}")
    return out


def _factory_probe(spec: str, pretrained: str, tasks: list[str]):
    module_name, sep, func_name = spec.partition(":")
    if not sep:
        raise ValueError(f"--probe-factory {spec!r}: write MODULE:FUNCTION")
    return getattr(importlib.import_module(module_name), func_name)(pretrained, tasks)


def run(args, build_probe: Callable[[list[str], dict[str, dict[str, str]]], object] | None = None) -> int:
    """Run the diagnostics; `build_probe(tasks, checkpoints) -> TaskProbe` comes from the task family
    (the command-line layer passes it; analysis never imports a family)."""
    import torch

    from saft_hf.analysis.checkpoints import load_state_dict, task_vectors_from_checkpoints
    from saft_hf.analysis.run import run_all
    from saft_hf.io_utils import check_output_directory
    from saft_hf.model_paths import check_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # usage errors: exit 2, like argparse's
        checkpoints = parse_methods(args.method)
        if args.checkpoints_root:
            for name, by_task in discover_checkpoints(args.checkpoints_root).items():
                checkpoints.setdefault(name, by_task)
        if not checkpoints:
            raise ValueError("no fine-tuned checkpoints: give --method NAME TASK=DIR ... or --checkpoints-root DIR")
        if not args.probe_factory and build_probe is None:
            raise ValueError("no probe: pass --probe-factory MODULE:FUNCTION or run through `saft-hf analyze --family`")
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"saft-hf analyze: error: {err.args[0] if isinstance(err, KeyError) and err.args else err}",
              file=sys.stderr)
        return 2
    # Everything that can be checked without loading a model, before the (long) probe and analyses
    # (failures from here on are one `saft-hf analyze: error:` line via saft_hf.cli.run_command).
    check_model_path(args.pretrained, "--pretrained")
    for by_task in checkpoints.values():
        for task, path in by_task.items():
            check_model_path(path, f"checkpoint of task {task!r}")
    inputs = [args.pretrained, *(p for by_task in checkpoints.values() for p in by_task.values())]
    out = check_output_directory(args.output, "--output", inputs=inputs)  # an existing directory is filled in
    tasks = list(dict.fromkeys(t for by_task in checkpoints.values() for t in by_task))
    probe = (_factory_probe(args.probe_factory, args.pretrained, tasks) if args.probe_factory
             else build_probe(tasks, checkpoints))
    theta0 = {probe.canonical_key(k): v for k, v in load_state_dict(args.pretrained).items()
              if _known(probe, k)}
    vectors = {name: task_vectors_from_checkpoints(theta0, by_task) for name, by_task in checkpoints.items()}
    created = not out.exists()
    try:
        summary = run_all(
            probe, theta0, vectors, args.output, analyses=args.analyses, tasks=args.pair, grid_size=args.grid_size,
            grid_range=tuple(args.grid_range), others_coefficient=args.others_coefficient,
            ctl_lambda=args.ctl_lambda, hessian_gammas=args.hessian_gammas, hessian_max_iter=args.hessian_max_iter,
            hessian_tol=args.hessian_tol, barrier_steps=args.barrier_steps, merge_scaling=args.merge_scaling,
            progress=not args.no_progress,
        )
    except BaseException:
        if created and out.is_dir():  # ours alone: a failed run leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(json.dumps(summary["diagnostics"], indent=2))
    print(f"wrote {len(summary['files'])} files to {args.output}: {', '.join(summary['files'])}")
    return 0


def _known(probe, key: str) -> bool:
    try:
        probe.canonical_key(key)
        return True
    except KeyError:
        return False
