"""`saft-hf demo` command line: arguments, --quick preset and overrides (no study run)."""
from __future__ import annotations

import argparse

import pytest

from saft_hf.demo import cli
from saft_hf.demo.study import QUICK_OVERRIDES, StudyConfig


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_match_study_config():
    cfg = cli.config_from_args(_parse([]))
    default = StudyConfig()
    assert cfg.train_steps == default.train_steps and cfg.max_test == default.max_test
    assert cfg.methods == ("adamw", "asam") and cfg.seeds == (0,)
    assert cfg.output_dir == "saft_demo_report" and cfg.logit_scale is None
    # the regime chosen by docs/demo-study.md's search, and the default merge rows
    assert (cfg.tasks, cfg.train_steps, cfg.learning_rate) == (default.tasks, 80, 5e-4) and len(cfg.tasks) == 6
    assert cfg.merges == default.merges == ("weighted_average", "task_arithmetic", "ties", "tsv_merging", "iso_c")
    assert cli.config_from_args(_parse(["--merges", "study"])).merges == ("study",)


def test_quick_preset_and_explicit_overrides():
    cfg = cli.config_from_args(_parse(["--quick", "--seeds", "0", "1", "--tasks", "polarity", "spam"]))
    for key, value in QUICK_OVERRIDES.items():
        assert getattr(cfg, key) == value
    assert cfg.seeds == (0, 1) and cfg.tasks == ("polarity", "spam")
    cfg = cli.config_from_args(_parse(["--quick", "--steps", "7", "--max-test", "20", "--logit-scale", "30"]))
    assert (cfg.train_steps, cfg.max_test, cfg.logit_scale) == (7, 20, 30.0)


def test_diagnostics_on_by_default_off_when_quick_or_asked():
    assert cli.config_from_args(_parse([])).analysis is False  # opt-in since the demo runs every merge method
    assert cli.config_from_args(_parse(["--analysis"])).analysis is True
    assert cli.config_from_args(_parse(["--quick"])).analysis is False
    assert cli.config_from_args(_parse(["--no-analysis"])).analysis is False
    assert cli.config_from_args(_parse(["--quick", "--analysis"])).analysis is True


def test_unknown_task_is_rejected():
    with pytest.raises(SystemExit):
        _parse(["--tasks", "imdb"])


def test_dispatcher_help(capsys):
    from saft_hf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize("value,fragment", [
    ("looksam", "write METHOD=RHO with METHOD one of"), ("nope=0.1", "write METHOD=RHO with METHOD one of"),
    ("adamw=0.1", "write METHOD=RHO with METHOD one of"), ("looksam=nan", "RHO must be a finite number > 0"),
    ("looksam=inf", "RHO must be a finite number > 0"), ("looksam=-1", "RHO must be a finite number > 0"),
    ("looksam=0", "RHO must be a finite number > 0"), ("looksam=abc", "RHO must be a finite number > 0"),
])
def test_bad_sam_rho_is_a_usage_error_naming_the_item(value, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--sam-rho", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --sam-rho: {value!r}: {fragment}" in err, err
