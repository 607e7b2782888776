#!/usr/bin/env python
"""Merge the fine-tuned encoders of one run family (e.g. ViT-B/32, ASAM, full) and reproduce a row
block of the paper's table: weighted average, task arithmetic and TIES with coefficients searched on
the validation splits, plus fixed alpha = 0.4, all evaluated on the test splits (absolute and
normalized), next to the zero-shot and individually fine-tuned accuracies.

    python recipes/clip_vision/merge_and_evaluate.py runs/clip_vision/ViT-B-32/asam/full/{cars,dtd,...} \
        --output-dir reports/ViT-B-32/asam/full

Options may also come from `--config FILE.yaml` (the command line overrides it; unknown keys are
rejected). Writes OUTPUT_DIR/merge_study.json and merge_study.md, plus the shared study driver's
results.json / results.md / results.png. The logic lives in `saft_hf.vision.merge_study`, which runs
`saft_hf.evaluation.study` on the vision task and model pools.
"""
import logging
import sys
from dataclasses import dataclass, field

from saft_hf.merging import registry
from saft_hf.recipe_args import parse_recipe_args
from saft_hf.vision.merge_study import METHODS, run_merge_study


@dataclass
class MergeStudyArguments:
    output_dir: str = field(metadata={"help": "where the reports go"})
    runs: list[str] = field(default_factory=list,
                            metadata={"help": "fine-tuning output directories, one per task (also positional)"})
    pretrained: str = field(default=None, metadata={"help": "base CLIP (default: base_model recorded by the runs)"})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={
        "choices": registry.search_names(), "help": "merge methods (default: the registry's study methods)"})
    fixed_scaling: float = field(default=0.4, metadata={
        "help": "also report each fixed-coefficient ablation at this coefficient "
                "(paper table 6 uses 0.4); negative to skip"})
    data: list[str] = field(default_factory=list, metadata={"help": "local datasets per task, TASK=PATH"})
    search_max_samples: int = field(default=None, metadata={
        "help": "validation examples per task used by the coefficient search (default: all, <= 5000)"})
    test_max_samples: int = field(default=None)
    head_cache_dir: str = field(default=None)
    batch_size: int = field(default=128)
    device: str = field(default=None)


def main(argv=None) -> int:
    (args,) = parse_recipe_args((MergeStudyArguments,), argv, positional="runs", required=("runs",),
                                description=__doc__.splitlines()[1])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    bad = [item for item in args.data if "=" not in item]
    if bad:
        raise SystemExit(f"--data expects TASK=PATH items, got {bad}")
    data = dict(item.split("=", 1) for item in args.data)
    report = run_merge_study(args.runs, args.output_dir, args.pretrained, args.methods,
                             args.fixed_scaling if args.fixed_scaling >= 0 else None, data,
                             args.search_max_samples, args.test_max_samples, None, args.head_cache_dir,
                             args.batch_size, args.device)
    print(open(f"{args.output_dir}/merge_study.md").read())
    return 0 if report["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
