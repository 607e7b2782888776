"""Hostile input for `saft-hf analyze` (issue 11, items 9, 14, 16): each case gives its exit code
and one `saft-hf analyze: error:` line naming the input and the fix; after every case the inputs
are unchanged and nothing is left behind (no output directory, no .tmp/.old/.lock entries)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from _hostile import Case, run_case, tiny_bert, tiny_t5_dir, tiny_vit, toy_tasks
from saft_hf.cli import main

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """base (tiny BERT + WordPiece vocab), ckpts/adamw-seed0/{polarity,uncertainty}, vit, t5."""
    import torch
    from transformers import BertModel

    root = tmp_path_factory.mktemp("hostile_analyze")
    tiny_bert(root / "base")
    for k, task in enumerate(("polarity", "uncertainty")):
        torch.manual_seed(10 + k)
        ft = BertModel.from_pretrained(root / "base")
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = root / "ckpts" / "adamw-seed0" / task
        ft.save_pretrained(d)
        (d / "saft_demo_training.json").write_text(json.dumps({"signature": {"logit_scale": 10.0, "max_length": 16}}))
    tiny_vit(root / "vit")
    tiny_t5_dir(root / "t5")
    return root


@pytest.fixture
def ws(template, tmp_path, monkeypatch):
    from saft_hf.demo import study

    shutil.copytree(template, tmp_path / "ws", symlinks=True)
    original = study.prepare_tasks

    def toy_data(cfg, cache_dir):  # the real loaders would fetch public data sets
        cfg.task_data_override = toy_tasks()
        return original(cfg, cache_dir)

    monkeypatch.setattr(study, "prepare_tasks", toy_data)
    return tmp_path / "ws"


def _args(ws, pretrained="base", out="out", ckpts=None, *extra):
    pairs = ckpts or [f"polarity={ws / 'ckpts/adamw-seed0/polarity'}",
                      f"uncertainty={ws / 'ckpts/adamw-seed0/uncertainty'}"]
    pre = str(ws / pretrained) if not pretrained.startswith(("org/", "./")) else pretrained
    return ["--pretrained", pre, "--method", "adamw", *pairs, "--output", str(ws / out),
            "--cache-dir", str(ws / "cache"), "--subset-size", "8", "--grid-size", "3",
            "--analyses", "disentanglement", "--no-progress", *extra]


def _truncated(ws, drop=8):
    """The polarity checkpoint with `drop` of its tensors removed (a partial / truncated save)."""
    f = ws / "ckpts/adamw-seed0/polarity/model.safetensors"
    sd = load_file(str(f))
    keep = dict(sorted(sd.items())[drop:])
    save_file(keep, str(f), metadata={"format": "pt"})
    return _args(ws)


def _no_tokenizer(ws):
    for name in os.listdir(ws / "base"):
        if name not in ("config.json", "model.safetensors"):
            os.remove(ws / "base" / name)
    return _args(ws)


def _file_at(ws, name):
    (ws / name).write_text("user data\n")
    return name


def _check_missing_count(ws, line):
    assert "is missing 8 of the pretrained model's" in line and "polarity" in line, line
    assert line.count("'") >= 6  # the first few keys are named


CASES = [
    # 9. a checkpoint missing tensors is refused, naming it, the count and the first keys
    Case("checkpoint-missing-tensors", _truncated, 1, "ckpts/adamw-seed0/polarity", check=_check_missing_count),
    # 14. paths that do not exist, said so (not "Repo id must be in the form ...")
    Case("pretrained-missing-relative", lambda ws: _args(ws, pretrained="./no/such/base"), 1,
         "--pretrained path ./no/such/base does not exist"),
    Case("pretrained-missing-absolute", lambda ws: _args(ws, pretrained="nowhere/at/all"), 1, "does not exist"),
    Case("checkpoint-missing", lambda ws: _args(ws, ckpts=[f"polarity={ws / 'gone'}", f"uncertainty={ws / 'gone2'}"]),
         1, "checkpoint of task 'polarity' path"),
    Case("hub-name-offline", lambda ws: _args(ws, pretrained="org/not-cached-model"), 1,
         "neither a local path nor a cached Hub model"),
    # 16. the wrong architecture for the demo family, said up front
    Case("vit-for-demo-family", lambda ws: _args(ws, pretrained="vit"), 1, "'vit' checkpoint"),
    Case("t5-for-demo-family", lambda ws: _args(ws, pretrained="t5"), 1, "encoder-decoder"),
    Case("pretrained-without-tokenizer", _no_tokenizer, 1, "has no tokenizer files"),
    # outputs that cannot be written, refused before any work
    Case("output-is-a-file", lambda ws: _args(ws, out=_file_at(ws, "afile")), 1, "is a file, not a directory",
         output="afile"),
    Case("output-inside-pretrained", lambda ws: _args(ws, out="base/diag"), 1, "lies inside the input",
         output="base/diag"),
    Case("output-parent-is-a-file", lambda ws: _args(ws, out=_file_at(ws, "f") + "/sub"), 1,
         "is a file, not a directory", output="f/sub"),
    # usage errors keep argparse's exit code 2
    Case("no-checkpoints", lambda ws: ["--pretrained", str(ws / "base"), "--output", str(ws / "out")], 2,
         "no fine-tuned checkpoints"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_analyze_input(case, ws, capsys):
    run_case(case, ws, ["analyze"], capsys, main)


def test_unexpected_error_is_one_line_with_debug_hint(ws, capsys, monkeypatch):
    from saft_hf.analysis import run as analysis_run

    def boom(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(analysis_run, "run_all", boom)
    monkeypatch.delenv("SAFT_HF_DEBUG", raising=False)
    case = Case("bug", lambda ws: _args(ws), 1, "unexpected AttributeError")
    line = run_case(case, ws, ["analyze"], capsys, main)
    assert "SAFT_HF_DEBUG=1" in line
    monkeypatch.setenv("SAFT_HF_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["analyze", *_args(ws)])
