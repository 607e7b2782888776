"""`saft-hf compare`: the paired fine-tuning-method comparison on merge-study reports of any family.

Each report is a merge study's results.json (`saft-hf evaluate vision --merge-study ...`,
`saft-hf evaluate glue --merge_study ...`, or `run_merge_study(per_example=True)`), which records
per-example test correctness. One report per seed and method, seeds paired by position:

    saft-hf compare --baseline adamw-s0/ adamw-s1/ --treatment asam-s0/ asam-s1/ --output cmp/

writes comparison.json, comparison.md (effect treatment - baseline per merge method, 95% bootstrap CI
over test examples and seeds, McNemar per seed) and effects_<name>.png/.svg (forest plot).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", nargs="+", required=True, metavar="REPORT",
                        help="merge-study reports (dir with results.json, or the file) of the baseline, one per seed")
    parser.add_argument("--treatment", nargs="+", required=True, metavar="REPORT",
                        help="the treatment's reports, one per seed, in the same seed order")
    parser.add_argument("--baseline-name", default="baseline", help="name in tables (e.g. AdamW)")
    parser.add_argument("--treatment-name", default="treatment", help="name in tables (e.g. ASAM)")
    parser.add_argument("--output", required=True, help="directory for comparison.json / .md and the forest plot")
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap replicates (default 10000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="bootstrap random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from saft_hf.evaluation.compare import compare_results, comparison_markdown, read_results, write_comparison

    if len(args.baseline) != len(args.treatment):
        print(f"saft-hf compare: {len(args.baseline)} baseline report(s) but {len(args.treatment)} treatment "
              "report(s); give one per seed for each, in the same order", file=sys.stderr)
        return 2
    if args.baseline_name == args.treatment_name:
        print("saft-hf compare: --baseline-name and --treatment-name must differ", file=sys.stderr)
        return 2
    try:
        results = {args.baseline_name: read_results(args.baseline), args.treatment_name: read_results(args.treatment)}
        cmp = compare_results(results, baseline=args.baseline_name, n_boot=args.n_boot, seed=args.bootstrap_seed)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"saft-hf compare: {err}", file=sys.stderr)
        return 1
    files = write_comparison(cmp, args.output)
    print(comparison_markdown(cmp))
    print(f"Written to {args.output}/: {', '.join(files)}")
    return 0
