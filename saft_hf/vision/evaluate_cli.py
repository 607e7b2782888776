"""CLIP vision tasks: accuracy of a fine-tuned or merged image encoder, absolute and normalized.

    saft-hf evaluate vision --model runs/merged/task_arithmetic --tasks cars dtd eurosat ... \
        --finetuned-accuracy runs/asam/full/*/finetuned_accuracy.json --output-dir reports/ta_asam

`--model` is an HF directory of a `CLIPVisionModelWithProjection` (what the fine-tuning recipe and
`saft-hf merge` write) or a full CLIP checkpoint (zero-shot). Heads and image preprocessing come
from `--base-model` (default: the `base_model` recorded next to the checkpoint, else ViT-B/32).
Normalized accuracy = accuracy / the task's fine-tuned accuracy, read from the
`finetuned_accuracy.json` files the recipe writes (or any JSON mapping task -> accuracy).
Models fine-tuned with FTTS, and their merges, must be evaluated with `--linearized`.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Iterable

from saft_hf.pools import SCORE_FILE, SCORE_SCHEMA, find_score_file, read_finetuned_scores
from saft_hf.evaluation.merge_selection import MERGES_HELP
from saft_hf.tasks.vision import PAPER_TASKS, VISION_TASKS

logger = logging.getLogger(__name__)

FINETUNED_ACCURACY_FILE = "finetuned_accuracy.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="(required unless --merge-study) HF directory (or Hub name) of the image encoder to evaluate: fine-tuned, merged, or a "
                             "full CLIP checkpoint for zero-shot accuracy")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), metavar="TASK",
                        help=f"tasks to evaluate (default: the paper's 8: {' '.join(PAPER_TASKS)})")
    parser.add_argument("--base-model", default=None,
                        help="pretrained CLIP for heads, preprocessing and the linearization point (default: "
                             "`base_model` from MODEL/finetuned_accuracy.json, else openai/clip-vit-base-patch32)")
    parser.add_argument("--data", nargs="*", default=[], metavar="TASK=PATH",
                        help="local dataset per task (save_to_disk dir, imagefolder, ...) instead of the Hub one")
    parser.add_argument("--split", default="test", choices=["test", "validation"],
                        help="test split, or the validation split carved from train (10%%, max 5000, seed 0)")
    parser.add_argument("--finetuned-accuracy", nargs="*", default=[], metavar="JSON",
                        help="fine-tuned references for normalized accuracy: finetuned_accuracy.json files or "
                             "their run directories, or JSON mappings task -> accuracy")
    parser.add_argument("--linearized", action="store_true",
                        help="evaluate the first-order Taylor expansion around --base-model (FTTS models/merges)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate at most N examples per task")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--head-cache-dir", default=None, help="zero-shot head cache directory")
    parser.add_argument("--name", default=None, help="row name in the Markdown table (default: the model path)")
    parser.add_argument("--merge-study", nargs="+", default=None, metavar="RUN_DIR",
                        help="instead of --model: merge these fine-tuning runs (one per task) with every study method "
                             "(shared driver: search on validation, test scores, absolute + normalized) into "
                             "--output-dir (results.json / .md / .png, merge_study.json / .md)")
    parser.add_argument("--merges", nargs="+", default=None, metavar="METHOD",
                        help="--merge-study: " + MERGES_HELP)
    parser.add_argument("--search-max-samples", type=int, default=None,
                        help="--merge-study: validation examples per task for the coefficient search")
    parser.add_argument("--output-dir", default=None,
                        help="write report.json and report.md here (default: print only)")


def read_finetuned_accuracy(sources: Iterable[str], split: str = "test") -> dict[str, float]:
    """task -> fine-tuned accuracy from recipe outputs or plain JSON mappings (later sources win)."""
    key = "test_accuracy" if split == "test" else "validation_accuracy"
    references: dict[str, float] = {}
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = find_score_file(path)
            path = found if found is not None else path / FINETUNED_ACCURACY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"fine-tuned accuracy file {path} not found (the fine-tuning recipe writes "
                                    f"{SCORE_FILE} and {FINETUNED_ACCURACY_FILE} into its output directory)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"fine-tuned accuracy file {path} is not valid JSON ({err}); give the "
                             f"{FINETUNED_ACCURACY_FILE} the fine-tuning recipe wrote") from None
        if isinstance(data, dict) and data.get("schema") == SCORE_SCHEMA:  # the unified score file
            record = read_finetuned_scores(path)
            references[record.task] = record.score(split)
        elif isinstance(data, dict) and "task" in data and key in data:
            references[data["task"]] = float(data[key])
        elif isinstance(data, dict) and all(isinstance(v, (int, float)) for v in data.values()):
            references.update({k: float(v) for k, v in data.items()})
        elif isinstance(data, dict) and isinstance(data.get("absolute"), dict):  # an evaluation report
            references.update({k: float(v) for k, v in data["absolute"].items()})
        else:
            raise ValueError(f"{path}: expected a recipe {FINETUNED_ACCURACY_FILE} (with 'task' and '{key}') or a "
                             "mapping task -> accuracy")
    return references


def _parse_data(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--data expects TASK=PATH, got {item!r}")
        task, path = item.split("=", 1)
        if task not in VISION_TASKS:
            raise ValueError(f"--data: unknown task {task!r}; choose one of {sorted(VISION_TASKS)}")
        out[task] = path
    return out


def _recorded_base_model(model: str) -> str | None:
    if Path(model).is_dir() and find_score_file(model) is not None:
        return read_finetuned_scores(model).base_model
    return None


def evaluate_vision_model(model: str, tasks, base_model: str | None = None, data_paths=None, split: str = "test",
                          finetuned: dict | None = None, linearized: bool = False, **evaluator_kwargs) -> dict:
    """The report dict (`saft_hf.evaluation.summarize` plus run details) for one encoder."""
    from saft_hf.evaluation import summarize
    from saft_hf.vision.evaluate import VisionEvaluator
    from saft_hf.vision.model import DEFAULT_CLIP_MODEL, clip_config, load_vision_encoder

    base_model = base_model or _recorded_base_model(model) or DEFAULT_CLIP_MODEL
    clip_config(model, "--model")  # a missing path or a BERT / ViT fails here, before data and heads
    clip_config(base_model, "--base-model", full=True)
    weights = load_vision_encoder(model).state_dict()
    evaluator = VisionEvaluator(tasks, base_model=base_model, split=split, data_paths=data_paths,
                                linearized=linearized, **evaluator_kwargs)
    absolute = evaluator(weights)
    finetuned = {t: v for t, v in (finetuned or {}).items() if t in absolute} or None
    if finetuned is not None and len(finetuned) < len(absolute):
        missing = sorted(set(absolute) - set(finetuned))
        raise KeyError(f"no fine-tuned accuracy for task(s) {missing}; add their finetuned_accuracy.json to "
                       "--finetuned-accuracy or leave it out to report absolute accuracy only")
    report = summarize(absolute, finetuned)
    report.update({"model": str(model), "base_model": base_model, "split": split, "linearized": linearized})
    if finetuned is not None:
        report["finetuned"] = finetuned
    return report


def run(args: argparse.Namespace) -> int:
    """Errors are raised with messages naming the input; `saft_hf.cli.run_command` prints them as one
    `saft-hf evaluate: error:` line (exit 1)."""
    from saft_hf.evaluation import markdown_table
    from saft_hf.io_utils import check_output_directory, write_json_atomic, write_text_atomic
    from saft_hf.tasks.vision import get_vision_task

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks = [get_vision_task(t).name for t in args.tasks]  # an unknown task fails before any loading
    data_paths = _parse_data(args.data)
    if args.merge_study:
        return _run_merge_study(args)
    if not args.model:
        raise ValueError("give --model DIR (or --merge-study RUN_DIR ...)")
    if args.output_dir:
        check_output_directory(args.output_dir, "--output-dir", inputs=[args.model])
    finetuned = read_finetuned_accuracy(args.finetuned_accuracy, args.split) if args.finetuned_accuracy else None
    report = evaluate_vision_model(
        args.model, tasks, args.base_model, data_paths, args.split, finetuned, args.linearized,
        head_cache_dir=args.head_cache_dir, max_samples=args.max_samples, batch_size=args.batch_size,
        device=args.device)
    table = markdown_table({args.name or str(args.model): report}, report["tasks"])
    print(table)
    if args.output_dir:
        out = Path(args.output_dir)
        write_json_atomic(out / "report.json", report)
        write_text_atomic(out / "report.md", table)
        print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


def _run_merge_study(args: argparse.Namespace) -> int:
    from saft_hf.vision.merge_study import run_merge_study

    from saft_hf.io_utils import check_output_directory

    if not args.output_dir:
        raise ValueError("--merge-study: give --output-dir")
    from saft_hf.model_paths import check_model_path

    for run_dir in args.merge_study:
        check_model_path(run_dir, "--merge-study run directory")
        if not Path(run_dir).is_dir():
            raise NotADirectoryError(f"--merge-study {run_dir} is not a directory; give the fine-tuning runs' output "
                                     "directories (one per task)")
    check_output_directory(args.output_dir, "--output-dir", inputs=args.merge_study)
    from saft_hf.evaluation.merge_selection import merge_names
    from saft_hf.vision.merge_study import METHODS

    methods = merge_names(args.merges) or list(METHODS)
    report = run_merge_study(args.merge_study, args.output_dir, args.base_model, data_paths=_parse_data(args.data),
                             methods=methods,
                             search_max_samples=args.search_max_samples, test_max_samples=args.max_samples,
                             head_cache_dir=args.head_cache_dir, batch_size=args.batch_size, device=args.device)
    print((Path(args.output_dir) / "merge_study.md").read_text())
    return 0 if report["rows"] else 1
