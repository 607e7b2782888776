"""The CLIP vision recipe's YAML configs carry the paper's hyper-parameters; the command line overrides them."""
from pathlib import Path

import pytest
import yaml

from saft_hf.tasks.vision import PAPER_TASKS
from saft_hf.vision.finetune import parse_vision_arguments

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "clip_vision" / "configs"


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_task_config_has_the_papers_recipe(task, tmp_path):
    model_args, data_args, args = parse_vision_arguments(
        ["--config", str(CONFIGS / f"{task}.yaml"), "--output_dir", str(tmp_path)])
    assert data_args.task == task
    assert model_args.model_name_or_path == "openai/clip-vit-base-patch32" and model_args.finetuning_mode == "full"
    assert (args.learning_rate, args.weight_decay, args.per_device_train_batch_size) == (1e-5, 0.1, 128)
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 500 and args.max_grad_norm == 1.0
    assert args.max_steps == 8000 and args.optim == "adamw_torch"
    assert args.sam_rho == 0.5 and args.sam_variant == "asam"
    assert args.load_best_model_at_end and args.metric_for_best_model == "accuracy" and args.greater_is_better
    assert args.remove_unused_columns is False
    assert (data_args.validation_fraction, data_args.validation_max, data_args.split_seed) == (0.1, 5000, 0)
    assert yaml.safe_load((CONFIGS / f"{task}.yaml").read_text()).keys() == \
        yaml.safe_load((CONFIGS / "common.yaml").read_text()).keys() | {"task"}


def test_command_line_overrides_the_yaml(tmp_path):
    model_args, data_args, args = parse_vision_arguments(
        ["--config", str(CONFIGS / "gtsrb.yaml"), "--sam_rho", "0", "--finetuning_mode", "ftts",
         "--task", "svhn", "--output_dir", str(tmp_path), "--max_steps", "10"])
    assert args.sam_rho == 0 and args.max_steps == 10 and args.learning_rate == 1e-5
    assert model_args.finetuning_mode == "ftts" and data_args.task == "svhn"


def test_bad_configs_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: dtd\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rat'\]"):
        parse_vision_arguments(["--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_vision_arguments(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):  # no task anywhere
        parse_vision_arguments(["--output_dir", str(tmp_path)])
