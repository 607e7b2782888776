"""The one recipe argument parser (saft_hf.recipe_args): YAML + command line, unknown keys named,
used by every recipe script (fine-tuning and merging, both families)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from saft_hf.recipe_args import parse_recipe_args

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@dataclass
class _Args:
    output_dir: str = field(metadata={"help": "out"})
    runs: list[str] = field(default_factory=list)
    alpha: float = 0.4
    tasks: list[str] = field(default_factory=lambda: ["a"])
    flag: bool = False


def test_command_line_overrides_yaml_and_lists_parse(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: from_yaml\nalpha: 0.7\ntasks: [x, y]\nflag: true\n")
    (args,) = parse_recipe_args((_Args,), ["--config", str(cfg), "--alpha", "0.1"])
    assert (args.output_dir, args.alpha, args.tasks, args.flag) == ("from_yaml", 0.1, ["x", "y"], True)
    (args,) = parse_recipe_args((_Args,), ["r1", "r2", "--output-dir", "o"], positional="runs")
    assert args.runs == ["r1", "r2"] and args.output_dir == "o"


def test_unknown_yaml_keys_are_rejected_with_the_valid_ones(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("output_dir: o\nalpah: 0.3\n")
    with pytest.raises(ValueError) as err:
        parse_recipe_args((_Args,), ["--config", str(cfg)])
    message = str(err.value)
    assert "['alpah']" in message and "did you mean 'alpha'" in message and "Valid options: alpha, flag" in message
    with pytest.raises(SystemExit):  # a required field missing everywhere
        parse_recipe_args((_Args,), ["--runs", "x"], required=("runs",))
    with pytest.raises(SystemExit):
        parse_recipe_args((_Args,), ["--output_dir", "o"], required=("runs",))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_glue_finetune_rejects_unknown_yaml_keys_like_the_vision_one(tmp_path):
    from saft_hf.glue.finetune import parse_glue_arguments
    from saft_hf.vision.finetune import parse_vision_arguments

    bad = tmp_path / "bad.yaml"
    bad.write_text("task: sst2\nlearning_rat: 0.1\n")
    for parse in (parse_glue_arguments, parse_vision_arguments):
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rat'\].*learning_rate"):
            parse(["--config", str(bad), "--output_dir", str(tmp_path / "o")])


def test_merge_scripts_use_the_recipe_parser(tmp_path):
    glue = _load(RECIPES / "flan_t5_glue" / "merge_search.py")
    cfg = tmp_path / "m.yaml"
    cfg.write_text("finetuned_root: runs\noutput: merged\nalphas: [0.3, 0.5]\nmethod: ties\n")
    args = glue.parse_args(["--config", str(cfg), "--method", "task_arithmetic", "--tasks", "rte"])
    assert (args.finetuned_root, args.output, args.alphas, args.method, args.tasks) == \
        ("runs", "merged", [0.3, 0.5], "task_arithmetic", ["rte"])
    cfg.write_text("finetuned_root: runs\noutput: merged\nalpha: [0.3]\n")
    with pytest.raises(ValueError, match=r"\['alpha'\].*did you mean 'alphas'"):
        glue.parse_args(["--config", str(cfg)])
    vision = _load(RECIPES / "clip_vision" / "merge_and_evaluate.py")
    cfg.write_text("output_dir: rep\nfixed_scalin: 0.4\n")
    with pytest.raises(ValueError, match=r"\['fixed_scalin'\]"):
        vision.main(["run1", "--config", str(cfg)])
