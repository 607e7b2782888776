#!/usr/bin/env python
"""Merge GLUE fine-tuned Flan-T5 runs with the coefficient chosen on validation (the SAFT paper's protocol).

    python recipes/flan_t5_glue/merge_search.py --pretrained google/flan-t5-base \
        --finetuned_root runs/flan_t5_glue/asam --tasks cola mrpc rte sst2 --output runs/flan_t5_glue/merged_asam

Each run dir (full model or LoRA adapter) must hold glue_scores.json / finetuned_scores.json (written
by finetune.py): grid points are ranked by mean normalized validation score. Writes the merged model
at the best point of `--method` (HF model dir, model card, merge config) and search.json.
With `--study`: every study method of the merge-method registry (searched, plus the fixed-coefficient
ablations at alpha 0.4) through the shared study driver, reported in OUTPUT/results.{json,md,png}.
Options may also come from `--config FILE.yaml` (the command line overrides it; unknown keys are
rejected). Logic: saft_hf.glue.search.
"""
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from saft_hf.glue.search import run_glue_merge_study, search_glue_merge
from saft_hf.merging import registry
from saft_hf.merging.search import default_grid
from saft_hf.pools import read_finetuned_scores
from saft_hf.recipe_args import parse_recipe_args
from saft_hf.tasks.glue import GLUE_HUB_DATASET, GLUE_TASKS, PAPER_TASKS, SCORE_KINDS

METHODS = registry.search_names()  # every registered method and search alias (e.g. a method with DARE in front)


@dataclass
class GlueMergeArguments:
    finetuned_root: str = field(metadata={"help": "FINETUNED_ROOT/<task> = one fine-tuned run per task"})
    output: str = field(metadata={"help": "output directory for the merged model (or the study report)"})
    pretrained: str = field(default="google/flan-t5-base", metadata={"help": "base model: local dir or Hub name"})
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS), metadata={"choices": sorted(GLUE_TASKS)})
    method: str = field(default="task_arithmetic", metadata={"choices": METHODS})
    study: bool = field(default=False, metadata={"help": "run every study method (shared driver) instead of one"})
    alphas: list[float] = field(default=None, metadata={"help": "scaling grid (default: paper's 0.1 .. 1.0)"})
    densities: list[float] = field(default=None, metadata={"help": "TIES density grid (default 0.3 0.2 0.1)"})
    drop_rates: list[float] = field(default=None, metadata={"help": "DARE grid (default 0.1 .. 0.9)"})
    data_root: str = field(default=None, metadata={"help": "local data DATA_ROOT/<task> instead of the Hub"})
    dataset_name: str = field(default=GLUE_HUB_DATASET)
    max_samples: int = field(default=None, metadata={"help": "seeded validation subset per task for the search"})
    batch_size: int = field(default=64)
    max_new_tokens: int = field(default=5)
    score: str = field(default="default", metadata={"choices": list(SCORE_KINDS)})
    device: str = field(default=None)
    overwrite: bool = field(default=False)


def parse_args(argv=None) -> GlueMergeArguments:
    return parse_recipe_args((GlueMergeArguments,), argv, description=__doc__.splitlines()[1])[0]


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    root = Path(args.finetuned_root)
    finetuned = {t: str(root / t) for t in args.tasks}
    data_paths = {t: str(Path(args.data_root) / t) for t in args.tasks} if args.data_root else None
    common = dict(dataset_name=args.dataset_name, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                  score=args.score)
    if args.study:
        result = run_glue_merge_study(args.pretrained, finetuned, args.output, alphas=args.alphas,
                                      densities=args.densities, data_paths=data_paths,
                                      search_max_samples=args.max_samples, device=args.device, **common)
        print(json.dumps({name: {"params": row["params"], "normalized_mean": row["normalized_mean"]}
                          for name, row in result["methods"].items()}))
        return 0
    scores = {t: read_finetuned_scores(root / t, t).score("validation") for t in args.tasks}
    searched = default_grid(args.method)  # the grid flags apply to the parameters this method searches
    grid = {k: v for k, v in (("scaling", args.alphas), ("density", args.densities), ("drop_rate", args.drop_rates))
            if v is not None and k in searched}
    result = search_glue_merge(args.pretrained, finetuned, args.output, method=args.method, grid=grid or None,
                               finetuned_scores=scores, data_paths=data_paths, max_samples=args.max_samples,
                               overwrite=args.overwrite, device=args.device, **common)
    print(json.dumps({"best_params": result["best_params"], "best_score": result["search"]["best"]["score"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
