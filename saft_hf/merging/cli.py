"""`saft-hf merge CONFIG.yaml --output DIR`: merge fine-tuned checkpoints on disk, streamed."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

EPILOG = """\
example config (recipes/merge_examples/ties_vit_b32.yaml):

  pretrained: openai/clip-vit-base-patch32   # HF model dir or checkpoint file (Hub name only if cached)
  models:                                     # fine-tuned checkpoints: HF dirs, .safetensors/.bin
    - {name: cars, path: checkpoints/cars}     # files, sharded or not, or PEFT LoRA adapter dirs
    - {name: dtd,  path: checkpoints/dtd}
  method: ties              # any registered method (listed below)
  params:                   # optional; defaults reproduce the TIES / SAFT papers
    scaling: 0.3            # lambda (task_arithmetic: one alpha, or a list with one per model)
    density: 0.2            # keep the top 20% magnitudes of each task vector (mask rate 0.8)
    trim_scope: global      # global (whole model, paper) | per_tensor (PEFT / mergekit)
    sign_method: sum        # sum (sign of summed values, paper) | count (majority of signs)
    disjoint: mean          # mean of agreeing entries (paper) | sum (FusionBench)
    trim_count: kthvalue    # kthvalue (paper, FusionBench) | exact (PEFT) | exact_min1 (mergekit)
    # density and weights may be lists, one value per model (weights: [1.0, 0.5])
  transforms: [{name: dare, drop_rate: 0.5, seed: 0}]   # optional, in front of the method
  max_shard_size: 2GB
  allow_nonfinite: false    # true: merge even if a checkpoint holds NaN/Inf (refused by default)
  out_dtype: bfloat16       # optional: float16 | bfloat16 | float32 (computed in float32 either way)

A mergekit YAML (merge_method, base_model, models: [{model, parameters: {weight, density}}],
parameters, dtype, out_dtype, tokenizer_source: base) is accepted as is and run with mergekit's
semantics; methods and keys saft-hf does not support are refused by name. docs/merging.md says
what matches mergekit bit for bit. mergekit methods supported now:
  MERGEKIT_METHODS

Methods that read data (regmean, fisher_merging, adamerging) also need
  data: mypkg.adapters:cars_dtd_data   # a callable returning a saft_hf.merging.data.MergeData
(or data: {callable: mypkg.adapters:make, args: {...}}); RegMean/Fisher statistics are cached in
<checkpoint>/.saft_merge_stats/ when the data has a fingerprint.

Numbers and booleans are checked strictly: write `scaling: 0.4`, not `scaling: "0.4"`;
`normalize: false`, not `normalize: "no"`. `dare: {drop_rate: 0.5}` is accepted as an alias of
one DARE transform.

The output directory is an HF model (sharded safetensors + index, the base model's config and
tokenizer files), with merge_config.yaml, merge_report.json and a README.md model card. It is
written under a temporary name and renamed when complete. Coefficient search (alpha / density /
drop-rate grids scored on validation data) runs with --search: add an evaluator to the config

  evaluator: {family: demo, tasks: [color, mood], logit_scale: 50}   # demo | vision | glue task pool
  # or evaluator: mypkg.evals:make   (or {callable: mypkg.evals:make, args: {...}}): returns a task
  # pool (evaluate(state_dict, split, tasks, max_examples)) or a function (state_dict, split) -> {task: score}
  search: {grid: {scaling: [0.2, 0.4, 0.6]}, max_examples: 128}   # optional; default: the method's grid

Every grid point is scored on the validation split, the best mean score is chosen, and only the
chosen point is evaluated on the test split; search_report.json / search_report.md are written
beside the merged model. Data-reading methods take their inputs from the evaluator's task pool
(TaskPool.merge_data) when the config has no `data:`. From Python:
saft_hf.merging.search_coefficients(pretrained, task_vectors, evaluate, method="ties").
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .registry import describe, method_names, transform_names

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (f"Merge fine-tuned checkpoints of one pretrained model ({', '.join(method_names())}; "
                          f"transforms: {', '.join(transform_names())}) tensor by tensor, without loading all "
                          "models at once.")
    from .mergekit_config import supported_methods

    parser.epilog = EPILOG.replace("MERGEKIT_METHODS", ", ".join(supported_methods())) + "\n" + describe() + "\n"
    parser.add_argument("config", help="YAML merge config: saft-hf's format or a mergekit config (see below)")
    parser.add_argument("--output", "-o", required=True, help="output directory for the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (only after the new one is complete)")
    parser.add_argument("--max-shard-size", default=None, help="override max_shard_size from the config, e.g. 500MB")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--search", action="store_true",
                        help="search the method's coefficients on the config's `evaluator:` (validation split), "
                        "merge the chosen point, evaluate it on test, write search_report.json/.md beside it")


def load_config(path, raw: bool = False):
    """The MergeConfig in YAML file `path` (`raw`: the parsed YAML); unreadable / malformed files
    get a message naming it."""
    import yaml

    from .pipeline import MergeConfig

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"merge config {path} is a directory; give the YAML file (e.g. {p / 'merge.yaml'})")
    if not p.exists():
        raise FileNotFoundError(f"merge config {path} not found")
    try:
        return yaml.safe_load(p.read_text()) if raw else MergeConfig.from_yaml(p)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"merge config {path} is not valid YAML: {problem}{where}; fix the YAML syntax "
                         "(see saft-hf merge --help for an example)") from None
    except UnicodeDecodeError:
        raise ValueError(f"merge config {path} is not a text (UTF-8) file; give the YAML merge config") from None


def run(args, resolve_family=None) -> int:
    """Errors are raised, not printed: `saft_hf.cli.run_command` turns every one (OSError via
    `io_utils.os_error_message`, our ValueError / CheckpointError messages, bugs) into one line.
    `resolve_family(name, pretrained, tasks, args) -> TaskPool`: how `evaluator: {family: ...}`
    becomes a task pool (given by the command layer, saft_hf.commands.merge; core imports no family)."""
    from .pipeline import merge_models

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "search", False):
        from .search_cli import run_search

        raw = load_config(args.config, raw=True)
        if args.max_shard_size and isinstance(raw, dict):
            raw["max_shard_size"] = args.max_shard_size
        report = run_search(raw, args.output, overwrite=args.overwrite, progress=not args.no_progress,
                            resolve_family=resolve_family)
    else:
        config = load_config(args.config)
        if args.max_shard_size:
            config.max_shard_size = args.max_shard_size
        report = merge_models(config, args.output, overwrite=args.overwrite, progress=not args.no_progress)
    for note in report.get("notes", []):
        print(f"note: {note}")
    print(f"merged {report['merged_tensors']} tensors with {report['method']} into {args.output} "
          f"({len(report['shards'])} shard(s), {report['total_bytes'] / 1e6:.1f} MB)")
    print(json.dumps({"method": report["method"], "params": report["params"]}))
    if "search" in report:
        s = report["search"]
        print(f"search: {len(s['points'])} point(s) on validation, chose {s['chosen']['params']} "
              f"(score {s['chosen']['score']:.4f}); test mean {s['test']['mean']:.4f}; report in "
              f"{args.output}/search_report.md")
    return 0
