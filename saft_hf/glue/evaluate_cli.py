"""GLUE text-to-text evaluation of a (merged) seq2seq model: absolute and normalized scores per task.

    saft-hf evaluate glue --model runs/merged --tasks cola mrpc rte sst2 \
        --finetuned_root runs/flan_t5_glue/asam --output_dir runs/merged/eval

Generates a few tokens per example, maps them to label words (unparseable = wrong), and scores
each task with exact-match accuracy plus its own GLUE metrics (CoLA MCC, MRPC/QQP F1, STS-B
Spearman/Pearson); all offline. Normalized score = merged score / that task's fine-tuned score,
read from the `glue_scores.json` the fine-tuning recipe writes. Writes glue_eval.json + .md.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from saft_hf.evaluation.merge_selection import MERGES_HELP
from saft_hf.tasks.glue import GLUE_HUB_DATASET, GLUE_TASKS, PAPER_TASKS, SCORE_KINDS, get_task

logger = logging.getLogger(__name__)
REPORT_NAME = "glue_eval"


def _task_paths(items: list[str] | None, what: str) -> dict[str, str]:
    paths = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} entries look like TASK=PATH (e.g. cola=runs/cola), got {item!r}")
        task, path = item.split("=", 1)
        paths[get_task(task).name] = path
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model to evaluate: HF model dir, Hub name, or PEFT adapter dir "
                        "(with --merge_study: the pretrained model the runs started from)")
    parser.add_argument("--merge_study", action="store_true",
                        help="merge the --finetuned_root runs (full fine-tuning) with every study method (shared driver: "
                             "search and report on validation, absolute + normalized) into --output_dir/results.*")
    parser.add_argument("--merges", nargs="+", default=None, metavar="METHOD", help="--merge_study: " + MERGES_HELP)
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the one saved with --model)")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), choices=sorted(GLUE_TASKS),
                        help=f"GLUE tasks (default: the paper's {' '.join(PAPER_TASKS)})")
    parser.add_argument("--split", default="validation", help="split to score (validation = MNLI validation_matched)")
    parser.add_argument("--dataset_name", default=GLUE_HUB_DATASET, help="Hub dataset (config = task)")
    parser.add_argument("--data_root", default=None, help="local data: DATA_ROOT/<task> per task (save_to_disk dir or split files)")
    parser.add_argument("--data", nargs="*", default=None, metavar="TASK=PATH", help="local data per task (overrides --data_root)")
    parser.add_argument("--finetuned_root", default=None,
                        help="fine-tuned runs: FINETUNED_ROOT/<task>/glue_scores.json, for normalized scores")
    parser.add_argument("--finetuned", nargs="*", default=None, metavar="TASK=PATH",
                        help="fine-tuned scores per task: a run dir or a glue_scores.json (overrides --finetuned_root)")
    parser.add_argument("--max_samples", type=int, default=None, help="seeded subset per task (quick checks)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=5)
    parser.add_argument("--max_source_length", type=int, default=256)
    parser.add_argument("--score", default="default", choices=list(SCORE_KINDS),
                        help="task score: default = exact-match accuracy (STS-B Spearman); glue = CoLA MCC, MRPC/QQP F1")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--name", default=None, help="row name in the Markdown table (default: the model path)")
    parser.add_argument("--output_dir", required=True, help=f"where {REPORT_NAME}.json and {REPORT_NAME}.md go")


def evaluate_glue_model(
    model: str,
    tasks: list[str],
    output_dir: str | Path,
    tokenizer: str | None = None,
    split: str = "validation",
    data_paths: dict[str, str] | None = None,
    finetuned_paths: dict[str, str] | None = None,
    name: str | None = None,
    device: str | None = None,
    **evaluator_kwargs,
) -> dict:
    """Evaluate `model` on `tasks`, write JSON + Markdown reports to `output_dir`, return the report."""
    import torch

    from saft_hf.evaluation import markdown_table, summarize
    from saft_hf.glue.finetune import read_finetuned_score
    from saft_hf.glue.predict import make_glue_evaluator
    from saft_hf.io_utils import write_json_atomic, write_text_atomic

    tasks = [get_task(t).name for t in tasks]
    finetuned = None
    if finetuned_paths:
        missing = [t for t in tasks if t not in finetuned_paths]
        if missing:
            raise ValueError(f"fine-tuned scores given for {sorted(finetuned_paths)} but not for {missing}")
        # Read before the (long) evaluation so a missing file fails fast.
        finetuned = {t: read_finetuned_score(finetuned_paths[t], t) for t in tasks}
    # The tokenizer defaults to the one saved with the model (fine-tuned runs and merges keep it).
    evaluator = make_glue_evaluator(tasks, model, tokenizer, split=split, data_paths=data_paths, **evaluator_kwargs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    evaluator.model.to(device)
    metrics = evaluator.evaluate()
    absolute = {t: metrics[t]["score"] for t in tasks}
    report = summarize(absolute, finetuned)
    report.update(
        {
            "model": str(model),
            "split": split,
            "score_metrics": {t: metrics[t]["score_metric"] for t in tasks},
            "metrics": metrics,
            "finetuned": finetuned,
        }
    )
    row = name or str(model)
    lines = [f"# GLUE evaluation: {row}\n", f"Split: {split}. Scores in %.\n", markdown_table({row: report}, tasks)]
    metric_names = sorted({k for m in metrics.values() for k in m if k not in ("score", "score_metric", "num_examples")})
    lines.append("| task | score metric | " + " | ".join(metric_names) + " | examples |")
    lines.append("|" + "---|" * (len(metric_names) + 3))
    for t in tasks:
        cells = [f"{100 * metrics[t][k]:.2f}" if k in metrics[t] else "-" for k in metric_names]
        lines.append(f"| {t} | {metrics[t]['score_metric']} | " + " | ".join(cells) + f" | {metrics[t]['num_examples']} |")
    if finetuned:
        lines.append("\nNormalized = merged score / fine-tuned score on the same task.")
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / f"{REPORT_NAME}.json", report)
    write_text_atomic(output_dir / f"{REPORT_NAME}.md", "\n".join(lines) + "\n")
    return report


def run(args: argparse.Namespace) -> int:
    """Errors are raised with messages naming the input (bad paths, unreachable Hub, bad data rows);
    `saft_hf.cli.run_command` prints them as one `saft-hf evaluate: error:` line (exit 1)."""
    from saft_hf.io_utils import check_output_directory
    from saft_hf.model_paths import check_model_path

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks = [get_task(t).name for t in args.tasks]
    check_model_path(args.model, "--model")
    if args.tokenizer:
        check_model_path(args.tokenizer, "--tokenizer")
    check_output_directory(args.output_dir, "--output_dir", inputs=[args.model])
    if args.merge_study:
        return _run_merge_study(args, tasks)
    data_paths = {}
    if args.data_root:
        data_paths = {t: str(Path(args.data_root) / t) for t in tasks}
    data_paths.update(_task_paths(args.data, "--data"))
    finetuned_paths = {}
    if args.finetuned_root:
        finetuned_paths = {t: str(Path(args.finetuned_root) / t) for t in tasks}
    finetuned_paths.update(_task_paths(args.finetuned, "--finetuned"))
    report = evaluate_glue_model(
        args.model,
        tasks,
        args.output_dir,
        tokenizer=args.tokenizer,
        split=args.split,
        data_paths=data_paths or None,
        finetuned_paths=finetuned_paths or None,
        name=args.name,
        device=args.device,
        dataset_name=args.dataset_name,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_source_length=args.max_source_length,
        score=args.score,
    )
    summary = f"absolute mean {100 * report['absolute_mean']:.2f}"
    if "normalized_mean" in report:
        summary += f", normalized mean {100 * report['normalized_mean']:.2f}"
    print(f"GLUE {', '.join(tasks)}: {summary} -> {Path(args.output_dir) / REPORT_NAME}.json")
    return 0


def _run_merge_study(args: argparse.Namespace, tasks: list[str]) -> int:
    from saft_hf.glue.search import run_glue_merge_study

    if not args.finetuned_root and not args.finetuned:
        raise ValueError("--merge_study needs the fine-tuned runs: --finetuned_root DIR or --finetuned TASK=DIR ...")
    runs = {t: str(Path(args.finetuned_root) / t) for t in tasks} if args.finetuned_root else {}
    runs.update(_task_paths(args.finetuned, "--finetuned"))
    data_paths = {t: str(Path(args.data_root) / t) for t in tasks} if args.data_root else {}
    data_paths.update(_task_paths(args.data, "--data"))
    from saft_hf.evaluation.merge_selection import merge_names

    result = run_glue_merge_study(args.model, {t: runs[t] for t in tasks}, args.output_dir,
                                  merges=merge_names(args.merges), data_paths=data_paths or None, search_max_samples=args.max_samples,
                                  device=args.device, dataset_name=args.dataset_name, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, max_source_length=args.max_source_length,
                                  score=args.score)
    print((Path(args.output_dir) / "results.md").read_text())
    return 0 if result["methods"] else 1
