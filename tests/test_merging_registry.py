"""The merge-method registry: a method and a transform registered from this file alone work in
`saft-hf merge` configs, in coefficient search and in the demo's method list; strict validation
of merge configs (table-driven: config fragment -> error fragment, inputs unchanged, nothing
left behind); finiteness of checkpoints; strict JSON reports."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from saft_hf.cli import main
from saft_hf.merging import merge, merge_finetuned, registry, search_coefficients, task_arithmetic, task_vector
from saft_hf.merging import ties_merging, weighted_average
from saft_hf.merging.registry import MergeMethod, Param, Transform

SHAPES = {"w": (6, 4), "b": (6,), "e": (9, 3)}


def _models(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pre["ids"] = torch.arange(3)
    fts = []
    for _ in range(n):
        ft = {k: pre[k] + 0.1 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
        ft["ids"] = pre["ids"].clone()
        fts.append(ft)
    return pre, fts


@pytest.fixture
def files(tmp_path):
    """pretrained + two fine-tuned checkpoints as .safetensors files."""
    pre, fts = _models()
    save_file(pre, str(tmp_path / "pre.safetensors"))
    for i, ft in enumerate(fts):
        save_file(ft, str(tmp_path / f"ft{i}.safetensors"))
    return tmp_path, pre, fts


def _config(root, **kw):
    cfg = {"pretrained": str(root / "pre.safetensors"),
           "models": [str(root / "ft0.safetensors"), str(root / "ft1.safetensors")], "method": "task_arithmetic"}
    cfg.update(kw)
    return cfg


def _run_cli(tmp_path, cfg, capsys, out_name="out"):
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    out = tmp_path / out_name
    code = main(["merge", str(path), "--output", str(out), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


def _snapshot(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


# ------------------------------------------------------------------ a toy method from this file only
def _toy_kernel(deltas, ctx):
    """gain x the mean of the task deltas."""
    return deltas.mean(0) * ctx.params["gain"]


def _flip(delta, key, task_index, params):
    return -delta if params["odd_only"] is False or task_index % 2 == 1 else delta


@pytest.fixture
def toy():
    registry.register_method(MergeMethod(
        name="toy_mean", description="gain x mean of the task vectors (a test method)",
        params=[Param("gain", "float", 1.0, "multiplies the mean", low=0.0, grid=(0.5, 1.0, 2.0), symbol="g")],
        kernel=_toy_kernel, linear_param="gain", in_study=True, label="toy mean", short_label="toy"))
    registry.register_transform(Transform(
        name="toy_flip", description="negate task vectors (a test transform)",
        params=[Param("odd_only", "bool", False, "negate only tasks with an odd index")], apply=_flip))
    yield
    registry.unregister_method("toy_mean")
    registry.unregister_transform("toy_flip")


def test_toy_method_in_merge_config_cli(files, toy, capsys):
    root, pre, fts = files
    code, out_text, err, out = _run_cli(root, _config(root, method="toy_mean", params={"gain": 0.5}), capsys)
    assert code == 0, err
    merged = load_file(str(out / "model.safetensors"))
    for k in SHAPES:
        expect = pre[k] + ((fts[0][k] - pre[k]) + (fts[1][k] - pre[k])) / 2 * 0.5
        torch.testing.assert_close(merged[k], expect)
    assert torch.equal(merged["ids"], pre["ids"])
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "toy_mean" and report["params"] == {"gain": 0.5}
    assert "`gain`: `0.5`" in (out / "README.md").read_text()
    # a transform registered here composes in front of a built-in method, from the YAML config
    code, _, err, out2 = _run_cli(root, _config(root, params={"scaling": 1.0}, transforms=[{"name": "toy_flip"}]),
                                  capsys, "out2")
    assert code == 0, err
    merged = load_file(str(out2 / "model.safetensors"))
    for k in SHAPES:
        torch.testing.assert_close(merged[k], pre[k] - (fts[0][k] - pre[k]) - (fts[1][k] - pre[k]))
    # --help lists it, with its parameter, generated from the registry
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    assert "toy_mean: gain x mean" in text and "gain (float, [0, inf)" in text and "toy_flip" in text


def test_toy_method_in_search_and_generic_merge(toy):
    pre, fts = _models(2, seed=1)
    tvs = [task_vector(pre, f) for f in fts]
    target = merge("toy_mean", pre, tvs, gain=1.0)

    def evaluate(sd):
        d = sum(float((sd[k] - target[k]).abs().sum()) for k in SHAPES)
        return {"t": 1.0 / (1.0 + d)}

    res = search_coefficients(pre, tvs, evaluate, method="toy_mean", progress=False)
    assert [p.params for p in res.points] == [{"gain": 0.5}, {"gain": 1.0}, {"gain": 2.0}]
    assert res.best_params == {"gain": 1.0} and res.best.score == pytest.approx(1.0)
    assert res.best_merge_config() == {"method": "toy_mean", "params": {"gain": 1.0}, "transforms": []}
    # grid override; the transform's bool takes part in the grid too
    res = search_coefficients(pre, tvs, evaluate, method="toy_mean", transforms=["toy_flip"],
                              grid={"gain": [1.0], "odd_only": [True, False]}, progress=False)
    assert [p.params for p in res.points] == [{"odd_only": True, "gain": 1.0}, {"odd_only": False, "gain": 1.0}]
    flipped = merge("toy_mean", pre, tvs, transforms=[{"name": "toy_flip", "odd_only": False}], gain=1.0)
    torch.testing.assert_close(flipped["w"], pre["w"] - (target["w"] - pre["w"]))


def test_toy_method_in_demo_method_list(toy):
    from saft_hf.demo import report, study

    every = study.StudyConfig(merges=("study",))  # `saft-hf demo --merges study`: every study method
    assert "toy_mean" not in study.MERGES  # the default rows are a fixed list (budget), the toy joins "study"
    row = next(m for m in study.study_methods(every) if m.name == "toy_mean")
    assert row.grid == {"gain": [0.5, 1.0, 2.0]} and row.label == "toy mean (g searched)" and row.short_label == "toy"
    assert report._labels("toy_mean")["plot"] == "toy mean\n(g searched)"
    # the built-in rows keep their order and labels (the demo's table must not change)
    for cfg in (study.StudyConfig(), every):
        keys = [m.name for m in study.study_methods(cfg)]
        assert keys[:4] == ["weighted_average", "task_arithmetic", "task_arithmetic_fixed", "ties"]


def test_toy_method_runs_in_the_study_driver(toy):
    """The shared study driver (demo, vision, GLUE) searches and merges the toy method like a built-in."""
    from saft_hf.evaluation.study import default_study_methods, run_merge_study, search_scores
    from saft_hf.pools import InMemoryModelPool, TaskInfo, TaskPool

    class Pool(TaskPool):  # score of each task: 1 - |w - 0.75|
        family = "toy"
        tasks = ["a", "b"]

        def task_info(self, task):
            return TaskInfo(task, "toy")

        def evaluate(self, model, split="validation", tasks=None, max_examples=None):
            return {t: 1.0 - abs(float(model["w"]) - 0.75) for t in self.check_tasks(tasks)}

        def unlabeled_inputs(self, task, split="validation", max_examples=None):
            yield {}

    methods = default_study_methods()
    assert [m.name for m in methods][-1] == "toy_mean"
    pool = InMemoryModelPool({"w": torch.tensor(0.0)}, {"a": {"w": torch.tensor(0.5)}, "b": {"w": torch.tensor(1.0)}})
    result = run_merge_study(pool, Pool(), [m for m in methods if m.name == "toy_mean"], individual="evaluate",
                             zero_shot=False, progress=False)
    row = result["methods"]["toy_mean"]  # mean delta 0.75 x gain: gain 1.0 is exact
    assert row["params"] == {"gain": 1.0} and row["coefficient"] == 1.0 and row["absolute"] == {"a": 1.0, "b": 1.0}
    assert search_scores(row) == {0.5: 0.625, 1.0: 1.0, 2.0: 0.25}
    assert row["merge_config"] == {"method": "toy_mean", "params": {"gain": 1.0}, "transforms": []}


def test_demo_rows_without_toy_are_the_papers():
    from saft_hf.demo import study

    rows = study.study_methods(study.StudyConfig(fixed_alpha=0.3, merges=("study",)))
    # the paper's rows first, unchanged; then the newer methods (issue 13), each searched on its grid
    # except Model Stock (no coefficient); SLERP only when the study merges exactly two models
    assert [(r.name, r.grid is not None, dict(r.params)) for r in rows][:4] == [
        ("weighted_average", False, {}), ("task_arithmetic", True, {}),
        ("task_arithmetic_fixed", False, {"scaling": 0.3}), ("ties", True, {})]
    assert [r.label for r in rows][:4] == ["weighted average", "task arithmetic (alpha searched)",
                                           "task arithmetic (alpha fixed)", "TIES (lambda searched)"]
    assert [(r.name, r.grid is not None) for r in rows[4:]] == [
        ("della", True), ("breadcrumbs", True), ("tsv_merging", True), ("iso_c", True), ("iso_cts", True),
        ("model_stock", False), ("slerp", True)]  # named by "study"; the driver skips SLERP unless 2 models
    # the default run: the paper's rows, then TSV-M and Iso-C (docs/demo-study.md section 5)
    assert [r.name for r in study.study_methods(study.StudyConfig())] == [
        "weighted_average", "task_arithmetic", "task_arithmetic_fixed", "ties", "tsv_merging", "iso_c"]


def test_registering_twice_or_clashing_names_is_refused(toy):
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method(MergeMethod(name="toy_mean", description="x", params=[], kernel=_toy_kernel))
    with pytest.raises(ValueError, match="transform"):
        registry.register_method(MergeMethod(name="toy_flip", description="x", params=[], kernel=_toy_kernel))
    with pytest.raises(ValueError, match="linear_param"):
        MergeMethod(name="x", description="x", params=[], kernel=_toy_kernel, linear_param="gain")


def test_generic_merge_equals_named_functions():
    pre, fts = _models(3, seed=2)
    tvs = [task_vector(pre, f) for f in fts]
    for a, b in [(merge("task_arithmetic", pre, tvs, scaling=[0.1, 0.5, 0.9]), task_arithmetic(pre, tvs, [0.1, 0.5, 0.9])),
                 (merge("ties", pre, tvs, scaling=0.7, density=0.3), ties_merging(pre, tvs, 0.7, 0.3)),
                 (merge_finetuned("weighted_average", None, fts, weights=[1, 2, 3]), weighted_average(fts, [1, 2, 3]))]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_builtins_are_discovered_in_order():
    assert registry.method_names()[:3] == ["weighted_average", "task_arithmetic", "ties"]
    assert "dare" in registry.transform_names()
    assert {"dare_task_arithmetic", "dare_ties"} <= set(registry.search_names())
    assert registry.get_method("ties").grid() == {"scaling": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0], "density": [0.3, 0.2, 0.1]}


# ------------------------------------------------------------------ strict validation, table-driven
TWO = 2  # models in every config below
REJECTED = [
    # (config fragment, expected fragment of the one-line error)
    ({"params": {"scaling": float("nan")}}, "task_arithmetic scaling must be a finite number"),
    ({"params": {"scaling": float("inf")}}, "must be a finite number, got inf"),
    ({"params": {"scaling": [0.3, float("nan")]}}, "scaling[1] must be a finite number"),
    ({"method": "weighted_average", "params": {"weights": [0.5, float("nan")]}}, "weights[1] must be a finite number"),
    ({"params": {"scaling": "11"}}, "scaling must be a number, got the string '11'"),
    ({"params": {"scaling": "0.4"}}, "scaling must be a number, got the string '0.4'"),
    ({"params": {"scaling": None}}, "task_arithmetic scaling is null"),
    ({"params": {"scaling": True}}, "scaling must be a number, got true"),
    ({"params": {"scaling": [0.1, 0.2, 0.3]}}, "has 3 values but there are 2 task vectors"),
    ({"params": {"scaling": []}}, "scaling is an empty list"),
    ({"method": "weighted_average", "params": {"normalize": "no"}}, "normalize must be true or false"),
    ({"method": "weighted_average", "params": {"weights": [1, -1]}}, "weights sum to 0"),
    ({"method": "weighted_average", "params": {"weights": 0}}, "weights sum to 0"),
    ({"method": "ties", "params": {"density": "0.2"}}, "ties density must be a number, got the string '0.2'"),
    ({"method": "ties", "params": {"density": 1.5}}, "ties density must be in (0, 1], got 1.5"),
    ({"method": "ties", "params": {"density": 0}}, "ties density must be in (0, 1], got 0"),
    ({"method": "ties", "params": {"trim_scope": "per-tensor"}}, "trim_scope must be one of 'global' | 'per_tensor'"),
    ({"method": "ties", "params": {"dencity": 0.2}}, "unknown parameter(s) ['dencity'] for ties; valid: ['density'"),
    ({"method": "magic"}, "unknown merge method 'magic'; choose one of ['weighted_average'"),
    ({"method": ["ties", "task_arithmetic"]}, "method must be one name (a string)"),
    ({"pretrained": ["a", "b"]}, "`pretrained:` must be one path"),
    ({"models": "checkpoints/ft0"}, "`models:` must be a list of fine-tuned checkpoints"),
    ({"models": [{"path": ["a"]}, "b"]}, "models[0].path must be one path"),
    ({"params": ["scaling", 0.4]}, "params for task_arithmetic must be a mapping"),
    ({"dare": {"drop_rate": "half"}}, "dare drop_rate must be a number, got the string 'half'"),
    ({"dare": {"drop_rate": 0.5, "seed": "abc"}}, "dare seed must be an integer, got 'abc'"),
    ({"dare": {"drop_rate": 0.5, "seed": 1.5}}, "dare seed must be an integer, got 1.5"),
    ({"dare": {"seed": 0}}, "dare needs drop_rate"),
    ({"dare": {"drop_rate": 0.5, "rescale": "yes"}}, "dare rescale must be one of true | false | 'inverse'"),
    ({"dare": 0.5}, "`dare:` must be a mapping"),
    ({"transforms": [{"name": "dare", "drop_rate": 1.0}]}, "dare drop_rate must be in [0, 1), got 1"),
    ({"transforms": [{"name": "dropout"}]}, "unknown transform 'dropout'; choose one of ['dare'"),
    ({"transforms": [{"drop_rate": 0.5}]}, "transforms[0] has no `name`"),
    ({"transforms": {"name": "dare"}}, "`transforms:` must be a list"),
    ({"dare": {"drop_rate": 0.5}, "transforms": [{"name": "dare", "drop_rate": 0.1}]}, "DARE is given twice"),
    ({"method": "weighted_average", "dare": {"drop_rate": 0.5}}, "transforms (DARE, ...) apply to task vectors"),
    ({"allow_nonfinite": "yes"}, "allow_nonfinite must be true or false"),
    ({"max_shard_size": True}, "max_shard_size must be a size"),
    ({"scaling": 0.4}, "unknown merge config key(s) ['scaling']"),
]


@pytest.mark.parametrize("fragment,message", REJECTED, ids=[m[:40] for _, m in REJECTED])
def test_bad_config_is_rejected_with_one_line(files, capsys, fragment, message):
    root, _, _ = files
    before = _snapshot(root)
    code, out_text, err, out = _run_cli(root, _config(root, **fragment), capsys)
    assert code == 1
    assert err.startswith("saft-hf merge: error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(".out")]
    after = _snapshot(root)
    del after["cfg.yaml"]
    assert after == before  # inputs unchanged


def test_yaml_spelled_values_are_rejected_as_written(files, capsys):
    """The same checks on YAML text as a user writes it (.nan, quoted numbers, yes/no strings)."""
    root, _, _ = files
    head = f"pretrained: {root / 'pre.safetensors'}\nmodels: [{root / 'ft0.safetensors'}, {root / 'ft1.safetensors'}]\n"
    for body, message in [("params: {scaling: .nan}", "must be a finite number, got nan"),
                          ("params: {scaling: [0.3, .nan]}", "scaling[1] must be a finite number"),
                          ("params: {scaling: '11'}", "got the string '11'"),
                          ("method: weighted_average\nparams: {normalize: 'no'}", "normalize must be true or false"),
                          ("dare: {drop_rate: half}", "got the string 'half'"),
                          ("models: /tmp", "`models:` must be a list")]:
        code, _, err, out = _run_cli(root, head + body + "\n", capsys)
        assert code == 1 and message in err, (body, err)
        assert not out.exists()


# ------------------------------------------------------------------ finiteness of checkpoints
def test_nonfinite_checkpoint_is_refused_naming_model_and_tensor(files, capsys):
    root, pre, fts = files
    bad = dict(fts[1])
    bad["e"] = bad["e"].clone()
    bad["e"][4, 1] = float("nan")
    save_file(bad, str(root / "ft_nan.safetensors"))
    cfg = _config(root, models=[str(root / "ft0.safetensors"), {"path": str(root / "ft_nan.safetensors"), "name": "nanny"}])
    for method in ("task_arithmetic", "ties", "weighted_average"):
        code, _, err, out = _run_cli(root, {**cfg, "method": method}, capsys)
        assert code == 1 and "fine-tuned model nanny: tensor 'e' holds non-finite values" in err, (method, err)
        assert not out.exists()
    inf_pre = dict(pre)
    inf_pre["b"] = pre["b"].clone()
    inf_pre["b"][0] = float("inf")
    save_file(inf_pre, str(root / "pre_inf.safetensors"))
    code, _, err, out = _run_cli(root, _config(root, pretrained=str(root / "pre_inf.safetensors")), capsys)
    assert code == 1 and "pretrained model" in err and "tensor 'b' holds non-finite values" in err
    # allowed explicitly: merged, and the report is still strict JSON
    code, _, err, out = _run_cli(root, {**cfg, "allow_nonfinite": True, "params": {"scaling": 1.0}}, capsys)
    assert code == 0, err

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    report = json.loads((out / "merge_report.json").read_text(), parse_constant=no_constants)
    assert any("allow_nonfinite" in n for n in report["notes"])
    assert math.isnan(float(load_file(str(out / "model.safetensors"))["e"][4, 1]))


def test_nonfinite_task_vector_refused_in_dict_api():
    pre, fts = _models(2)
    tvs = [task_vector(pre, f) for f in fts]
    tvs[0]["w"] = tvs[0]["w"].clone()
    tvs[0]["w"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="task0: tensor 'w' holds non-finite"):
        task_arithmetic(pre, tvs)
    out = merge("task_arithmetic", pre, tvs, allow_nonfinite=True, scaling=1.0)
    assert math.isinf(float(out["w"][0, 0]))


def test_search_rejects_bad_grid_values_and_keys():
    pre, fts = _models(2)
    tvs = [task_vector(pre, f) for f in fts]
    with pytest.raises(ValueError, match="grid scaling must be a finite number"):
        search_coefficients(pre, tvs, lambda sd: {"t": 0.0}, grid={"scaling": [0.1, float("nan")]}, progress=False)
    with pytest.raises(ValueError, match=r"grid keys \['density'\] do not apply to task_arithmetic"):
        search_coefficients(pre, tvs, lambda sd: {"t": 0.0}, grid={"density": [0.1]}, progress=False)
    # a method without a grid is evaluated once, at its defaults
    res = search_coefficients(pre, tvs, lambda sd: {"t": float(sd["w"].sum())}, method="weighted_average", progress=False)
    assert len(res.points) == 1 and res.points[0].params == {} and res.fixed_params == {"normalize": True}


def test_report_and_card_list_params_from_registry(files, capsys):
    root, _, _ = files
    code, _, err, out = _run_cli(root, _config(root, method="ties", params={"scaling": 0.5},
                                               transforms=[{"name": "dare", "drop_rate": 0.2, "seed": 1}]), capsys)
    assert code == 0, err
    report = json.loads((out / "merge_report.json").read_text())
    assert report["params"] == {"scaling": 0.5, "density": 0.2, "trim_scope": "global", "trim_count": "kthvalue",
                                "trim_rescale": "none", "weighting": "mergekit", "sign_method": "sum", "disjoint": "mean",
                                "zero_sign": "majority"}
    assert report["transforms"] == [{"name": "dare", "drop_rate": 0.2, "seed": 1, "rescale": True, "min_norm": 0.0}]
    card = (out / "README.md").read_text()
    assert "`scaling`: `0.5` - lambda" in card and "`density`: `0.2` (default)" in card
    assert "Transform before merging: `dare` (drop_rate=0.2, seed=1, rescale=True, min_norm=0.0)" in card


def test_row_blocks_unless_whole_tensors(monkeypatch):
    """Large tensors reach a kernel in row blocks; `whole_tensors=True` (SVD methods) gets whole ones."""
    from saft_hf.merging import engine

    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 8)
    pre, fts = _models(2, seed=3)
    tvs = [task_vector(pre, f) for f in fts]
    seen = {}

    def kernel(deltas, ctx):
        seen.setdefault(ctx.method.name, set()).add((ctx.key, ctx.rows))
        return deltas.sum(0)

    for whole in (False, True):
        registry.register_method(MergeMethod(name=f"toy_sum_{whole}", description="sum", params=[], kernel=kernel,
                                             whole_tensors=whole))
    try:
        for whole in (False, True):
            out = merge(f"toy_sum_{whole}", pre, tvs)
            torch.testing.assert_close(out["e"], pre["e"] + tvs[0]["e"] + tvs[1]["e"])
        assert ("e", (0, 2)) in seen["toy_sum_False"] and ("e", None) not in seen["toy_sum_False"]
        assert {rows for _, rows in seen["toy_sum_True"]} == {None}
    finally:
        registry.unregister_method("toy_sum_False")
        registry.unregister_method("toy_sum_True")
