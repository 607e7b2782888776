"""`saft-hf evaluate`, `analyze` and `demo` on a read-only and on a full filesystem (issue 11): one
`saft-hf <command>: error:` line naming the location and the fix, nothing created on the read-only
one (refused before any work), nothing left on the full one (the space is given back), inputs
unchanged. Needs root (it mounts small tmpfs filesystems); skipped otherwise."""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from _hostile import Tmpfs, error_lines, fill, leftover_entries, snapshot, tiny_bert, toy_tasks
from saft_hf.cli import main

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture
def tmpfs(tmp_path):
    fs = Tmpfs(tmp_path / "mnt", pytest.skip)
    (tmp_path / "mnt").mkdir()
    yield fs
    fs.close()


@pytest.fixture
def ws(tmp_path, monkeypatch):
    import json

    import torch
    from transformers import BertModel

    from saft_hf.demo import study
    from saft_hf.testing.vision import build_tiny_clip, build_tiny_dataset

    ws = tmp_path / "ws"
    build_tiny_clip(ws / "clip")
    build_tiny_dataset("dtd", ws / "data" / "dtd", train_per_class=2, test_per_class=2)
    tiny_bert(ws / "bert")
    for k, task in enumerate(("polarity", "uncertainty")):
        torch.manual_seed(10 + k)
        ft = BertModel.from_pretrained(ws / "bert")
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ft.save_pretrained(ws / "ckpts" / task)
        (ws / "ckpts" / task / "saft_demo_training.json").write_text(
            json.dumps({"signature": {"logit_scale": 10.0, "max_length": 16}}))
    original = study.prepare_tasks

    def toy_data(cfg, cache_dir):  # no data fetch: two toy tasks
        cfg.task_data_override = toy_tasks()
        return original(cfg, cache_dir)

    monkeypatch.setattr(study, "prepare_tasks", toy_data)
    return ws


def commands(ws, out, cache=None):
    """(command, argv) of each command writing to `out` (and the demo's cache to `cache`)."""
    return [
        ("evaluate", ["evaluate", "vision", "--model", str(ws / "clip"), "--tasks", "dtd", "--base-model",
                      str(ws / "clip"), "--data", f"dtd={ws / 'data/dtd'}", "--head-cache-dir", str(ws / "heads"),
                      "--max-samples", "4", "--device", "cpu", "--output-dir", str(out)]),
        ("analyze", ["analyze", "--pretrained", str(ws / "bert"), "--method", "adamw",
                     f"polarity={ws / 'ckpts/polarity'}", f"uncertainty={ws / 'ckpts/uncertainty'}",
                     "--output", str(out), "--cache-dir", str(ws / "democache"), "--subset-size", "8",
                     "--grid-size", "3", "--analyses", "disentanglement", "--no-progress"]),
        ("demo", ["demo", "--model", str(ws / "bert"), "--output", str(out), "--cache-dir",
                  str(cache or ws / "democache"), "--tasks", "polarity", "uncertainty", "--steps", "1",
                  "--methods", "adamw", "--max-length", "8", "--no-analysis"]),
    ]


def _one_line(capsys, command):
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = error_lines(err, command)
    assert len(lines) == 1, err
    return lines[0]


def test_read_only_and_full_filesystem(ws, tmpfs, capsys):
    # read-only: refused before any work, nothing created
    ro = tmpfs.mount("size=1m,ro")
    before = snapshot(ws)
    for command, argv in commands(ws, ro / "deeper" / "out") + [commands(ws, ws / "report", ro / "cache")[2]]:
        assert main(argv) == 1, command
        line = _one_line(capsys, command)
        assert "read-only filesystem" in line and str(ro) in line, line
        assert os.listdir(ro) == []
    # ...and the inputs are as they were (the vision head cache / demo data cache are outputs too)
    assert {k: v for k, v in snapshot(ws).items() if not k.startswith(("heads", "democache"))} == \
        {k: v for k, v in before.items() if not k.startswith(("heads", "democache"))}

    # full: the command fails while writing, one line, the space is given back
    full = tmpfs.mount("size=1m")
    filler = fill(full, leave=0)
    filler_hash = hashlib.sha256(filler.read_bytes()).hexdigest()
    free_before = shutil.disk_usage(full).free
    runs = commands(ws, full / "out") + [commands(ws, ws / "report2", full / "cache")[2]]
    for command, argv in runs:
        inputs = snapshot(ws / "clip"), snapshot(ws / "bert"), snapshot(ws / "ckpts")
        assert main(argv) == 1, command
        line = _one_line(capsys, command)
        assert "no space left on device" in line and "free some space" in line, (command, line)
        assert os.listdir(full) == ["user-data.bin"], (command, os.listdir(full))
        assert shutil.disk_usage(full).free == free_before
        assert (snapshot(ws / "clip"), snapshot(ws / "bert"), snapshot(ws / "ckpts")) == inputs
    assert hashlib.sha256(filler.read_bytes()).hexdigest() == filler_hash
    assert not (ws / "report2").exists()  # the demo failed before its report: none written
    assert leftover_entries(ws) == []
