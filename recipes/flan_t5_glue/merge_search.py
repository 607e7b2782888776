#!/usr/bin/env python
"""Merge GLUE fine-tuned Flan-T5 runs with the coefficient chosen on validation (the SAFT paper's protocol).

    python recipes/flan_t5_glue/merge_search.py --pretrained google/flan-t5-base \
        --finetuned_root runs/flan_t5_glue/asam --tasks cola mrpc rte sst2 --output runs/flan_t5_glue/merged_asam

Each run dir (full model or LoRA adapter) must hold glue_scores.json (written by finetune.py):
grid points are ranked by mean normalized validation score. Writes the merged model at the best
point (HF model dir, model card, merge config) and search.json. Logic: saft_hf.glue.search.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from saft_hf.glue.finetune import read_finetuned_score
from saft_hf.glue.search import search_glue_merge
from saft_hf.merging import registry
from saft_hf.merging.search import default_grid
from saft_hf.tasks.glue import GLUE_HUB_DATASET, GLUE_TASKS, PAPER_TASKS, SCORE_KINDS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default="google/flan-t5-base", help="base model: local dir or Hub name")
    p.add_argument("--finetuned_root", required=True, help="FINETUNED_ROOT/<task> = one fine-tuned run per task")
    p.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), choices=sorted(GLUE_TASKS))
    p.add_argument("--output", required=True, help="output directory for the merged model")
    p.add_argument("--method", default="task_arithmetic", choices=registry.search_names(),
                   help="a registered merge method, or a DARE alias (dare_task_arithmetic, dare_ties)")
    p.add_argument("--alphas", nargs="+", type=float, default=None, help="scaling grid (default: paper's 0.1 .. 1.0)")
    p.add_argument("--densities", nargs="+", type=float, default=None, help="TIES density grid (default 0.3 0.2 0.1)")
    p.add_argument("--drop_rates", nargs="+", type=float, default=None, help="DARE grid (default 0.1 .. 0.9)")
    p.add_argument("--data_root", default=None, help="local data DATA_ROOT/<task> instead of the Hub")
    p.add_argument("--dataset_name", default=GLUE_HUB_DATASET)
    p.add_argument("--max_samples", type=int, default=None, help="seeded validation subset per task for the search")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=5)
    p.add_argument("--score", default="default", choices=list(SCORE_KINDS))
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    root = Path(args.finetuned_root)
    finetuned = {t: str(root / t) for t in args.tasks}
    scores = {t: read_finetuned_score(root / t, t) for t in args.tasks}
    searched = default_grid(args.method)  # the grid flags apply to the parameters this method searches
    grid = {k: v for k, v in (("scaling", args.alphas), ("density", args.densities), ("drop_rate", args.drop_rates))
            if v is not None and k in searched}
    data_paths = {t: str(Path(args.data_root) / t) for t in args.tasks} if args.data_root else None
    result = search_glue_merge(args.pretrained, finetuned, args.output, method=args.method, grid=grid or None,
                               finetuned_scores=scores, data_paths=data_paths, max_samples=args.max_samples,
                               overwrite=args.overwrite, device=args.device, dataset_name=args.dataset_name,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, score=args.score)
    print(json.dumps({"best_params": result["best_params"], "best_score": result["search"]["best"]["score"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
