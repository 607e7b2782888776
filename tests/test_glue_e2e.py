"""End to end on a tiny T5 and tiny GLUE-shaped data, 2 tasks (sst2, mrpc):
fine-tune (AdamW, ASAM, ASAM + LoRA) with SAFTSeq2SeqTrainer through the recipe's YAML configs ->
merge with saft_hf.merging (tied T5 embeddings) -> evaluate (CLI, JSON + Markdown, normalized) and
the coefficient search driven by the GLUE evaluator."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saft_hf.glue.finetune import parse_glue_arguments, run_glue_finetuning
from saft_hf.testing.glue import tiny_t5, tiny_tokenizer, write_tiny_glue

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "flan_t5_glue" / "configs"
TASKS = ("sst2", "mrpc")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    tok = tiny_tokenizer()
    model = tiny_t5(tok, d_model=32)
    model.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    write_tiny_glue(root / "data", TASKS)
    return root


def finetune(root: Path, config: str, task: str, run: str, *extra: str) -> dict:
    argv = ["--config", str(CONFIGS / config), "--task", task, "--model_name_or_path", str(root / "base"),
            "--data_path", str(root / "data" / task), "--output_dir", str(root / run / task),
            "--max_steps", "40", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16",
            "--per_device_eval_batch_size", "32", "--logging_steps", "20", "--use_cpu", "true", *extra]
    return run_glue_finetuning(*parse_glue_arguments(argv))


@pytest.fixture(scope="module")
def full_runs(workspace):
    """AdamW ("sgd") and ASAM full fine-tuning of both tasks, with the recipe's own configs."""
    out = {}
    for run, config in (("sgd", "sgd.yaml"), ("asam", "asam.yaml")):
        for task in TASKS:
            out[(run, task)] = finetune(workspace, config, task, run)
    return out


def test_finetuning_learns_and_writes_scores(workspace, full_runs):
    for (run, task), result in full_runs.items():
        scores = json.loads((workspace / run / task / "glue_scores.json").read_text())
        assert scores["task"] == task and scores["score"] == result["validation"]["score"]
        assert scores["sam_rho"] == (0.5 if run == "asam" else 0.0)
        # the tiny tasks are easy; the random init is at 0 (it generates no label word at all)
        assert scores["score"] >= 0.75, (run, task, scores)
        assert (workspace / run / task / "model.safetensors").exists()
        assert (workspace / run / task / "tokenizer.json").exists()
        assert result["train"]["train_loss"] < 5


