"""The demo study end to end on a tiny BERT (built from a BertConfig, WordPiece vocab written to
disk) with tiny synthetic tasks: heads, fine-tuning with SAFTTrainer (AdamW and ASAM), merging,
report structure, normalized = merged / individual, and resuming from cached checkpoints."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from saft_hf.demo import model as demo_model
from saft_hf.demo import sources, study
from saft_hf.heads import EncoderClassifier, ZeroShotHead
from saft_hf.tasks.text_demo import TextTask

WORDS = ["red", "blue", "apple", "sky", "sea", "fire", "good", "bad", "film", "movie", "a", "the", "is", "this",
         "color", "mood", "happy", "sad", "very", "of", "thing", "about", "."]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    # transformers 5: the WordPiece vocabulary is passed as a dict (saved as tokenizer.json)
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return str(path)


def _synthetic(words0, words1, n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        keys = words1 if label else words0
        filler = rng.sample(["a", "the", "is", "this", "of", "thing", "very"], 3)
        out.append((" ".join(rng.sample(keys, 2) + filler), label))
    return out


def _tasks():
    color = TextTask(name="color", title="toy colors", source="none", member="", class_names=("red", "blue"),
                     templates=("a {} thing .", "the color is {} ."), description="toy",
                     raw_labels=("0", "1"))
    mood = TextTask(name="mood", title="toy mood", source="none", member="", class_names=("bad", "good"),
                    templates=("this film is {} .",), description="toy", raw_labels=("0", "1"))
    return {
        "color": (color, {"all": _synthetic(["red", "fire", "apple"], ["blue", "sky", "sea"], 80, 0)}),
        "mood": (mood, {"train": _synthetic(["bad", "sad"], ["good", "happy"], 60, 1),
                        "test": _synthetic(["bad", "sad"], ["good", "happy"], 20, 2)}),
    }


def _config(model_dir, tmp_path, **kw):
    base = dict(model=model_dir, tasks=("color", "mood"), seeds=(0,), methods=("adamw", "asam"), max_length=16,
                train_steps=6, batch_size=8, learning_rate=3e-3, logit_scale_grid=(10.0, 50.0), max_test=16,
                search_val_size=8, ta_grid=(0.5, 1.0), ties_grid=(1.0,), eval_batch_size=16,
                cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "report"), task_data_override=_tasks())
    base.update(kw)
    return study.StudyConfig(**base)


def test_zero_shot_head_on_tiny_model(tiny_model_dir):
    tokenizer = demo_model.load_tokenizer(tiny_model_dir)
    encoder = demo_model.load_encoder(tiny_model_dir)
    tasks = [spec for spec, _ in _tasks().values()]
    unit = demo_model.unit_heads(encoder, tokenizer, tasks, max_length=16)
    for spec in tasks:
        w = unit[spec.name]
        assert w.shape == (2, encoder.config.hidden_size)
        assert torch.allclose(w.norm(dim=-1), torch.ones(2), atol=1e-5)
    head = ZeroShotHead(unit["color"] * 20.0)
    model = EncoderClassifier(encoder, head, "mean_pooled_text")
    assert not any("head" in name for name, _ in model.named_parameters())  # the head is frozen
    batch = demo_model.pad_batch(tokenizer(["red apple", "blue sky sea"])["input_ids"], tokenizer.pad_token_id)
    out = model(labels=torch.tensor([0, 1]), **batch)
    assert out["logits"].shape == (2, 2) and out["loss"].requires_grad
    # logits are cosine similarities times the scale
    assert float(out["logits"].detach().abs().max()) <= 20.0 + 1e-4
    assert not torch.allclose(head.weight[0], head.weight[1])  # class prompts embed differently


def test_logit_scale_choice_minimizes_validation_loss():
    unit = {"t": torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)}
    feats = {"t": torch.tensor([[1.0, 0.2], [0.1, 1.0], [1.0, 0.9]])}
    labels = {"t": [0, 1, 1]}
    best, losses = demo_model.choose_logit_scale(unit, feats, labels, [1.0, 5.0, 100.0])
    assert best == min(losses, key=losses.get)
    assert set(losses) == {1.0, 5.0, 100.0}



def _merges() -> set:
    """The merge rows of a two-task study (SLERP, defined for exactly two models, is among them)."""
    return {m.name for m in study.study_methods(dataclasses.replace(study.StudyConfig(), tasks=("color", "mood")))}


def test_study_end_to_end_report_and_resume(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path)
    result = study.run_study(cfg)
    report_dir = tmp_path / "report"
    for name in ("results.json", "results.md", "merging_adamw_vs_asam.png", "per_task_accuracy.png"):
        assert (report_dir / name).stat().st_size > 0
    saved = json.loads((report_dir / "results.json").read_text())
    assert saved["logit_scale"]["chosen"] in (10.0, 50.0)
    run = saved["runs"]["0"]["methods"]
    assert set(run) == {"adamw", "asam"}
    for method, res in run.items():
        individual = res["individual"]["absolute"]
        assert set(individual) == {"color", "mood"}
        assert set(res["merges"]) == _merges()
        for merge, rep in res["merges"].items():
            for task, acc in rep["absolute"].items():
                assert 0.0 <= acc <= 1.0
                assert rep["normalized"][task] == pytest.approx(acc / individual[task])
            assert rep["normalized_mean"] == pytest.approx(sum(rep["normalized"].values()) / 2)
        assert res["merges"]["task_arithmetic"]["coefficient"] in (0.5, 1.0)
        assert set(res["merges"]["task_arithmetic"]["validation_search"]) == {"0.5", "1.0"}  # JSON keys
        assert res["merges"]["task_arithmetic_fixed"]["coefficient"] == 0.4
        assert res["merges"]["weighted_average"]["coefficient"] == 0.5
    # ASAM really ran with rho 0.5 and AdamW with rho 0
    rhos = {k.split("-")[0]: v["sam_rho"] for k, v in saved["training"].items()}
    assert rhos == {"adamw": 0.0, "asam": 0.5}
    rows = saved["summary"]
    assert "zero-shot (pretrained)" in rows
    assert sum(1 for r in rows.values() if r.get("kind") == "ties") == 2
    table = (report_dir / "results.md").read_text()
    assert "| model / fine-tuning | color | mood | avg abs | avg norm | coef |" in table
    assert "task arithmetic (alpha = 0.4) / ASAM" in table
    assert saved["diagnostics"]["status"].startswith("skipped")
    assert result["timings_seconds"]["total"] > 0 and result["resources"]["peak_rss_mb"] > 0

    # second run: every fine-tuned encoder comes from the cache, numbers are identical
    again = study.run_study(cfg)
    assert all(r.get("reused_from_cache") for r in again["training"].values())
    assert again["runs"]["0"]["methods"]["asam"]["merges"]["ties"]["absolute"] == \
        run["asam"]["merges"]["ties"]["absolute"]


def test_study_needs_two_available_tasks(tiny_model_dir, tmp_path, monkeypatch):
    def unavailable(name, cache_dir=None):
        raise sources.SourceUnavailable("npm is not installed")

    monkeypatch.setattr(study, "ensure_source", unavailable)
    only_one = {"color": _tasks()["color"]}
    cfg = _config(tiny_model_dir, tmp_path, tasks=("color", "spam"), task_data_override=only_one)
    with pytest.raises(RuntimeError, match="at least 2") as err:
        study.run_study(cfg)
    assert "npm is not installed" in str(err.value)


# Recorded with the demo's own merge code (before the shared study driver, commit 7820385) on the
# configuration `_config` builds: the driver must reproduce every number, coefficient and search score.
EXPECTED_SEED0 = {
    "zero_shot": {"color": 0.75, "mood": 1.0},
    "logit_scale": 50.0,
    "adamw": {"individual": {"color": 1.0, "mood": 0.75}, "merges": {
        "weighted_average": ({"color": 0.9375, "mood": 1.0}, 0.5, None),
        "task_arithmetic": ({"color": 0.9375, "mood": 1.0}, 0.5, {"0.5": 1.0, "1.0": 1.0}),
        "task_arithmetic_fixed": ({"color": 0.8125, "mood": 1.0}, 0.4, None),
        "ties": ({"color": 0.8125, "mood": 1.0}, 1.0, {"1.0": 1.0})}},
    "asam": {"individual": {"color": 1.0, "mood": 0.5}, "merges": {
        "weighted_average": ({"color": 1.0, "mood": 0.5}, 0.5, None),
        "task_arithmetic": ({"color": 1.0, "mood": 0.5}, 0.5, {"0.5": 0.8333333432674408, "1.0": 0.8333333432674408}),
        "task_arithmetic_fixed": ({"color": 0.9375, "mood": 0.5}, 0.4, None),
        "ties": ({"color": 1.0, "mood": 1.0}, 1.0, {"1.0": 1.0})}},
}


def test_study_numbers_match_the_recorded_pre_driver_run(tiny_model_dir, tmp_path):
    result = study.run_study(_config(tiny_model_dir, tmp_path))
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["zero_shot"]["absolute"] == EXPECTED_SEED0["zero_shot"]
    assert saved["logit_scale"]["chosen"] == EXPECTED_SEED0["logit_scale"]
    for method in ("adamw", "asam"):
        got = saved["runs"]["0"]["methods"][method]
        want = EXPECTED_SEED0[method]
        assert got["individual"]["absolute"] == want["individual"]
        # the same methods first, same order (issue 13 appends the newer methods after them)
        assert list(got["merges"])[:len(want["merges"])] == list(want["merges"])
        for merge, (absolute, coefficient, search) in want["merges"].items():
            row = got["merges"][merge]
            assert row["absolute"] == absolute, (method, merge)
            assert row["coefficient"] == coefficient, (method, merge)
            assert row.get("validation_search") == search, (method, merge)
            assert row["normalized"] == {t: absolute[t] / want["individual"][t] for t in absolute}
    assert list(result["summary"]) == list(saved["summary"])


# --- paired statistics (issue 12, section 2) ---------------------------------------------------


@pytest.fixture(scope="module")
def two_seed_study(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_seeds")
    cfg = _config(tiny_model_dir, tmp, seeds=(0, 1), n_boot=400)
    study.run_study(cfg)
    return tmp / "report", json.loads((tmp / "report" / "results.json").read_text())


def test_per_example_correctness_is_recorded_for_every_row(two_seed_study):
    from saft_hf.pools import bits_to_correctness

    _, saved = two_seed_study
    for seed in ("0", "1"):
        for method, res in saved["runs"][seed]["methods"].items():
            rows = [res["individual"], *res["merges"].values()]
            for row in rows:
                assert set(row["correct"]) == {"color", "mood"}
                for task, bits in row["correct"].items():
                    arr = bits_to_correctness(bits)
                    assert len(arr) == 16  # max_test
                    assert arr.mean() == pytest.approx(row["absolute"][task])


def test_effects_equal_stats_effect_table_on_the_recorded_arrays(two_seed_study):
    from saft_hf.pools import bits_to_correctness
    from saft_hf.stats import effect_table

    _, saved = two_seed_study
    merged, finetuned = {}, {}
    for seed, run in saved["runs"].items():
        for method, res in run["methods"].items():
            finetuned.setdefault(method, {})[seed] = {t: bits_to_correctness(b) for t, b in res["individual"]["correct"].items()}
            merged.setdefault(method, {})[seed] = {
                k: {t: bits_to_correctness(b) for t, b in row["correct"].items()} for k, row in res["merges"].items()}
    want = effect_table(merged, finetuned, "adamw", "asam", n_boot=400)
    got = saved["effects"]["effects"]["asam"]
    assert saved["effects"]["baseline"] == "adamw"
    assert [r["method"] for r in got] == [r["method"] for r in want]
    assert len(got) == 1 + len(_merges())
    for g, w in zip(got, want):
        assert g["n_seeds"] == 2
        for kind in ("absolute", "normalized"):
            if w[kind] is None:
                assert g[kind] is None
                continue
            for key in ("effect", "ci_low", "ci_high", "p_value"):
                assert g[kind][key] == pytest.approx(getattr(w[kind], key)), (g["method"], kind, key)
        assert {s: (m["b"], m["c"]) for s, m in g["mcnemar"].items()} == \
            {str(s): (m.b, m.c) for s, m in w["mcnemar"].items()}


def test_report_leads_with_the_effect_table_forest_plot_and_cost(two_seed_study):
    report_dir, saved = two_seed_study
    text = (report_dir / "results.md").read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[:3] == ["## Effect on merging (paired statistics)", "## Cost and benefit", "## Accuracy"]
    assert "| method | ASAM - AdamW abs (pp) [95% CI] |" in text
    assert "over 2 seeds and test examples (hierarchical)" in text
    assert "![forest plot ASAM - AdamW](effects_asam.png)" in text
    assert (report_dir / "effects_asam.png").stat().st_size > 0 and (report_dir / "effects_asam.svg").exists()
    cost = saved["cost_benefit"]["methods"]
    assert cost["adamw"]["relative_cost"] == pytest.approx(1.0)
    assert cost["asam"]["seconds_per_step"] > 0 and set(cost["asam"]["merged"]) == _merges()
    assert "| method | sam_rho | s / step | x AdamW | individual abs |" in text
    assert cost["adamw"]["sam_rho"] == 0.0 and cost["asam"]["sam_rho"] == 0.5
    records = saved["training"].values()
    assert all(r["optimizer_steps"] == 6 for r in records)


def test_fine_tuning_methods_come_from_the_sam_variant_registry(tiny_model_dir, tmp_path):
    from saft_hf.demo import cli as demo_cli
    from saft_hf.sam_variants.registry import sam_variant_names

    methods = study.fine_tuning_methods()
    assert methods["adamw"] == (0.0, "asam") and set(sam_variant_names()) <= set(methods)
    cfg = _config(tiny_model_dir, tmp_path, sam_rhos={"sam": 0.2})
    assert study.method_setting(cfg, "sam") == (0.2, "sam") and study.method_setting(cfg, "asam") == (0.5, "asam")
    with pytest.raises(ValueError, match="unknown fine-tuning method 'nope'"):
        study.method_setting(cfg, "nope")
    import argparse

    parser = argparse.ArgumentParser()
    demo_cli.add_arguments(parser)
    assert demo_cli.config_from_args(parser.parse_args(["--study"])).seeds == (0, 1, 2)
    assert demo_cli.config_from_args(parser.parse_args(["--study", "--seeds", "4"])).seeds == (4,)
    assert demo_cli.config_from_args(parser.parse_args([])).seeds == (0,)
    assert demo_cli.config_from_args(parser.parse_args(["--methods", "adamw", "sam"])).methods == ("adamw", "sam")
    parsed = demo_cli.config_from_args(parser.parse_args(["--sam-rho", "looksam=0.1", "asam=0.3"]))
    assert parsed.sam_rhos == {"looksam": 0.1, "asam": 0.3}
    assert demo_cli.config_from_args(parser.parse_args([])).sam_rhos is None


def test_each_variant_fine_tunes_at_its_papers_radius_in_its_own_cache_key(tiny_model_dir, tmp_path):
    """Defaults: ASAM at asam_rho, the others at their paper's radius (ASAM's 0.5 is ~10x that of the
    variants perturbing with plain SAM); a radius other than asam_rho is part of the method's cache key."""
    cfg = _config(tiny_model_dir, tmp_path)
    settings = {m: study.method_setting(cfg, m) for m in ("adamw", "asam", "sam", "looksam", "esam", "gsam", "fsam", "rwp")}
    assert settings == {"adamw": (0.0, "asam"), "asam": (0.5, "asam"), "sam": (0.05, "sam"),
                        "looksam": (0.05, "looksam"), "esam": (0.05, "esam"), "gsam": (0.05, "gsam"),
                        "fsam": (0.1, "fsam"), "rwp": (0.5, "rwp")}  # RWP's rho only switches it on
    keys = {m: study.method_key(cfg, m) for m in settings}
    assert keys == {"adamw": "adamw", "asam": "asam", "sam": "sam-rho0.05", "looksam": "looksam-rho0.05",
                    "esam": "esam-rho0.05", "gsam": "gsam-rho0.05", "fsam": "fsam-rho0.1", "rwp": "rwp"}
    other = _config(tiny_model_dir, tmp_path, sam_rhos={"asam": 0.2, "looksam": 0.5}, asam_rho=0.5)
    assert study.method_key(other, "asam") == "asam-rho0.2" and study.method_key(other, "looksam") == "looksam"
    # the signature (hash shared by every method) does not depend on the per-variant radii
    assert cfg.finetune_signature("m", 10.0) == other.finetune_signature("m", 10.0)


