#!/usr/bin/env python
"""Merge the fine-tuned encoders of one run family (e.g. ViT-B/32, ASAM, full) and reproduce a row
block of the paper's table: weighted average, task arithmetic and TIES with coefficients searched on
the validation splits, plus fixed alpha = 0.4, all evaluated on the test splits (absolute and
normalized), next to the zero-shot and individually fine-tuned accuracies.

    python recipes/clip_vision/merge_and_evaluate.py runs/clip_vision/ViT-B-32/asam/full/{cars,dtd,...} \
        --output-dir reports/ViT-B-32/asam/full

Writes OUTPUT_DIR/merge_study.json and merge_study.md. The logic lives in `saft_hf.vision.merge_study`.
"""
import argparse
import logging
import sys

from saft_hf.vision.merge_study import METHODS, run_merge_study


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("runs", nargs="+", help="fine-tuning output directories, one per task")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--pretrained", default=None, help="base CLIP (default: base_model recorded by the runs)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--fixed-scaling", type=float, default=0.4, help="also report task arithmetic at this alpha "
                        "(paper table 6 uses 0.4); negative to skip")
    parser.add_argument("--data", nargs="*", default=[], metavar="TASK=PATH", help="local datasets per task")
    parser.add_argument("--search-max-samples", type=int, default=None,
                        help="validation examples per task used by the coefficient search (default: all, <= 5000)")
    parser.add_argument("--test-max-samples", type=int, default=None)
    parser.add_argument("--head-cache-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    data = dict(item.split("=", 1) for item in args.data)
    report = run_merge_study(args.runs, args.output_dir, args.pretrained, args.methods,
                             args.fixed_scaling if args.fixed_scaling >= 0 else None, data,
                             args.search_max_samples, args.test_max_samples, None, args.head_cache_dir,
                             args.batch_size, args.device)
    print(open(f"{args.output_dir}/merge_study.md").read())
    return 0 if report["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