def test_merge_keeps_t5_embeddings_tied_and_generates(workspace, full_runs):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from saft_hf.merging import merge_models, open_source

    out = workspace / "merged_ta"
    report = merge_models({"pretrained": str(workspace / "base"), "method": "task_arithmetic",
                           "models": [str(workspace / "asam" / t) for t in TASKS], "params": {"scaling": 0.5}},
                          out, progress=False)
    assert report["merged_tensors"] > 0
    base = open_source(str(workspace / "base"))
    fts = [open_source(str(workspace / "asam" / t)) for t in TASKS]
    merged_src = open_source(str(out))
    expected = base.get("shared.weight") + 0.5 * sum(f.get("shared.weight") - base.get("shared.weight") for f in fts)
    assert torch.allclose(merged_src.get("shared.weight"), expected, atol=1e-6)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(out))
    # tied: one tensor under every name, holding the merged values
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    assert model.decoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    assert torch.allclose(model.shared.weight, expected, atol=1e-6)
    tok = AutoTokenizer.from_pretrained(str(out))  # the merge copies the base's tokenizer files
    batch = tok(["What is the sentiment of this movie review? Answer positive or negative.\nReview: the plot was great"],
                return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 1 and generated.shape[1] >= 2


def test_evaluate_cli_writes_absolute_and_normalized(workspace, full_runs):
    from saft_hf.cli import main
    from saft_hf.merging import merge_models

    merged = workspace / "merged_eval"
    merge_models({"pretrained": str(workspace / "base"), "method": "task_arithmetic",
                  "models": [str(workspace / "asam" / t) for t in TASKS], "params": {"scaling": 1.0}},
                 merged, progress=False)
    out = workspace / "eval"
    code = main(["evaluate", "glue", "--model", str(merged), "--tasks", *TASKS, "--data_root", str(workspace / "data"),
                 "--finetuned_root", str(workspace / "asam"), "--output_dir", str(out), "--batch_size", "16",
                 "--name", "asam task arithmetic", "--device", "cpu"])
    assert code == 0
    report = json.loads((out / "glue_eval.json").read_text())
    assert report["tasks"] == list(TASKS)
    for t in TASKS:
        ft = json.loads((workspace / "asam" / t / "glue_scores.json").read_text())["score"]
        assert report["finetuned"][t] == ft
        assert report["normalized"][t] == pytest.approx(report["absolute"][t] / ft)
        assert report["absolute"][t] == report["metrics"][t]["accuracy"]
        assert 0.0 <= report["metrics"][t]["unparseable_rate"] <= 1.0
    assert "f1" in report["metrics"]["mrpc"]
    md = (out / "glue_eval.md").read_text()
    assert "| asam task arithmetic |" in md and "avg norm" in md
    # evaluating a fine-tuned model on its own task reproduces the score the recipe stored
    own = workspace / "eval_own"
    assert main(["evaluate", "glue", "--model", str(workspace / "sgd" / "sst2"), "--tasks", "sst2",
                 "--data", f"sst2={workspace / 'data' / 'sst2'}", "--output_dir", str(own), "--device", "cpu"]) == 0
    own_report = json.loads((own / "glue_eval.json").read_text())
    stored = json.loads((workspace / "sgd" / "sst2" / "glue_scores.json").read_text())
    assert own_report["absolute"]["sst2"] == stored["score"] and "normalized" not in own_report


def test_glue_evaluator_drives_coefficient_search(workspace, full_runs):
    from saft_hf.glue.predict import make_glue_evaluator
    from saft_hf.glue.search import search_glue_merge
    from saft_hf.merging import open_source

    data = {t: str(workspace / "data" / t) for t in TASKS}
    evaluator = make_glue_evaluator(TASKS, str(workspace / "base"), data_paths=data, batch_size=32)
    base_scores = evaluator(None)
    ft_state = {k: v for k, v in ((k, open_source(str(workspace / "sgd" / "sst2")).get(k))
                                  for k in open_source(str(workspace / "sgd" / "sst2")).keys())}
    stored = json.loads((workspace / "sgd" / "sst2" / "glue_scores.json").read_text())["score"]
    assert evaluator(ft_state)["sst2"] == stored  # in-place loading == the fine-tuned model
    base_state = {k: open_source(str(workspace / "base")).get(k) for k in open_source(str(workspace / "base")).keys()}
    assert evaluator(base_state) == base_scores  # and back: nothing leaks between calls

    finetuned = {t: str(workspace / "sgd" / t) for t in TASKS}
    ft_scores = {t: json.loads((workspace / "sgd" / t / "glue_scores.json").read_text())["score"] for t in TASKS}
    out = workspace / "searched"
    result = search_glue_merge(workspace / "base", finetuned, out, grid={"scaling": [0.1, 1.0]},
                               finetuned_scores=ft_scores, data_paths=data, batch_size=32, device="cpu")
    points = result["search"]["points"]
    assert [p["params"]["scaling"] for p in points] == [0.1, 1.0]
    best = max(points, key=lambda p: p["score"])
    assert result["best_params"] == best["params"]
    assert (out / "search.json").exists() and (out / "merge_config.yaml").exists()
    # the saved merge is the best grid point: re-evaluating it gives the searched scores
    saved = make_glue_evaluator(TASKS, str(out), data_paths=data, batch_size=32)(None)
    assert saved == pytest.approx(best["absolute"])


def test_lora_finetune_merge_evaluate(workspace):
    from saft_hf.cli import main
    from saft_hf.merging import merge_models

    for task in TASKS:
        result = finetune(workspace, "asam_lora.yaml", task, "lora", "--lora_r", "4",
                          "--lora_target_modules", "q", "v", "o", "wi_0", "wo", "--learning_rate", "1e-2")
        run_dir = workspace / "lora" / task
        assert (run_dir / "adapter_config.json").exists() and (run_dir / "adapter_model.safetensors").exists()
        assert not (run_dir / "model.safetensors").exists()
        assert json.loads((run_dir / "glue_scores.json").read_text())["lora_r"] == 4
        assert result["validation"]["unparseable_rate"] < 1.0  # it learned the label words at least
    merged = workspace / "lora_merged"
    merge_models({"pretrained": str(workspace / "base"), "method": "task_arithmetic",
                  "models": [str(workspace / "lora" / t) for t in TASKS], "params": {"scaling": 1.0}},
                 merged, progress=False)
    out = workspace / "lora_eval"
    assert main(["evaluate", "glue", "--model", str(merged), "--tasks", *TASKS, "--data_root", str(workspace / "data"),
                 "--output_dir", str(out), "--device", "cpu"]) == 0
    assert set(json.loads((out / "glue_eval.json").read_text())["absolute"]) == set(TASKS)
    # an adapter dir is evaluated on its base model, merged in (peft merge_and_unload)
    own = workspace / "lora_own"
    assert main(["evaluate", "glue", "--model", str(workspace / "lora" / "sst2"), "--tasks", "sst2",
                 "--data_root", str(workspace / "data"), "--output_dir", str(own), "--device", "cpu"]) == 0
    stored = json.loads((workspace / "lora" / "sst2" / "glue_scores.json").read_text())["score"]
    assert json.loads((own / "glue_eval.json").read_text())["absolute"]["sst2"] == pytest.approx(stored)


@pytest.mark.slow
def test_run_all_script_end_to_end(tmp_path):
    """recipes/flan_t5_glue/run_all.sh on tiny data: accelerate launch fine-tuning (SGD + ASAM), merge, evaluate."""
    tok = tiny_tokenizer()
    tiny_t5(tok).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    write_tiny_glue(tmp_path / "data", TASKS)
    env = {**os.environ, "MODEL": str(tmp_path / "base"), "DATA_ROOT": str(tmp_path / "data"), "TASKS": " ".join(TASKS),
           "OUT": str(tmp_path / "runs"), "EXTRA_ARGS": "--max_steps 40 --learning_rate 3e-3 --use_cpu true",
           "LAUNCH": f"{sys.executable} -m accelerate.commands.launch --num_processes 1 --cpu",
           "SAFT_HF": f"{sys.executable} -m saft_hf.cli", "PYTHON": sys.executable, "SEARCH_ARGS": "--alphas 0.5 1.0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "recipes" / "flan_t5_glue" / "run_all.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("sgd", "asam"):
        report = json.loads((tmp_path / "runs" / f"eval_merged_{run}" / "glue_eval.json").read_text())
        assert set(report["normalized"]) == set(TASKS)
    summary = (tmp_path / "runs" / "summary.md").read_text()
    assert "sgd" in summary and "asam" in summary


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["ddp_lora", "zero2_full"])
def test_recipe_under_torchrun_two_processes(tmp_path, mode):
    """finetune.py with 2 CPU processes (gloo): DDP + LoRA, DeepSpeed ZeRO-2 + full; rank 0 saves and scores."""
    import shutil

    from conftest import find_free_port

    if mode.startswith("zero") and shutil.which("gcc") is None and shutil.which("c++") is None:
        pytest.skip("DeepSpeed on CPU JIT-compiles a small op and needs a C++ compiler")
    tok = tiny_tokenizer()
    tiny_t5(tok).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    write_tiny_glue(tmp_path / "data", ["sst2"])
    config, extra = "asam.yaml", []
    if mode == "ddp_lora":
        config, extra = "asam_lora.yaml", ["--lora_r", "4", "--learning_rate", "1e-2"]
    else:
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                  "zero_allow_untested_optimizer": True}))
        extra = ["--deepspeed", str(ds), "--learning_rate", "3e-3"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
        str(REPO / "recipes" / "flan_t5_glue" / "finetune.py"), "--config", str(CONFIGS / config), "--task", "sst2",
        "--model_name_or_path", str(tmp_path / "base"), "--data_path", str(tmp_path / "data" / "sst2"),
        "--output_dir", str(tmp_path / "run"), "--max_steps", "10", "--per_device_train_batch_size", "8",
        "--use_cpu", "true", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    scores = json.loads((tmp_path / "run" / "glue_scores.json").read_text())
    assert scores["task"] == "sst2" and scores["metrics"]["num_examples"] == 32
    weights = "adapter_model.safetensors" if mode == "ddp_lora" else "model.safetensors"
    assert (tmp_path / "run" / weights).exists()