def test_cached_checkpoint_trained_at_another_rho_is_retrained(tiny_model_dir, tmp_path, capsys):
    from saft_hf.demo.sources import sha256_file

    cfg = _config(tiny_model_dir, tmp_path, methods=("adamw", "sam"), tasks=("color", "mood"), merges=("task_arithmetic",))
    first = study.run_study(cfg)
    ckpts = sorted((tmp_path / "cache" / "checkpoints").glob("*/sam-rho0.05-seed0/*"))
    assert len(ckpts) == 2
    assert {r["sam_rho"] for k, r in first["training"].items() if k.startswith("sam-")} == {0.05}
    # a record claiming another radius (e.g. written by an older version under this key), checksums intact
    info = ckpts[0] / "saft_demo_training.json"
    record = json.loads(info.read_text())
    info.write_text(json.dumps({**record, "sam_rho": 0.5}))
    manifest = ckpts[0] / "manifest.json"
    manifest.write_text(json.dumps({"sha256": {f.name: sha256_file(f) for f in sorted(ckpts[0].iterdir())
                                               if f.is_file() and f.name != "manifest.json"}}))
    capsys.readouterr()
    again = study.run_study(cfg)
    err = capsys.readouterr().err
    assert f"cached {ckpts[0]} was trained with sam_rho 0.5, not 0.05; training it again" in err, err
    reused = {k: r.get("reused_from_cache", False) for k, r in again["training"].items()}
    assert sorted(reused.values()) == [False, True, True, True], reused
    assert json.loads(info.read_text())["sam_rho"] == 0.05


def test_merge_monitor_pass_plots_merged_accuracy_per_step(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path, n_boot=200, monitor_every=2, monitor_val_size=8)
    result = study.run_study(cfg)
    mon = result["merge_monitor"]
    assert mon["task"] == "mood" and set(mon["methods"]) == {"adamw", "asam"}
    for method, res in mon["methods"].items():
        assert res["steps"] == [2, 4, 6] and res["calls"] == 3
        assert all(0.0 <= a <= 1.0 for a in res["merged_mean_accuracy"])
        assert all(n is not None for n in res["merged_mean_normalized"])
        assert res["seconds_per_call"] > 0 and 0 < res["share_of_training_time"] < 1
        assert res["same_loss_as_study_run"]  # the monitored run is the study's run again
    assert any(s is not None for s in mon["methods"]["asam"]["sharpness"])
    assert (tmp_path / "report" / "merge_monitor.png").stat().st_size > 0
    assert "## Merge monitor" in (tmp_path / "report" / "results.md").read_text()
