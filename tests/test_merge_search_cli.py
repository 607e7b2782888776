"""`saft-hf merge --search` end to end, the task families' MergeData adapters, and data-reading
merges in the merge-study driver (tiny BERT demo tasks, tiny T5 GLUE)."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import yaml

from saft_hf import merging
from saft_hf.cli import main
from saft_hf.demo import model as demo_model
from saft_hf.demo import study as demo_study
from saft_hf.demo.pools import DemoTaskPool

from test_demo_study import _tasks, tiny_model_dir  # noqa: F401  (fixture)

TASKS = ("color", "mood")


# --- the tiny demo: a task pool and two "fine-tuned" encoders on disk ----------------------------


@pytest.fixture(scope="module")
def demo(tiny_model_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("search_demo")
    cfg = demo_study.StudyConfig(model=tiny_model_dir, tasks=TASKS, max_length=16, logit_scale=20.0, max_test=16,
                                 eval_batch_size=8, task_data_override=_tasks(), cache_dir=str(root / "cache"))
    data, _ = demo_study.prepare_tasks(cfg, root / "cache")
    tok = demo_model.load_tokenizer(tiny_model_dir)
    enc = demo_model.load_encoder(tiny_model_dir)
    demo_study.tokenize_tasks(data, tok, cfg)
    heads, _ = demo_study.build_heads(enc, tok, data, cfg)
    pool = DemoTaskPool(enc, heads, {n: td.tokenized for n, td in data.items()}, tok.pad_token_id or 0, 8,
                        progress=False)
    theta0 = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    fts = {}
    for i, t in enumerate(TASKS):
        g = torch.Generator().manual_seed(i + 1)
        fts[t] = {k: (v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
                  for k, v in theta0.items()}
        m = demo_model.load_encoder(tiny_model_dir)
        m.load_state_dict(fts[t])
        m.save_pretrained(root / t)
        tok.save_pretrained(root / t)
    return {"root": root, "pool": pool, "theta0": theta0, "fts": fts, "model_dir": tiny_model_dir}


class CountingPool:
    """A task pool that records every evaluate call's split."""

    def __init__(self, pool):
        self.pool, self.calls = pool, []

    def evaluate(self, state_dict, split="validation", tasks=None, max_examples=None):
        self.calls.append(split)
        return self.pool.evaluate(state_dict, split, tasks, max_examples)

    def merge_data(self):
        return self.pool.merge_data()


@pytest.fixture
def evaluator_module(demo, monkeypatch):
    """`evaluator: search_fixture_evals:make` -> a CountingPool over the demo pool."""
    mod = types.ModuleType("search_fixture_evals")
    made = []

    def make(**args):
        made.append(CountingPool(demo["pool"]))
        return made[-1]

    def plain(**args):  # a plain function evaluator with no test split
        def fn(state_dict, split):
            if split == "test":
                raise KeyError("no test split in this evaluator")
            return demo["pool"].evaluate(state_dict, split)
        return fn

    mod.make, mod.plain, mod.made = make, plain, made
    monkeypatch.setitem(sys.modules, "search_fixture_evals", mod)
    return mod


def _config(demo, tmp_path, **kw):
    cfg = {"pretrained": demo["model_dir"], "models": [{"name": t, "path": str(demo["root"] / t)} for t in TASKS],
           "method": "task_arithmetic", "evaluator": "search_fixture_evals:make"}
    cfg.update(kw)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_search_cli_end_to_end_test_split_evaluated_once(demo, evaluator_module, tmp_path, capsys):
    path = _config(demo, tmp_path, search={"grid": {"scaling": [0.3, 1.0]}})
    out = tmp_path / "merged"
    assert main(["merge", str(path), "--search", "--output", str(out), "--no-progress"]) == 0
    pool = evaluator_module.made[-1]
    assert pool.calls == ["validation", "validation", "test"]  # test only once, after the choice
    report = json.loads((out / "search_report.json").read_text())
    assert [p["params"]["scaling"] for p in report["points"]] == [0.3, 1.0]
    best = max(report["points"], key=lambda p: p["score"])
    assert report["chosen"]["params"] == best["params"]
    scaling = best["params"]["scaling"]
    # the merged model on disk is the chosen point, and the reported test scores are its scores
    merged = merging.task_arithmetic(demo["theta0"], [merging.task_vector(demo["theta0"], demo["fts"][t])
                                                      for t in TASKS], scaling)
    on_disk = demo_model.load_encoder(str(out)).state_dict()
    for k in merged:
        torch.testing.assert_close(on_disk[k], merged[k])
    assert report["test"]["scores"] == demo["pool"].evaluate(merged, "test")
    md = (out / "search_report.md").read_text()
    assert "scaling=0.3" in md and "**yes**" in md and "Test scores of the chosen point" in md
    assert (out / "merge_report.json").exists()
    assert "search: 2 point(s)" in capsys.readouterr().out


