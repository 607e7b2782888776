"""CLIP vision end to end, offline: tiny CLIP + tiny Hub-format datasets -> recipes/clip_vision/finetune.py
(SAFTTrainer; full / FTLO / FTTS; AdamW and ASAM) -> saft_hf.merging -> `evaluate vision` report."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saft_hf import cli as saft_cli
from saft_hf.merging import search_coefficients, task_arithmetic, task_vector
from saft_hf.vision.evaluate import make_vision_evaluator
from saft_hf.vision.model import load_vision_encoder
from saft_hf.testing.vision import build_tiny_setup

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "clip_vision"
TASKS = ("eurosat", "dtd")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    tiny = build_tiny_setup(root)
    return {"root": root, "clip": str(tiny["clip"]), "data": {t: str(p) for t, p in tiny["data"].items()},
            "heads": str(root / "heads")}


def recipe_main():
    spec = importlib.util.spec_from_file_location("clip_vision_finetune", RECIPE / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def finetune(setup, task, mode, rho, steps=16):
    out = setup["root"] / "runs" / f"{mode}_rho{rho}" / task
    argv = ["--config", str(RECIPE / "configs" / f"{task}.yaml"), "--model_name_or_path", setup["clip"],
            "--data_path", setup["data"][task], "--head_cache_dir", setup["heads"], "--output_dir", str(out),
            "--finetuning_mode", mode, "--sam_rho", str(rho), "--max_steps", str(steps), "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64",
            "--eval_steps", str(steps // 2), "--save_steps", str(steps // 2), "--logging_steps", "2",
            "--dataloader_num_workers", "0", "--use_cpu", "true", "--disable_tqdm", "true"]
    assert recipe_main()(argv) == 0
    result = json.loads((out / "finetuned_accuracy.json").read_text())
    assert result["task"] == task and result["finetuning_mode"] == mode and result["sam_rho"] == rho
    assert result["global_step"] == steps
    losses = [loss for _, loss in result["loss_curve"]]
    assert len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2]), f"{task} {mode} rho={rho}: loss did not decrease {losses}"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (out / name).is_file()
    return out, result


def evaluate_cli(*argv):
    """`saft-hf evaluate vision ...` through the real command-line dispatcher."""
    assert saft_cli.main(["evaluate", "vision", *map(str, argv)]) == 0


def merge_to_dir(setup, run_dirs, scaling, out):
    pretrained = load_vision_encoder(setup["clip"]).state_dict()
    vectors = [task_vector(pretrained, load_file(str(d / "model.safetensors"))) for d in run_dirs]
    merged = task_arithmetic(pretrained, vectors, scaling=scaling)
    encoder = load_vision_encoder(setup["clip"])
    encoder.load_state_dict(merged)
    encoder.save_pretrained(out)
    return pretrained, vectors


def data_args(setup):
    return ["--data", *[f"{t}={setup['data'][t]}" for t in TASKS]]


def check_report(report_dir, finetuned, model_name):
    report = json.loads((report_dir / "report.json").read_text())
    assert report["tasks"] == list(TASKS) and report["model"] == str(model_name)
    for t in TASKS:
        assert 0.0 <= report["absolute"][t] <= 1.0
        assert report["normalized"][t] == pytest.approx(report["absolute"][t] / finetuned[t]["test_accuracy"])
    assert report["normalized_mean"] == pytest.approx(sum(report["normalized"].values()) / len(TASKS))
    table = (report_dir / "report.md").read_text()
    assert table.startswith("| model | eurosat | dtd | avg abs | avg norm |")
    return report


def test_full_asam_finetune_merge_evaluate(setup):
    runs = {t: finetune(setup, t, "full", 0.5) for t in TASKS}
    for task, (out, result) in runs.items():
        assert result["test_accuracy"] >= 0.5, f"{task}: fine-tuning did not learn (chance is 0.25): {result}"
    # the evaluator reproduces the accuracy the recipe recorded for its own checkpoint
    eurosat_dir = runs["eurosat"][0]
    evaluate_cli("--model", eurosat_dir, "--tasks", "eurosat", "--data", f"eurosat={setup['data']['eurosat']}",
                 "--head-cache-dir", setup["heads"], "--output-dir", setup["root"] / "report_ft")
    own = json.loads((setup["root"] / "report_ft" / "report.json").read_text())
    assert own["base_model"] == setup["clip"]  # read from finetuned_accuracy.json
    assert own["absolute"]["eurosat"] == pytest.approx(runs["eurosat"][1]["test_accuracy"])

    merged_dir = setup["root"] / "merged_full_asam"
    pretrained, vectors = merge_to_dir(setup, [runs[t][0] for t in TASKS], 0.5, merged_dir)
    assert all(any(v.abs().max() > 0 for v in tv.values()) for tv in vectors)
    evaluate_cli("--model", merged_dir, "--tasks", *TASKS, "--base-model", setup["clip"], *data_args(setup),
                 "--head-cache-dir", setup["heads"], "--finetuned-accuracy", *[runs[t][0] for t in TASKS],
                 "--output-dir", setup["root"] / "report_merged")
    check_report(setup["root"] / "report_merged", {t: runs[t][1] for t in TASKS}, merged_dir)

    # the same evaluator drives the merging coefficient search on the validation splits
    evaluator = make_vision_evaluator(TASKS, split="validation", base_model=setup["clip"], data_paths=setup["data"],
                                      head_cache_dir=setup["heads"], device="cpu", progress=False)
    result = search_coefficients(pretrained, vectors, evaluator, method="task_arithmetic",
                                 grid={"scaling": [0.0, 1.0]}, progress=False)
    assert {p.params["scaling"] for p in result.points} == {0.0, 1.0}
    zero, one = sorted(result.points, key=lambda p: p.params["scaling"])
    assert zero.absolute == evaluator(pretrained)  # scaling 0 is the pretrained encoder
    assert one.absolute != zero.absolute


def test_ftts_linearized_finetune_and_evaluate(setup):
    out, result = finetune(setup, "dtd", "ftts", 0.5)
    assert result["linearized"] is True and result["test_accuracy"] >= 0.5
    pretrained = load_vision_encoder(setup["clip"]).state_dict()
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(pretrained) and any(not torch.equal(saved[k], pretrained[k]) for k in saved)
    evaluate_cli("--model", out, "--tasks", "dtd", "--data", f"dtd={setup['data']['dtd']}", "--linearized",
                 "--head-cache-dir", setup["heads"], "--finetuned-accuracy", out,
                 "--output-dir", setup["root"] / "report_ftts")
    report = json.loads((setup["root"] / "report_ftts" / "report.json").read_text())
    assert report["linearized"] is True
    # the linearized forward of the saved checkpoint (theta0 + delta) reproduces the recipe's accuracy
    assert report["absolute"]["dtd"] == pytest.approx(result["test_accuracy"])
    assert report["normalized"]["dtd"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "ftlo", "ftts"])
@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_all_modes_sgd_and_asam_merge_and_evaluate(setup, mode, rho):
    runs = {t: finetune(setup, t, mode, rho, steps=24) for t in TASKS}
    pretrained = load_vision_encoder(setup["clip"]).state_dict()
    if mode == "ftlo":  # only the attention projections moved
        for out, _ in runs.values():
            saved = load_file(str(out / "model.safetensors"))
            moved = {k for k in saved if not torch.equal(saved[k], pretrained[k])}
            assert moved and all(".self_attn." in k and k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "out_proj")
                                 for k in moved), sorted(moved)
    merged_dir = setup["root"] / f"merged_{mode}_{rho}"
    merge_to_dir(setup, [runs[t][0] for t in TASKS], 0.5, merged_dir)
    report_dir = setup["root"] / f"report_{mode}_{rho}"
    evaluate_cli("--model", merged_dir, "--tasks", *TASKS, "--base-model", setup["clip"], *data_args(setup),
                 "--head-cache-dir", setup["heads"], "--finetuned-accuracy", *[runs[t][0] for t in TASKS],
                 "--output-dir", report_dir, *(["--linearized"] if mode == "ftts" else []))
    report = check_report(report_dir, {t: runs[t][1] for t in TASKS}, merged_dir)
    assert report["linearized"] is (mode == "ftts")


@pytest.mark.slow
def test_merge_study_script_on_linearized_runs(setup):
    runs = [finetune(setup, t, "ftts", 0.0, steps=8)[0] for t in TASKS]
    spec = importlib.util.spec_from_file_location("clip_vision_merge", RECIPE / "merge_and_evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = setup["root"] / "study_ftts"
    argv = [*map(str, runs), "--output-dir", str(out), "--head-cache-dir", setup["heads"], "--device", "cpu",
            "--data", *[f"{t}={setup['data'][t]}" for t in TASKS]]
    assert module.main(argv) == 0
    study = json.loads((out / "merge_study.json").read_text())
    assert study["linearized"] is True and study["tasks"] == list(TASKS)
    from saft_hf.merging import registry

    # the paper's rows plus every other study method of the registry that accepts this many models
    assert set(study["rows"]) == {"pretrained (zero-shot)", "fine-tuned (individual)", "task_arithmetic (alpha=0.4)",
                                  *registry.method_names(study_only=True, num_tasks=len(TASKS))}
    assert study["rows"]["fine-tuned (individual)"]["normalized_mean"] == pytest.approx(1.0)
    assert study["methods"]["ties"]["params"]["density"] in (0.3, 0.2, 0.1)
    assert study["methods"]["task_arithmetic"]["params"]["scaling"] in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    assert len(study["methods"]["ties"]["search"]["points"]) == 18
    assert (out / "merge_study.md").read_text().count("\n") == 2 + len(study["rows"])
