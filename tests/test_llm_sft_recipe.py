"""recipes/llm_sft: SFT two tiny tasks with SAFTSFTTrainer, merge with saft-hf merge, evaluate the loss."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is not installed: pip install 'saft-hf[trl]' to run the LLM SFT recipe")

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "llm_sft"


def _env(tmp_path, **extra):
    env = {**os.environ, "OUT": str(tmp_path / "runs"), "PYTHON": sys.executable,
           "SAFT_HF": f"{sys.executable} -m saft_hf.cli", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_task_loader_and_config_parsing(tmp_path):
    sys.path.insert(0, str(RECIPE))
    try:
        from tasks import TaskArguments, load_eval, load_train, parse_with_config
    finally:
        sys.path.remove(str(RECIPE))
    (task,) = parse_with_config((TaskArguments,), ["--config", str(RECIPE / "configs" / "tiny_reverse.yaml"),
                                                   "--synthetic_size", "32"], ignore_unknown_config_keys=True)
    train, test = load_train(task), load_eval(task)
    assert len(train) == 32 and len(test) == 32
    row = train[0]
    words = row["prompt"].split()[2:-1]
    assert row["prompt"].startswith("reverse :") and row["completion"].split() == words[::-1]
    assert train["prompt"] != test["prompt"]  # the splits are drawn with different seeds
    # a local JSONL file with its own column names; evaluation rows are held out when both use one split
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(10)))
    task = TaskArguments(dataset_name=str(path), prompt_column="q", completion_column="a", eval_split="train",
                         max_eval_samples=3)
    assert load_eval(task)["prompt"] == ["q0", "q1", "q2"]
    assert load_train(task)["prompt"] == [f"q{i}" for i in range(3, 10)]
    with pytest.raises(ValueError, match="prompt_column"):
        load_eval(TaskArguments(dataset_name=str(path), eval_split="train"))


@pytest.mark.slow
def test_run_all_tiny_end_to_end(tmp_path):
    proc = subprocess.run(["bash", str(RECIPE / "run_all.sh"), "--tiny"], env=_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "runs"
    summary = json.loads((runs / "summary.json").read_text())
    assert set(summary) == {"pretrained", "sft_tiny_copy", "sft_tiny_reverse", "merged"}
    base, merged = summary["pretrained"], summary["merged"]
    for task in ("copy", "reverse"):
        # each fine-tuned model is best on its own task; the merge improves on the base on both
        assert summary[f"sft_tiny_{task}"][task] < base[task] - 0.5
        assert merged[task] < base[task] - 0.2
    logs = json.loads((runs / "sft" / "tiny_copy" / "train_results.json").read_text())
    assert logs["task"] == "copy"
    assert (runs / "merged" / "tokenizer.json").exists() or (runs / "merged" / "tokenizer_config.json").exists()
