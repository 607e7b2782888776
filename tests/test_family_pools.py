"""The task-family protocol on every family's tiny models: the score-file schema (and its legacy
readers), the shared merge-study driver on the GLUE and vision pools, and `saft-hf analyze --family
vision|glue` through their probes (the demo's runs in test_demo_study / test_analysis_cli_demo)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saft_hf.pools import (SCORE_FILE, FinetunedScores, InMemoryModelPool, TaskPool, find_score_file,
                           read_finetuned_scores)

pytestmark = pytest.mark.usefixtures("single_thread_torch")


# --- the score file -------------------------------------------------------------------------------


def test_score_file_round_trip_and_checks(tmp_path):
    rec = FinetunedScores("dtd", "vision", "accuracy", {"validation": 0.9, "test": 0.8}, "clip", {"sam_rho": 0.5})
    path = rec.write(tmp_path)
    data = json.loads(path.read_text())
    assert path.name == SCORE_FILE and data["schema"] == "saft_hf.finetuned_scores" and data["version"] == 1
    back = read_finetuned_scores(tmp_path, "dtd")
    assert (back.task, back.family, back.scores, back.base_model, back.training) == \
        ("dtd", "vision", {"validation": 0.9, "test": 0.8}, "clip", {"sam_rho": 0.5})
    assert back.score("test") == 0.8
    with pytest.raises(ValueError, match="holds scores for task 'dtd', not 'cars'"):
        read_finetuned_scores(tmp_path, "cars")
    path.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ValueError, match="newer than this saft-hf"):
        read_finetuned_scores(tmp_path)
    path.write_text(json.dumps({**data, "scores": {"train": 1.0}}))
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['train'\]"):
        read_finetuned_scores(tmp_path)
    with pytest.raises(FileNotFoundError, match="finetuned_scores.json"):
        read_finetuned_scores(tmp_path / "nothing")


def test_legacy_score_files_are_read(tmp_path):
    vision, glue, demo = (tmp_path / n for n in ("vision", "glue", "demo"))
    for d in (vision, glue, demo):
        d.mkdir()
    (vision / "finetuned_accuracy.json").write_text(json.dumps(
        {"task": "dtd", "test_accuracy": 0.7, "validation_accuracy": 0.75, "base_model": "b", "linearized": True}))
    (glue / "glue_scores.json").write_text(json.dumps({"task": "cola", "score": 0.5, "score_metric": "mcc",
                                                       "model": "t5"}))
    (demo / "saft_demo_training.json").write_text(json.dumps({"task": "mood", "method": "asam",
                                                              "signature": {"model": "m"}}))
    v, g, d = (read_finetuned_scores(p) for p in (vision, glue, demo))
    assert (v.family, v.scores, v.base_model, v.training["linearized"]) == \
        ("vision", {"validation": 0.75, "test": 0.7}, "b", True)
    assert (g.family, g.metric, g.scores, g.base_model) == ("glue", "mcc", {"validation": 0.5}, "t5")
    assert (d.family, d.task, d.scores, d.base_model) == ("demo", "mood", {}, "m")
    # the unified file wins over a legacy one in the same directory
    FinetunedScores("dtd", "vision", scores={"test": 0.1}).write(vision)
    assert find_score_file(vision).name == SCORE_FILE and read_finetuned_scores(vision).scores == {"test": 0.1}


# --- the driver on a toy pool (selection, normalization, method table) ------------------------------


class _ToyPool(TaskPool):
    """Score of task t = 1 - |w - target_t| (clipped), on the single weight w."""

    family = "toy"
    targets = {"a": 0.5, "b": 1.0}

    @property
    def tasks(self):
        return list(self.targets)

    def task_info(self, task):
        from saft_hf.pools import TaskInfo
        return TaskInfo(task, "toy")

    def evaluate(self, model, split="validation", tasks=None, max_examples=None):
        w = float(model["w"])
        return {t: max(0.0, 1.0 - abs(w - self.targets[t])) for t in self.check_tasks(tasks)}

    def unlabeled_inputs(self, task, split="validation", max_examples=None):
        yield {"x": torch.zeros(1)}


def test_driver_searches_on_validation_and_normalizes_by_the_individual_scores():
    from saft_hf.evaluation.study import default_study_methods, run_merge_study

    pool = InMemoryModelPool({"w": torch.tensor(0.0)}, {"a": {"w": torch.tensor(0.5)}, "b": {"w": torch.tensor(1.0)}})
    methods = default_study_methods(["weighted_average", "task_arithmetic"],
                                    grids={"task_arithmetic": {"scaling": (0.1, 0.5, 1.0)}}, fixed_coefficient=0.4)
    assert [m.name for m in methods] == ["weighted_average", "task_arithmetic", "task_arithmetic_fixed"]
    result = run_merge_study(pool, _ToyPool(), methods, individual="evaluate", progress=False)
    assert result["individual"]["absolute"] == {"a": 1.0, "b": 1.0}
    assert result["zero_shot"]["absolute"] == {"a": 0.5, "b": 0.0}
    rows = result["methods"]
    # tau sum = 1.5: alpha 0.5 -> w 0.75 -> mean 0.75, the best of the grid (0.1 -> w .15; 1.0 -> w 1.5)
    assert rows["task_arithmetic"]["params"] == {"scaling": 0.5}
    assert rows["task_arithmetic"]["absolute"] == {"a": 0.75, "b": 0.75}
    assert rows["task_arithmetic_fixed"]["coefficient"] == 0.4 and rows["weighted_average"]["coefficient"] == 0.5
    assert rows["weighted_average"]["absolute"] == {"a": 0.75, "b": 0.75}
    assert len(rows["task_arithmetic"]["search"]["points"]) == 3
    with pytest.raises(KeyError, match="recorded"):
        run_merge_study(pool, _ToyPool(), methods, individual="recorded", progress=False)


# --- GLUE: tiny T5 -------------------------------------------------------------------------------

GLUE_TASKS = ("sst2", "rte")


@pytest.fixture(scope="module")
def glue_runs(tmp_path_factory):
    from saft_hf.glue.pools import GlueTaskPool
    from saft_hf.testing.glue import tiny_t5, tiny_tokenizer, write_tiny_glue

    root = tmp_path_factory.mktemp("glue_pools")
    tok = tiny_tokenizer()
    base = tiny_t5(tok, d_model=16)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    data = {t: str(p) for t, p in write_tiny_glue(root / "data", GLUE_TASKS, validation_size=16).items()}
    pool = GlueTaskPool(GLUE_TASKS, str(root / "base"), data_paths=data, batch_size=16, device="cpu")
    for k, task in enumerate(GLUE_TASKS):
        torch.manual_seed(k + 1)
        model = tiny_t5(tok, d_model=16)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / "runs" / task)
        tok.save_pretrained(root / "runs" / task)
        score = pool.evaluate(model, "validation", [task])[task]
        FinetunedScores(task, "glue", "accuracy", {"validation": max(score, 0.05)}, str(root / "base")).write(
            root / "runs" / task)
    return root, data


def test_glue_task_pool_and_study_driver(glue_runs, tmp_path):
    from saft_hf.glue.pools import GlueTaskPool
    from saft_hf.glue.search import run_glue_merge_study

    root, data = glue_runs
    pool = GlueTaskPool(GLUE_TASKS, str(root / "base"), data_paths=data, batch_size=16, device="cpu")
    assert pool.task_info("rte").head == "text_to_text" and pool.task_info("rte").num_classes == 2
    batch = next(iter(pool.unlabeled_inputs("sst2", max_examples=4)))
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape[0] == 4
    result = run_glue_merge_study(root / "base", {t: root / "runs" / t for t in GLUE_TASKS}, tmp_path / "study",
                                  alphas=[0.5, 1.0], densities=[0.2], data_paths=data, batch_size=16,
                                  device="cpu", progress=False)
    assert list(result["methods"])[:4] == ["weighted_average", "task_arithmetic", "task_arithmetic_fixed", "ties"]
    assert result["search_score"] == "mean normalized validation score"
    assert len(result["methods"]["ties"]["search"]["points"]) == 2
    for name, row in result["methods"].items():
        for t in GLUE_TASKS:
            assert row["normalized"][t] == pytest.approx(row["absolute"][t] / result["individual"]["absolute"][t])
    # the fixed-alpha row is the plain task-arithmetic merge at 0.4, evaluated by the same pool
    from saft_hf.merging import task_arithmetic, task_vector
    from saft_hf.glue.pools import glue_model_pool
    mp = glue_model_pool(str(root / "base"), {t: str(root / "runs" / t) for t in GLUE_TASKS})
    theta0 = mp.pretrained_state_dict()
    merged = task_arithmetic(theta0, [task_vector(theta0, mp.finetuned_state_dict(t)) for t in GLUE_TASKS], 0.4)
    assert pool.evaluate(merged) == result["methods"]["task_arithmetic_fixed"]["absolute"]
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / "study" / name).stat().st_size > 0


def test_analyze_glue_family_label_word_probe(glue_runs, tmp_path):
    from saft_hf.cli import main

    root, data = glue_runs
    out = tmp_path / "analysis"
    rc = main(["analyze", "--family", "glue", "--pretrained", str(root / "base"),
               "--method", "AdamW", *[f"{t}={root / 'runs' / t}" for t in GLUE_TASKS],
               "--data", *[f"{t}={p}" for t, p in data.items()], "--output", str(out), "--subset-size", "8",
               "--grid-size", "3", "--analyses", "disentanglement", "linearity", "hessian", "--hessian-max-iter", "2",
               "--hessian-gammas", "0", "1", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe"]["tasks"] == list(GLUE_TASKS) and summary["probe"]["examples"] == {"sst2": 8, "rte": 8}
    plane = json.loads((out / "plane_two-task.json").read_text())["AdamW"]
    assert plane["tasks"] == list(GLUE_TASKS)
    losses = [v for row in plane["loss"]["sst2"] for v in row]
    assert all(v == v and v > 0 for v in losses)  # finite label-word cross-entropies, no NaN


def test_label_word_probe_matches_a_direct_seq2seq_computation(glue_runs):
    from transformers import AutoTokenizer

    from saft_hf.analysis.probe import TaskProbe
    from saft_hf.glue.pools import first_step_logits, label_word_heads
    from saft_hf.glue.predict import load_seq2seq_model

    root, _ = glue_runs
    tok = AutoTokenizer.from_pretrained(root / "base")
    model = load_seq2seq_model(str(root / "base"))
    ids = [tok("sst2 sentence : good film")["input_ids"], tok("sst2 sentence : bad plot")["input_ids"]]
    probe = TaskProbe.from_token_ids(model, label_word_heads(tok, ["sst2"]), {"sst2": (ids, [1, 0])},
                                     pad_id=tok.pad_token_id, subset_size=None, features=first_step_logits)
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("negative", "positive")]
    with torch.no_grad():
        ref = []
        for seq in ids:
            out = model(input_ids=torch.tensor([seq]), decoder_input_ids=torch.tensor([[0]]))
            ref.append(out.logits[0, 0, words])
    order = sorted(range(2), key=lambda i: (len(ids[i]), i))  # the probe batches by length
    assert torch.allclose(probe.logits("sst2"), torch.stack([ref[i] for i in order]), atol=1e-5)


# --- vision: tiny CLIP ---------------------------------------------------------------------------

VISION_TASKS = ("eurosat", "dtd")


@pytest.fixture(scope="module")
def vision_runs(tmp_path_factory):
    from saft_hf.testing.vision import build_tiny_setup
    from saft_hf.vision.model import load_vision_encoder

    root = tmp_path_factory.mktemp("vision_pools")
    tiny = build_tiny_setup(root)
    clip = str(tiny["clip"])
    for k, task in enumerate(VISION_TASKS):
        torch.manual_seed(k + 1)
        enc = load_vision_encoder(clip)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.02 * torch.randn_like(p))
        enc.save_pretrained(root / "runs" / task)
        FinetunedScores(task, "vision", "accuracy", {"validation": 0.5, "test": 0.5}, clip,
                        {"linearized": False}).write(root / "runs" / task)
    return root, clip, {t: str(p) for t, p in tiny["data"].items()}


def test_vision_merge_study_through_the_driver(vision_runs, tmp_path):
    from saft_hf.vision.merge_study import run_merge_study

    root, clip, data = vision_runs
    report = run_merge_study([root / "runs" / t for t in VISION_TASKS], tmp_path / "study", data_paths=data,
                             grid={"task_arithmetic": {"scaling": [0.5, 1.0]},
                                   "ties": {"scaling": [1.0], "density": [0.2, 0.5]}},
                             head_cache_dir=str(root / "heads"), batch_size=32, device="cpu", progress=False,
                             search_max_samples=16, test_max_samples=16)
    rows = list(report["rows"])  # the paper's rows in their order (issue 13's newer methods come in between)
    paper = ["pretrained (zero-shot)", "fine-tuned (individual)", "weighted_average", "task_arithmetic", "ties",
             "task_arithmetic (alpha=0.4)"]
    assert [r for r in rows if r in paper] == paper and rows[:5] == paper[:5] and rows[-1] == paper[-1]
    assert report["methods"]["ties"]["params"]["density"] in (0.2, 0.5)
    assert len(report["methods"]["ties"]["search"]["points"]) == 2
    assert report["methods"]["weighted_average"]["params"] == {"normalize": True}  # uniform weights (the default)
    assert report["rows"]["fine-tuned (individual)"]["absolute"] == {"eurosat": 0.5, "dtd": 0.5}  # recorded
    assert (tmp_path / "study" / "merge_study.md").exists() and (tmp_path / "study" / "results.png").exists()


def test_analyze_vision_family(vision_runs, tmp_path):
    from saft_hf.cli import main

    root, clip, data = vision_runs
    out = tmp_path / "analysis"
    rc = main(["analyze", "--family", "vision", "--pretrained", clip,
               "--method", "ASAM", *[f"{t}={root / 'runs' / t}" for t in VISION_TASKS],
               "--data", *[f"{t}={p}" for t, p in data.items()], "--head-cache-dir", str(root / "heads"),
               "--output", str(out), "--subset-size", "8", "--grid-size", "3",
               "--analyses", "disentanglement", "linearity", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe"]["tasks"] == list(VISION_TASKS) and summary["probe"]["examples"] == {"eurosat": 8, "dtd": 8}
    assert json.loads((out / "plane_two-task.json").read_text())["ASAM"]["tasks"] == list(VISION_TASKS)


def test_saft_hf_evaluate_merge_study_runs_the_driver(glue_runs, vision_runs, tmp_path):
    from saft_hf.cli import main

    root, data = glue_runs
    out = tmp_path / "glue_study"
    assert main(["evaluate", "glue", "--model", str(root / "base"), "--merge_study", "--tasks", *GLUE_TASKS,
                 "--finetuned_root", str(root / "runs"), "--data", *[f"{t}={p}" for t, p in data.items()],
                 "--batch_size", "16", "--device", "cpu", "--output_dir", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"])[:4] == ["weighted_average", "task_arithmetic", "task_arithmetic_fixed", "ties"]
    assert len(saved["methods"]["ties"]["search"]["points"]) == 18  # the paper grid: 6 alphas x 3 densities

    root, clip, data = vision_runs
    out = tmp_path / "vision_study"
    assert main(["evaluate", "vision", "--merge-study", *[str(root / "runs" / t) for t in VISION_TASKS],
                 "--data", *[f"{t}={p}" for t, p in data.items()], "--head-cache-dir", str(root / "heads"),
                 "--search-max-samples", "8", "--max-samples", "8", "--device", "cpu",
                 "--output-dir", str(out)]) == 0
    assert set(json.loads((out / "merge_study.json").read_text())["rows"]) >= {"task_arithmetic", "ties"}
    assert (out / "results.md").exists()


# --- per-example correctness and the paired comparison (issue 12, sections 2 and 4) -------------


def test_vision_per_example_equals_totals(vision_runs):
    from saft_hf.vision.pools import VisionTaskPool, vision_model_pool

    root, clip, data = vision_runs
    pool = VisionTaskPool(VISION_TASKS, clip, data_paths=data, head_cache_dir=str(root / "heads"), batch_size=32,
                          device="cpu", progress=False)
    state = vision_model_pool(clip, {t: str(root / "runs" / t) for t in VISION_TASKS}).finetuned_state_dict("dtd")
    res = pool.evaluate_per_example(state, "test", max_examples=16)
    assert res.scores == pool.evaluate(state, "test", max_examples=16)
    for t in VISION_TASKS:
        assert len(res.correct[t]) == 16 and res.correct[t].mean() == pytest.approx(res.scores[t])
    again = pool.evaluate_per_example(state, "test", max_examples=16)  # fixed order: identical arrays
    assert all((again.correct[t] == res.correct[t]).all() for t in VISION_TASKS)


def test_glue_per_example_equals_totals(glue_runs):
    from saft_hf.glue.pools import GlueTaskPool
    from saft_hf.glue.search import export_pretrained  # noqa: F401 (the family module imports cleanly)

    root, data = glue_runs
    pool = GlueTaskPool(GLUE_TASKS, str(root / "base"), data_paths=data, batch_size=16, device="cpu")
    from saft_hf.glue.pools import glue_model_pool

    state = glue_model_pool(str(root / "base"), {t: str(root / "runs" / t) for t in GLUE_TASKS}).finetuned_state_dict("rte")
    res = pool.evaluate_per_example(state, "validation")
    assert res.scores == pool.evaluate(state, "validation") and res.excluded == {}
    for t in GLUE_TASKS:
        assert pool.task_info(t).metric == "accuracy"
        assert len(res.correct[t]) == 16 and res.correct[t].mean() == pytest.approx(res.scores[t])


def _perturbed_vision_runs(root, clip, seed, scale):
    from saft_hf.vision.model import load_vision_encoder

    out = {}
    for k, task in enumerate(VISION_TASKS):
        torch.manual_seed(100 * seed + k)
        enc = load_vision_encoder(clip)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(scale * torch.randn_like(p))
        enc.save_pretrained(root / task)
        FinetunedScores(task, "vision", "accuracy", {"validation": 0.5, "test": 0.5}, clip,
                        {"linearized": False}).write(root / task)
        out[task] = root / task
    return out


def test_compare_command_on_vision_merge_studies(vision_runs, tmp_path):
    """Two 'fine-tuning methods' x two seeds of the vision family through the driver, then
    `saft-hf compare`: its effects are `stats.effect_table` on the recorded arrays."""
    from saft_hf.cli import main
    from saft_hf.pools import bits_to_correctness
    from saft_hf.stats import INDIVIDUAL, effect_table, hierarchical_bootstrap
    from saft_hf.vision.merge_study import run_merge_study

    root, clip, data = vision_runs
    reports = {}
    for name, scale in (("a", 0.02), ("b", 0.05)):
        for seed in (0, 1):
            runs = _perturbed_vision_runs(tmp_path / f"runs_{name}{seed}", clip, seed, scale)
            out = tmp_path / f"study_{name}{seed}"
            run_merge_study([runs[t] for t in VISION_TASKS], out, data_paths=data,
                            methods=("task_arithmetic", "ties"), grid={"task_arithmetic": {"scaling": [0.5]},
                                                                       "ties": {"scaling": [1.0], "density": [0.2]}},
                            head_cache_dir=str(root / "heads"), batch_size=32, device="cpu", progress=False,
                            search_max_samples=8, test_max_samples=16)
            reports[(name, seed)] = out
    out = tmp_path / "cmp"
    assert main(["compare", "--baseline", str(reports[("a", 0)]), str(reports[("a", 1)]),
                 "--treatment", str(reports[("b", 0)]), str(reports[("b", 1)]), "--baseline-name", "AdamW",
                 "--treatment-name", "ASAM", "--n-boot", "300", "--output", str(out)]) == 0
    saved = json.loads((out / "comparison.json").read_text())
    merged, finetuned = {}, {}
    for (name, seed), path in reports.items():
        res = json.loads((path / "results.json").read_text())
        finetuned.setdefault(name, {})[seed] = {t: bits_to_correctness(b) for t, b in res["individual"]["correct"].items()}
        merged.setdefault(name, {})[seed] = {k: {t: bits_to_correctness(b) for t, b in row["correct"].items()}
                                             for k, row in res["methods"].items()}
    got = saved["effects"]["ASAM"]
    try:
        want = effect_table(merged, finetuned, "a", "b", n_boot=300)
    except ValueError:  # a perturbed model scored 0 on a task: compare reports absolute effects only
        assert saved["notes"] and all(r["normalized"] is None for r in got)
        want = [{"method": r["method"], "absolute": hierarchical_bootstrap(
            *[{s: (finetuned if r["method"] == INDIVIDUAL else {k: {ss: v[r["method"]] for ss, v in by.items()}
                                                               for k, by in merged.items()})[n][s]
               for s in (0, 1)} for n in ("a", "b")], n_boot=300)} for r in got]
    assert [r["method"] for r in got] == [r["method"] for r in want]
    assert got[0]["method"] == INDIVIDUAL and len(got) == 4  # + task arithmetic, TIES, the fixed-alpha ablation
    for g, w in zip(got, want):
        assert g["absolute"]["effect"] == pytest.approx(w["absolute"].effect)
        assert g["absolute"]["ci_low"] == pytest.approx(w["absolute"].ci_low)
        assert g["absolute"]["ci_high"] == pytest.approx(w["absolute"].ci_high)
        assert g["n_seeds"] == 2
    assert (out / "effects_ASAM.png").stat().st_size > 0
    text = (out / "comparison.md").read_text()
    assert "| method | ASAM - AdamW abs (pp) [95% CI] |" in text and "| ties |" in text
    # mismatched seed counts are refused with a clear message
    assert main(["compare", "--baseline", str(reports[("a", 0)]), "--treatment", str(reports[("b", 0)]),
                 str(reports[("b", 1)]), "--output", str(tmp_path / "bad")]) == 2


def test_compare_glue_study_with_itself_is_exactly_zero(glue_runs, tmp_path):
    from saft_hf.evaluation.compare import compare_results, read_results
    from saft_hf.glue.search import run_glue_merge_study

    root, data = glue_runs
    run_glue_merge_study(root / "base", {t: root / "runs" / t for t in GLUE_TASKS}, tmp_path / "study",
                         alphas=[0.5], densities=[0.2], data_paths=data, batch_size=16, device="cpu", progress=False)
    res = read_results([tmp_path / "study"])
    assert res[0]["per_example_excluded"] == {}
    cmp = compare_results({"x": res, "y": res}, n_boot=200)
    for row in cmp["effects"]["y"]:
        assert (row["absolute"].effect, row["absolute"].ci_low, row["absolute"].ci_high) == (0.0, 0.0, 0.0)
        assert all(m.b == 0 and m.c == 0 and m.p_value == 1.0 for m in row["mcnemar"].values())
