"""Hostile input for `saft-hf evaluate vision` and `saft-hf evaluate glue` (issue 11, items 13, 14):
each case gives its exit code and one `saft-hf evaluate FAMILY: error:` line naming the input and the
fix; after every case the inputs are unchanged and nothing is left behind. Every case fails in
the checks made before the evaluation runs."""
from __future__ import annotations

import json
import shutil

import pytest

from _hostile import Case, run_case, tiny_bert, tiny_t5_dir, tiny_vit
from saft_hf.cli import main

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from saft_hf.testing.glue import write_tiny_glue
    from saft_hf.testing.vision import build_tiny_clip, build_tiny_dataset

    root = tmp_path_factory.mktemp("hostile_evaluate")
    build_tiny_clip(root / "clip")
    build_tiny_dataset("dtd", root / "data" / "dtd", train_per_class=2, test_per_class=2)
    tiny_bert(root / "bert")
    tiny_vit(root / "vit")
    tiny_t5_dir(root / "t5")
    write_tiny_glue(root / "glue", ("sst2",))
    (root / "ft.json").write_text(json.dumps({"dtd": 0.9}))
    return root


@pytest.fixture
def ws(template, tmp_path):
    shutil.copytree(template, tmp_path / "ws", symlinks=True)
    return tmp_path / "ws"


def vision(ws, model="clip", *extra, data=True, out="out"):
    m = str(ws / model) if not model.startswith(("org/", "./")) else model
    argv = ["vision", "--model", m, "--tasks", "dtd", "--base-model", str(ws / "clip"), "--output-dir", str(ws / out),
            "--head-cache-dir", str(ws / "heads"), "--max-samples", "4", "--device", "cpu"]
    return argv + (["--data", f"dtd={ws / 'data/dtd'}"] if data else []) + list(extra)


def glue(ws, model="t5", *extra, out="out"):
    m = str(ws / model) if not model.startswith(("org/", "./")) else model
    return ["glue", "--model", m, "--tasks", "sst2", "--output_dir", str(ws / out), "--max_samples", "4",
            "--data", f"sst2={ws / 'glue/sst2'}", "--device", "cpu", *extra]


def _file_at(ws, name, text="user data\n"):
    (ws / name).write_text(text)
    return ws / name


def _replace(argv, flag, value):
    argv = list(argv)
    i = argv.index(flag)
    argv[i + 1] = value
    return argv


CASES = [
    # vision (13): missing model, wrong architecture, missing data, unknown task, missing score file
    Case("vision-model-missing", lambda ws: vision(ws, "./runs/merged"), 1, "--model path ./runs/merged does not exist"),
    Case("vision-model-missing-absolute", lambda ws: vision(ws, "gone/merged"), 1, "does not exist"),
    Case("vision-model-hub-offline", lambda ws: vision(ws, "org/not-cached"), 1, "neither a local path nor a cached"),
    Case("vision-model-bert", lambda ws: vision(ws, "bert"), 1, "is a 'bert' checkpoint; the vision family needs a CLIP"),
    Case("vision-model-vit", lambda ws: vision(ws, "vit"), 1, "is a 'vit' checkpoint"),
    Case("vision-base-model-bert", lambda ws: _replace(vision(ws), "--base-model", str(ws / "bert")), 1,
         "--base-model"),
    Case("vision-data-missing", lambda ws: _replace(vision(ws), "--data", f"dtd={ws / 'nodata'}"), 1,
         "dataset of task 'dtd' path", check=lambda ws, line: "Hub dataset" in line or pytest.fail(line)),
    Case("vision-data-hub-offline", lambda ws: vision(ws, data=False), 1, "pass a local copy with --data dtd=PATH"),
    Case("vision-data-bad-form", lambda ws: _replace(vision(ws), "--data", "dtd"), 1, "--data expects TASK=PATH"),
    Case("vision-unknown-task", lambda ws: _replace(vision(ws), "--tasks", "dtdd"), 1, "unknown vision task 'dtdd'"),
    Case("vision-score-file-missing", lambda ws: vision(ws, "clip", "--finetuned-accuracy", str(ws / "nope.json")), 1,
         "fine-tuned accuracy file"),
    Case("vision-score-file-corrupt",
         lambda ws: vision(ws, "clip", "--finetuned-accuracy", str(_file_at(ws, "bad.json", "{oops"))), 1,
         "is not valid JSON"),
    Case("vision-no-model", lambda ws: vision(ws)[:1] + vision(ws)[3:], 1, "give --model"),
    Case("vision-output-is-a-file", lambda ws: vision(ws, out=_file_at(ws, "report").name), 1,
         "is a file, not a directory", output="report"),
    Case("vision-output-inside-model", lambda ws: vision(ws, out="clip/eval"), 1, "lies inside the input",
         output="clip/eval"),
    Case("vision-merge-study-no-output", lambda ws: ["vision", "--merge-study", str(ws / "clip")], 1,
         "give --output-dir"),
    Case("vision-merge-study-run-missing",
         lambda ws: ["vision", "--merge-study", str(ws / "runs/dtd"), "--output-dir", str(ws / "out")], 1,
         "--merge-study run directory path"),
    # glue: the same review
    Case("glue-model-missing", lambda ws: glue(ws, "./runs/merged"), 1, "--model path ./runs/merged does not exist"),
    Case("glue-model-hub-offline", lambda ws: glue(ws, "org/not-cached"), 1, "neither a local path nor a cached"),
    Case("glue-tokenizer-missing", lambda ws: glue(ws, "t5", "--tokenizer", str(ws / "tok")), 1,
         "--tokenizer path"),
    Case("glue-data-missing", lambda ws: _replace(glue(ws), "--data", f"sst2={ws / 'nodata'}"), 1, "nodata"),
    Case("glue-finetuned-missing", lambda ws: glue(ws, "t5", "--finetuned", f"sst2={ws / 'noscores'}"), 1,
         "noscores"),
    Case("glue-output-is-a-file", lambda ws: glue(ws, out=_file_at(ws, "report").name), 1,
         "is a file, not a directory", output="report"),
    Case("glue-model-bert", lambda ws: glue(ws, "bert"), 1, "is a 'bert' checkpoint; GLUE evaluation needs a seq2seq"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_evaluate_input(case, ws, capsys):
    family = case.id.split("-")[0]
    line = run_case(case, ws, ["evaluate"], capsys, main)
    assert line.startswith(f"saft-hf evaluate {family}: error: "), line
