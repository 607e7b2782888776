"""Task data for the LLM SFT recipe: one loader for Hub datasets, local files and two synthetic tiny tasks.

A task is `dataset_name` (+ `dataset_config`, `prompt_column`, `completion_column`); every source is
turned into a prompt-completion dataset, the format TRL's SFTTrainer trains on the completion only:

- `synthetic:copy` / `synthetic:reverse`: generated word sequences ("copy : a b c =" -> "a b c"),
  offline, used with the tiny model (`export_pretrained.py --tiny`);
- a local `.json` / `.jsonl` / `.csv` file, or a directory written by `Dataset.save_to_disk`;
- anything else is a Hub dataset name (e.g. `openai/gsm8k` with `dataset_config: main`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

# The synthetic tasks' vocabulary (the tiny tokenizer is built from it, see export_pretrained.py).
WORDS = tuple(
    "apple bird cat dog egg fish goat hat ice jam kite lamp moon nut owl pig queen rat sun tree".split()
)
TASK_WORDS = ("copy", "reverse", ":", "=")
SYNTHETIC = {"copy": lambda words: list(words), "reverse": lambda words: list(reversed(words))}


@dataclass
class TaskArguments:
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-0.5B", metadata={"help": "Base model: Hub name or local directory."}
    )
    task_name: str = field(default="task", metadata={"help": "Name of the task (used in reports)."})
    dataset_name: str = field(
        default="synthetic:copy",
        metadata={"help": "synthetic:copy | synthetic:reverse | a .json/.jsonl/.csv file | a save_to_disk dir | a Hub name"},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration (e.g. 'main')."})
    train_split: str = field(default="train", metadata={"help": "Split to fine-tune on."})
    eval_split: str = field(default="test", metadata={"help": "Split the loss is evaluated on."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    completion_column: str = field(default="completion", metadata={"help": "Column holding the completion."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=200, metadata={"help": "Evaluate on at most this many rows."})
    synthetic_size: int = field(default=512, metadata={"help": "Rows per split of the synthetic tasks."})


def synthetic_split(task: str, split: str, size: int):
    """Deterministic rows of a synthetic task; train and test use different seeds."""
    from datasets import Dataset

    if task not in SYNTHETIC:
        raise ValueError(f"unknown synthetic task {task!r}: use one of {sorted(SYNTHETIC)}")
    rng = random.Random(f"{task}/{split}")
    prompts, completions = [], []
    for _ in range(size):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        prompts.append(" ".join([task, ":", *words, "="]))
        completions.append(" " + " ".join(SYNTHETIC[task](words)))
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def load_train(args: TaskArguments):
    """The training rows; when the task evaluates on its training split, its first evaluation rows are held out."""
    skip = (args.max_eval_samples or 0) if args.eval_split == args.train_split else 0
    return load_split(args, args.train_split, args.max_train_samples, skip=skip)


def load_eval(args: TaskArguments):
    return load_split(args, args.eval_split, args.max_eval_samples)


def load_split(args: TaskArguments, split: str, max_samples: int | None, skip: int = 0):
    """One split of the task as a prompt-completion dataset (rows `skip`, `skip + 1`, ... at most `max_samples`)."""
    from datasets import load_dataset, load_from_disk

    name = args.dataset_name
    if name.startswith("synthetic:"):
        dataset = synthetic_split(name.split(":", 1)[1], split, args.synthetic_size)
    elif os.path.isdir(name):
        dataset = load_from_disk(name)[split]
    elif os.path.isfile(name):
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(os.path.splitext(name)[1])
        if kind is None:
            raise ValueError(f"{name}: use a .json, .jsonl or .csv file, or a save_to_disk directory")
        dataset = load_dataset(kind, data_files={split: name})[split]
    else:
        dataset = load_dataset(name, args.dataset_config, split=split)
    missing = [c for c in (args.prompt_column, args.completion_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{name} ({split}) has no column(s) {missing}; its columns are {dataset.column_names}. Set "
            "prompt_column / completion_column in the task config."
        )
    dataset = dataset.select_columns([args.prompt_column, args.completion_column])
    if args.prompt_column != "prompt":
        dataset = dataset.rename_column(args.prompt_column, "prompt")
    if args.completion_column != "completion":
        dataset = dataset.rename_column(args.completion_column, "completion")
    end = len(dataset) if max_samples is None else min(len(dataset), skip + max_samples)
    if skip or end < len(dataset):
        dataset = dataset.select(range(min(skip, end), end))
    return dataset


def parse_with_config(dataclass_types, argv: list[str], ignore_unknown_config_keys: bool = False):
    """Dataclasses from `--config file.yaml` (one or more) plus command-line overrides (the command line wins).

    `ignore_unknown_config_keys` lets a reader of only some of the dataclasses (e.g. the evaluation,
    which needs `TaskArguments` but not the training fields) use the same config files.
    """
    import dataclasses
    import json

    import yaml
    from transformers import HfArgumentParser

    argv = list(argv)
    config_items: list[str] = []
    while "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        path = argv[i + 1]
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a mapping of argument names to values")
        for key, value in config.items():
            if value is None:
                continue
            config_items.append(f"--{key}")
            if isinstance(value, bool):
                config_items.append(str(value).lower())
            elif isinstance(value, (list, tuple)):
                config_items.extend(str(v) for v in value)
            elif isinstance(value, dict):
                config_items.append(json.dumps(value))
            else:
                config_items.append(str(value))
        del argv[i : i + 2]
    parser = HfArgumentParser(dataclass_types)
    if not ignore_unknown_config_keys:
        return parser.parse_args_into_dataclasses(args=config_items + argv)
    known = {f"--{f.name}" for cls in dataclass_types for f in dataclasses.fields(cls)}
    kept, keep = [], False
    for item in config_items:
        if item.startswith("--"):
            keep = item in known
        if keep:
            kept.append(item)
    return parser.parse_args_into_dataclasses(args=kept + argv)