def test_search_cli_method_without_grid_is_evaluated_once(demo, evaluator_module, tmp_path):
    path = _config(demo, tmp_path, method="weighted_average")
    out = tmp_path / "merged"
    assert main(["merge", str(path), "--search", "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "search_report.json").read_text())
    assert len(report["points"]) == 1 and "no search grid" in report["notes"][0]
    assert evaluator_module.made[-1].calls == ["validation", "test"]


def test_search_cli_regmean_takes_data_from_the_evaluator_pool(demo, evaluator_module, tmp_path):
    path = _config(demo, tmp_path, method="regmean", params={"examples": 16},
                   search={"grid": {"alpha": [0.5, 0.9]}})
    out = tmp_path / "merged"
    assert main(["merge", str(path), "--search", "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "search_report.json").read_text())
    alpha = report["chosen"]["params"]["alpha"]
    expected = merging.regmean(demo["fts"], demo["pool"].merge_data(), alpha=alpha, examples=16)
    on_disk = demo_model.load_encoder(str(out)).state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(on_disk[key], expected[key])


BAD = [
    ("no evaluator", {"evaluator": None}, "--search needs `evaluator:`"),
    ("bad evaluator spec", {"evaluator": "not a spec"}, "`evaluator:` must be `package.module:function`"),
    ("missing module", {"evaluator": "no_such_module_xyz:make"}, "cannot import module"),
    ("unknown family", {"evaluator": {"family": "audio"}}, "is not a task family"),
    ("bad evaluator keys", {"evaluator": {"fn": "x:y"}}, "`evaluator:` mapping must have"),
    ("bad grid key", {"search": {"grid": {"nope": [1.0]}}}, "grid keys ['nope'] do not apply"),
    ("bad search key", {"search": {"grids": {}}}, "unknown `search:` key"),
    ("test split missing", {"evaluator": "search_fixture_evals:plain"}, "failed on the test split"),
]


@pytest.mark.parametrize("name,override,message", BAD, ids=[b[0] for b in BAD])
def test_search_cli_errors_one_line_exit_1_nothing_left(demo, evaluator_module, tmp_path, capsys, name, override,
                                                      message):
    path = _config(demo, tmp_path, **{"search": {"grid": {"scaling": [0.5]}}, **override})
    out = tmp_path / "merged"
    assert main(["merge", str(path), "--search", "--output", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["merge.yaml"]


# --- the demo adapter equals a direct computation -------------------------------------------------


def test_demo_merge_data_logits_are_the_pool_heads_and_fingerprint_tracks_inputs(demo):
    pool, fts = demo["pool"], demo["fts"]
    data = pool.merge_data()
    assert data.tasks == list(TASKS)
    model = data.model(fts["color"])
    for task in TASKS:
        preds, n = [], 0
        for batch in data.batches(task, "validation"):
            assert "labels" not in batch
            preds.append(data.logits(model, batch, task).argmax(-1))
        labels = torch.tensor(pool.tokenized[task]["validation"].labels)
        acc = float((torch.cat(preds) == labels).float().mean())
        assert acc == pytest.approx(pool.evaluate(fts["color"], "validation", [task])[task])
    fp = data.fingerprint("color", "train")
    assert fp == pool.merge_data().fingerprint("color", "train") != data.fingerprint("color", "validation")
    assert pool.merge_data(max_examples=4).fingerprint("color", "train") != fp
    with pytest.raises(ValueError, match="unknown split"):
        data.fingerprint("color", "dev")


def test_demo_regmean_gram_equals_embeddings_by_hand(demo):
    pool, fts = demo["pool"], demo["fts"]
    data = pool.merge_data()
    n = len(pool.tokenized["color"]["train"])
    out = merging.regmean(fts, data, alpha=0.9, examples=10 ** 6)
    key = "encoder.layer.0.attention.self.query.weight"
    grams, gw = 0, 0
    for t in TASKS:
        m = demo_model.load_encoder(demo["model_dir"])
        m.load_state_dict(fts[t])
        ids = pool.tokenized[t]["train"].input_ids
        x = []
        for s in range(0, len(ids), 8):  # the query layer's input: embeddings of every (padded) token
            b = demo_model.pad_batch(ids[s:s + 8], pool.pad_id)
            with torch.no_grad():
                x.append(m.embeddings(input_ids=b["input_ids"]).reshape(-1, 32).double())
        x = torch.cat(x)
        g = x.T @ x / x.shape[0]  # G_i: the mean of x x^T over the task's rows
        g = 0.9 * g + 0.1 * torch.diag(torch.diag(g))
        grams, gw = grams + g, gw + g @ fts[t][key].double().T
    expected = torch.linalg.solve(grams, gw).T
    torch.testing.assert_close(out[key].double(), expected, rtol=1e-4, atol=1e-5)
    assert n > 8  # several batches


# --- data-reading merges in the study driver ------------------------------------------------------


def test_study_driver_runs_data_reading_methods_with_the_pool_data(demo):
    from saft_hf.evaluation.study import default_study_methods, run_merge_study
    from saft_hf.pools import InMemoryModelPool

    pool, fts = demo["pool"], demo["fts"]
    mp = InMemoryModelPool(demo["theta0"], fts)
    grids = {"regmean": {"alpha": [0.9]}, "adamerging": {"steps": [2]}}
    methods = default_study_methods(["regmean", "fisher_merging", "adamerging"], grids=grids)
    result = run_merge_study(mp, pool, methods, individual="evaluate", zero_shot=False, progress=False)
    assert list(result["methods"]) == ["regmean", "fisher_merging", "adamerging"]
    expected = merging.regmean(fts, pool.merge_data(), alpha=0.9)
    assert result["methods"]["regmean"]["absolute"] == pool.evaluate(expected, "test")
    for row in result["methods"].values():
        assert 0.0 <= row["absolute_mean"] <= 1.0


def test_demo_merges_option():
    from saft_hf.demo.cli import add_arguments, config_from_args
    from saft_hf.merging import registry

    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--merges", "study", "regmean", "adamerging"]))
    names = demo_study.merge_names(cfg.merges)
    assert names == [*registry.method_names(study_only=True), "regmean", "adamerging"]
    assert demo_study.merge_names(("all",)) == registry.method_names()
    assert demo_study.merge_names(None) is None
    with pytest.raises(ValueError, match="unknown merge method"):
        demo_study.merge_names(("regmeen",))
    assert [m.name for m in demo_study.study_methods(cfg) if not m.ablation] == names


# --- GLUE (tiny T5): a family evaluator through the command layer, and the GLUE adapter ------------

GLUE_TASKS = ("sst2", "rte")


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    from saft_hf.testing.glue import tiny_t5, tiny_tokenizer, write_tiny_glue

    root = tmp_path_factory.mktemp("search_glue")
    tok = tiny_tokenizer()
    base = tiny_t5(tok, d_model=16)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    data = {t: str(p) for t, p in write_tiny_glue(root / "data", GLUE_TASKS, train_size=12,
                                                   validation_size=8).items()}
    for k, task in enumerate(GLUE_TASKS):
        torch.manual_seed(k + 1)
        model = tiny_t5(tok, d_model=16)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / task)
        tok.save_pretrained(root / task)
    return root, data


def _glue_config(root, data, tmp_path, **evaluator):
    cfg = {"pretrained": str(root / "base"), "models": [{"name": t, "path": str(root / t)} for t in GLUE_TASKS],
           "method": "task_arithmetic", "search": {"grid": {"scaling": [0.5, 1.0]}},
           "evaluator": {"family": "glue", "data_paths": data, "batch_size": 8, "device": "cpu", **evaluator}}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_search_cli_glue_family_evaluator(glue, tmp_path, capsys):
    from saft_hf.glue.pools import GlueTaskPool

    root, data = glue
    out = tmp_path / "merged"
    path = _glue_config(root, data, tmp_path, test_split="validation")
    assert main(["merge", str(path), "--search", "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "search_report.json").read_text())
    assert report["evaluator"] == "family glue" and len(report["points"]) == 2
    pool = GlueTaskPool(GLUE_TASKS, str(root / "base"), data_paths=data, batch_size=8, device="cpu")
    on_disk = merging.open_source(str(out))
    merged = {k: on_disk.get(k) for k in on_disk.keys()}
    on_disk.close()
    assert report["test"]["scores"] == pool.evaluate(merged, "validation")
    # GLUE hides test labels: without test_split the tiny data has no test split -> one line, nothing written
    out2 = tmp_path / "merged2"
    assert main(["merge", str(_glue_config(root, data, tmp_path)), "--search", "--output", str(out2),
                 "--no-progress"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "saft-hf merge: error:" in line]
    assert len(errors) == 1 and "failed on the test split" in errors[0] and "'test' not in" in errors[0]
    assert not out2.exists()


def test_glue_merge_data_logits_are_first_step_label_word_logits(glue):
    from saft_hf.glue.pools import GlueTaskPool
    from saft_hf.tasks.glue import get_task

    root, data = glue
    pool = GlueTaskPool(GLUE_TASKS, str(root / "base"), data_paths=data, batch_size=8, device="cpu",
                        test_split="validation")
    md = pool.merge_data(max_examples=6)
    state = {k: v.clone() for k, v in pool.model.state_dict().items()}
    model = md.model(state)
    batches = list(md.batches("rte", "train"))
    assert sum(b["input_ids"].shape[0] for b in batches) == 6
    words = [pool.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in get_task("rte").label_words]
    with torch.no_grad():
        got = md.logits(model, batches[0], "rte")
        start = torch.full((batches[0]["input_ids"].shape[0], 1), model.config.decoder_start_token_id)
        full = model(**batches[0], decoder_input_ids=start).logits[:, 0]
    torch.testing.assert_close(got, full[:, words])
    assert md.fingerprint("rte", "train") != md.fingerprint("rte", "validation")
    assert md.fingerprint("rte", "train") == pool.merge_data(max_examples=6).fingerprint("rte", "train")


def test_glue_merge_study_with_merges_option(glue, tmp_path):
    from saft_hf.glue.search import run_glue_merge_study
    from saft_hf.pools import FinetunedScores

    root, data = glue
    for t in GLUE_TASKS:
        FinetunedScores(t, "glue", "accuracy", {"validation": 0.5}, str(root / "base")).write(root / t)
    result = run_glue_merge_study(root / "base", {t: root / t for t in GLUE_TASKS}, tmp_path / "study",
                                  merges=["regmean"], alphas=None, data_paths=data, batch_size=8, device="cpu",
                                  progress=False)
    assert list(result["methods"])[0] == "regmean" and "ties" not in result["methods"]
    assert result["methods"]["regmean"]["search"] is None  # RegMean declares no grid: merged at its defaults
    from saft_hf.glue.pools import GlueTaskPool, glue_model_pool

    mp = glue_model_pool(str(root / "base"), {t: str(root / t) for t in GLUE_TASKS})
    pool = GlueTaskPool(GLUE_TASKS, str(root / "base"), data_paths=data, batch_size=8, device="cpu")
    merged = merging.regmean({t: mp.finetuned_state_dict(t) for t in GLUE_TASKS}, pool.merge_data())
    assert result["methods"]["regmean"]["absolute"] == pool.evaluate(merged, "validation")


# --- vision (tiny CLIP): the adapter and a data-reading merge in the vision study ------------------

VISION_TASKS = ("eurosat", "dtd")


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    from saft_hf.pools import FinetunedScores
    from saft_hf.testing.vision import build_tiny_setup
    from saft_hf.vision.model import load_vision_encoder

    root = tmp_path_factory.mktemp("search_vision")
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


def test_vision_merge_data_logits_are_the_zero_shot_heads(vision):
    from saft_hf.vision.pools import VisionTaskPool

    root, clip, data = vision
    pool = VisionTaskPool(VISION_TASKS, clip, data_paths=data, head_cache_dir=str(root / "heads"), batch_size=16,
                          device="cpu", progress=False)
    md = pool.merge_data(max_examples=16)
    from saft_hf.vision.model import load_vision_encoder

    state = load_vision_encoder(str(root / "runs" / "dtd")).state_dict()
    model = md.model(state)
    ev = pool.evaluator("validation", 16)
    preds, labels = [], []
    for (pixels, y), batch in zip(ev.batches("dtd"), md.batches("dtd", "validation")):
        preds.append(md.logits(model, batch, "dtd").argmax(-1))
        labels.append(y)
    acc = float((torch.cat(preds) == torch.cat(labels)).float().mean())
    assert acc == pytest.approx(pool.evaluate(state, "validation", ["dtd"], 16)["dtd"])
    assert sum(b["pixel_values"].shape[0] for b in md.batches("dtd", "train")) == 16
    fp = md.fingerprint("dtd", "train")
    assert fp and fp != md.fingerprint("eurosat", "train")


def test_vision_study_cli_runs_regmean_with_merges_option(vision, tmp_path, capsys):
    root, clip, data = vision
    out = tmp_path / "study"
    rc = main(["evaluate", "vision", "--merge-study", *[str(root / "runs" / t) for t in VISION_TASKS],
               "--output-dir", str(out), "--base-model", clip, "--tasks", *VISION_TASKS,
               "--data", *[f"{t}={data[t]}" for t in VISION_TASKS], "--head-cache-dir", str(root / "heads"),
               "--merges", "regmean", "--max-samples", "16", "--search-max-samples", "16", "--device", "cpu",
               "--batch-size", "16"])
    assert rc == 0
    report = json.loads((out / "merge_study.json").read_text())
    assert "regmean" in report["methods"] and "ties" not in report["methods"]
