"""RegMean, Fisher merging and AdaMerging against naive dense implementations of their papers'
equations (written here, independently of saft_hf.merging), on a tiny MLP and tiny random data;
the statistics cache (memory and disk); the YAML `data:` source."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from saft_hf import merging
from saft_hf.merging import MergeData, registry
from saft_hf.merging.data import split_batch
from saft_hf.merging.methods.regmean import gram_statistics
from saft_hf.merging.plan import MergePlan

D_IN, D_HID, C = 4, 6, 3
TASKS = ("a", "b", "c")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_HID)
        self.fc2 = nn.Linear(D_HID, C)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def build(sd) -> MLP:
    m = MLP().double()
    m.load_state_dict(sd)
    return m.eval()


class ToyData(MergeData):
    """Per task: n examples of D_IN features in batches of 4; counts the passes over the data."""

    def __init__(self, tasks=TASKS, n=12, seed=0, zero_feature=None, fingerprint=None):
        g = torch.Generator().manual_seed(seed)
        self.tasks = list(tasks)
        self.x = {t: torch.randn(n, D_IN, generator=g, dtype=torch.float64) for t in self.tasks}
        if zero_feature is not None:
            for x in self.x.values():
                x[:, zero_feature] = 0.0
        self.passes = []
        self._fingerprint = fingerprint

    def model(self, state_dict):
        return build(state_dict)

    def batches(self, task, split):
        self.passes.append((task, split))
        x = self.x[task]
        for i in range(0, len(x), 4):
            yield {"x": x[i:i + 4]}

    def logits(self, model, batch, task):
        return model(batch["x"])

    def fingerprint(self, task, split):
        return self._fingerprint


def models(n=3, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    theta0 = {k: v.detach().clone() for k, v in MLP().double().state_dict().items()}
    fts = {}
    for t in TASKS[:n]:
        fts[t] = {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in theta0.items()}
    return theta0, fts


# --- naive references ---------------------------------------------------------------------------


def fc1_inputs(data, task, examples):
    return data.x[task][:examples]


def fc2_inputs(sd, x):
    return torch.tanh(x @ sd["fc1.weight"].T + sd["fc1.bias"])


def naive_regmean_weight(inputs, weights, alpha):
    """W^T = (sum G_i)^-1 sum G_i W_i^T, G_i = X_i^T X_i / n_i with off-diagonals times alpha."""
    grams = []
    for x in inputs:
        g = x.T @ x / x.shape[0]
        g = alpha * g + (1 - alpha) * torch.diag(torch.diag(g))
        grams.append(g)
    rhs = sum(g @ w.T for g, w in zip(grams, weights))
    return torch.linalg.solve(sum(grams), rhs).T


def lstsq_merge(inputs, weights):
    """argmin_W sum_i (1/n_i) ||X_i W^T - X_i W_i^T||^2 (min-norm around the mean if rank deficient)."""
    mean = torch.stack(weights).mean(0)
    a = torch.cat([x / x.shape[0] ** 0.5 for x in inputs])
    b = torch.cat([x @ (w - mean).T / x.shape[0] ** 0.5 for x, w in zip(inputs, weights)])
    sol = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return mean + sol.T


# --- protocol -----------------------------------------------------------------------------------


def test_split_batch_slices_tensors_in_dicts_and_tuples():
    batch = {"x": torch.arange(6).view(3, 2), "mask": torch.ones(3, 5), "scale": torch.tensor(2.0), "tag": "t"}
    parts = split_batch(batch)
    assert len(parts) == 3 and parts[1]["x"].tolist() == [[2, 3]] and parts[2]["mask"].shape == (1, 5)
    assert parts[0]["scale"] is batch["scale"] and parts[0]["tag"] == "t"
    assert [p[0].tolist() for p in split_batch((torch.arange(2), torch.zeros(2, 1)))] == [[0], [1]]
    with pytest.raises(ValueError, match="split_batch"):
        split_batch({"tag": "no tensors"})


def test_registry_refuses_collect_without_needs_data():
    with pytest.raises(ValueError, match="needs_data"):
        registry.MergeMethod(name="bad", description="", params=[], kernel=lambda d, c: d[0], collect=lambda *a: {})
    with pytest.raises(ValueError, match="data_params"):
        registry.MergeMethod(name="bad", description="", params=[], kernel=lambda d, c: d[0], needs_data=True,
                             data_params=("nope",))
    for name in ("regmean", "fisher_merging", "adamerging"):
        assert registry.get_method(name).needs_data


def test_data_methods_refuse_missing_or_wrong_data():
    theta0, fts = models()
    with pytest.raises(ValueError, match="reads each task's inputs"):
        merging.merge_finetuned("regmean", None, fts)
    with pytest.raises(TypeError, match="lacks logits"):
        merging.merge_finetuned("regmean", None, fts, data=type("D", (), {"tasks": list(TASKS), "model": build,
                                                                          "batches": lambda s, t, sp: []})())
    with pytest.raises(ValueError, match="does not read data"):
        merging.merge("task_arithmetic", theta0, [merging.task_vector(theta0, fts["a"])], data=ToyData())
    with pytest.raises(ValueError, match="2 model"):
        merging.regmean({"a": fts["a"], "b": fts["b"]}, ToyData())  # 3 tasks in the data, 2 models, other names


# --- RegMean ------------------------------------------------------------------------------------


def test_gram_statistics_equal_xtx_by_hand():
    theta0, fts = models()
    data = ToyData()
    plan = MergePlan(keys=list(theta0), passthrough=[])
    stats = gram_statistics(build(fts["b"]), "b", data, plan, examples=8, split="train")
    x = data.x["b"][:8]  # two whole batches of 4
    assert int(stats["examples"]) == 8 and int(stats["rows:fc1.weight"]) == 8
    torch.testing.assert_close(stats["gram:fc1.weight"].double(), x.T @ x, rtol=1e-5, atol=1e-6)
    h = fc2_inputs(fts["b"], x)
    torch.testing.assert_close(stats["gram:fc2.weight"].double(), h.T @ h, rtol=1e-5, atol=1e-6)
    assert "gram:fc1.bias" not in stats
    # the last batch is used whole, like the reference code: 9 examples requested -> 12 read
    assert int(gram_statistics(build(fts["b"]), "b", data, plan, 9, "train")["examples"]) == 12


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.5])
def test_regmean_equals_closed_form_regression(alpha):
    theta0, fts = models()
    data = ToyData()
    report = {}
    out = merging.regmean(fts, data, pretrained=theta0, alpha=alpha, examples=12, report=report)
    xs = [fc1_inputs(data, t, 12) for t in TASKS]
    hs = [fc2_inputs(fts[t], x) for t, x in zip(TASKS, xs)]
    for key, inputs in (("fc1.weight", xs), ("fc2.weight", hs)):
        ws = [fts[t][key] for t in TASKS]
        expected = naive_regmean_weight(inputs, ws, alpha)
        torch.testing.assert_close(out[key], expected, rtol=1e-5, atol=1e-6)
        if alpha == 1.0:  # the merged least-squares problem
            torch.testing.assert_close(out[key], lstsq_merge(inputs, ws), rtol=1e-5, atol=1e-6)
    for key in ("fc1.bias", "fc2.bias"):  # not linear weights: averaged
        torch.testing.assert_close(out[key], torch.stack([fts[t][key] for t in TASKS]).mean(0))
    assert report["regmean"]["regression_tensors"] == 2 and report["regmean"]["pseudo_inverse_tensors"] == []
    # the reference model does not matter (it only anchors the deltas)
    without = merging.regmean(fts, data, alpha=alpha, examples=12)
    for k in out:
        torch.testing.assert_close(without[k], out[k], rtol=1e-6, atol=1e-7)


def test_regmean_rank_deficient_gram_uses_pseudo_inverse_with_mean_in_null_space():
    theta0, fts = models()
    data = ToyData(zero_feature=1)  # input feature 1 is always 0: sum of Grams is singular for any alpha
    report = {}
    out = merging.regmean(fts, data, alpha=0.9, examples=12, report=report)
    assert report["regmean"]["pseudo_inverse_tensors"] == ["fc1.weight"]
    assert torch.isfinite(out["fc1.weight"]).all()
    ws = [fts[t]["fc1.weight"] for t in TASKS]
    # the column of the unreached input keeps the average of the models
    torch.testing.assert_close(out["fc1.weight"][:, 1], torch.stack(ws).mean(0)[:, 1])
    # elsewhere: the regression solution restricted to the reached features
    keep = [0, 2, 3]
    reduced = naive_regmean_weight([data.x[t][:, keep] for t in TASKS], [w[:, keep] for w in ws], 0.9)
    torch.testing.assert_close(out["fc1.weight"][:, keep], reduced, rtol=1e-5, atol=1e-6)
    # alpha = 1 and fewer rows than features: the min-norm least-squares solution around the mean
    few = ToyData(n=2)
    out1 = merging.regmean(fts, few, alpha=1.0, examples=2)
    torch.testing.assert_close(out1["fc1.weight"], lstsq_merge([few.x[t] for t in TASKS], ws), rtol=1e-5, atol=1e-6)


def test_regmean_single_task_and_zero_task_vectors():
    theta0, fts = models()
    data = ToyData(tasks=["a"])
    out = merging.regmean({"a": fts["a"]}, data, pretrained=theta0)
    for k in theta0:
        torch.testing.assert_close(out[k], fts["a"][k])
    same = {t: {k: v.clone() for k, v in theta0.items()} for t in TASKS}
    out = merging.regmean(same, ToyData(), pretrained=theta0, alpha=0.5)
    for k in theta0:
        torch.testing.assert_close(out[k], theta0[k])


def test_statistics_cached_in_memory_and_recomputed_when_data_params_change():
    theta0, fts = models()
    data = ToyData()
    merging.regmean(fts, data, alpha=0.9, examples=8)
    assert len(data.passes) == 3
    report = {}
    merging.regmean(fts, data, alpha=0.5, examples=8, report=report)  # alpha does not change the Grams
    assert len(data.passes) == 3
    assert [s["source"] for s in report["data"]["statistics"]] == ["memory cache"] * 3
    merging.regmean(fts, data, alpha=0.5, examples=12)  # more examples: new statistics
    assert len(data.passes) == 6
    changed = {t: {k: v + 0.01 for k, v in sd.items()} for t, sd in fts.items()}
    merging.regmean(changed, data, alpha=0.5, examples=12)  # other weights: new statistics
    assert len(data.passes) == 9
    other = ToyData()
    merging.regmean(fts, other, examples=8)  # another data object: its own cache
    assert len(other.passes) == 3


# --- Fisher merging -----------------------------------------------------------------------------


def naive_fisher(sd, x):
    """1/N sum_n sum_y p(y|x_n) (d log p(y|x_n) / d theta)^2 from the full Jacobian (torch.func)."""
    model = build(sd)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logp(p, xn):
        return torch.log_softmax(torch.func.functional_call(model, p, (xn[None],))[0], -1)

    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for xn in x:
        jac = torch.func.jacrev(logp)(params, xn)  # {name: [C, *shape]}
        probs = logp(params, xn).exp()
        for k in total:
            total[k] += (probs.view(-1, *[1] * (jac[k].dim() - 1)) * jac[k] ** 2).sum(0)
    return {k: v / len(x) for k, v in total.items()}


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_merging_equals_hand_formula(normalize):
    theta0, fts = models()
    data = ToyData()
    eps, weights = 1e-6, [1.0, 2.0, 0.5]
    out = merging.fisher_merging(fts, data, pretrained=theta0, weights=weights, epsilon=eps, normalize=normalize,
                                 examples=10)
    fishers = [naive_fisher(fts[t], data.x[t][:10]) for t in TASKS]
    coeffs = list(weights)
    if normalize:
        norms = [torch.sqrt(sum((f ** 2).sum() for f in fi.values())) for fi in fishers]
        coeffs = [w / n for w, n in zip(weights, norms)]
    for k in theta0:
        num = sum(c * fi[k].clamp(min=eps) * fts[t][k] for c, fi, t in zip(coeffs, fishers, TASKS))
        den = sum(c * fi[k].clamp(min=eps) for c, fi in zip(coeffs, fishers))
        torch.testing.assert_close(out[k], num / den, rtol=1e-5, atol=1e-7)


def test_fisher_floor_gives_weighted_average_where_fisher_vanishes_and_single_task():
    theta0, fts = models()
    data = ToyData()
    out = merging.fisher_merging(fts, data, epsilon=1e3, normalize=False, weights=[1.0, 1.0, 2.0])
    for k in theta0:  # every Fisher entry is below the floor: the weighted average of the models
        expected = (fts["a"][k] + fts["b"][k] + 2 * fts["c"][k]) / 4
        torch.testing.assert_close(out[k], expected)
    one = merging.fisher_merging({"a": fts["a"]}, ToyData(tasks=["a"]))
    for k in theta0:
        torch.testing.assert_close(one[k], fts["a"][k])


def test_fisher_sampled_estimator_is_close_to_exact_in_expectation():
    theta0, fts = models(n=1)
    data = ToyData(tasks=["a"], n=400)
    plan = MergePlan(keys=list(theta0), passthrough=[])
    from saft_hf.merging.methods.fisher_merging import fisher_statistics

    exact = fisher_statistics(build(fts["a"]), "a", data, plan, 400, "train", "exact", 0)
    sampled = fisher_statistics(build(fts["a"]), "a", data, plan, 400, "train", "sample", 0)
    hand = naive_fisher(fts["a"], data.x["a"][:50])
    small = fisher_statistics(build(fts["a"]), "a", data, plan, 50, "train", "exact", 0)
    torch.testing.assert_close(small["fisher:fc2.weight"].double(), hand["fc2.weight"], rtol=1e-4, atol=1e-8)
    e, s = exact["fisher:fc2.weight"], sampled["fisher:fc2.weight"]
    assert float((s - e).abs().sum() / e.abs().sum()) < 0.25  # Monte Carlo over 400 examples


# --- AdaMerging ---------------------------------------------------------------------------------


def entropy_loss(theta0, taus, lam, data, batches, layer_keys=None):
    """sum over tasks and batches of the mean prediction entropy of theta0 + sum_t lam_t tau_t
    (lam[k] per key if layer_keys), built as an ordinary model with load_state_dict."""
    sd = {}
    for i, k in enumerate(theta0):
        coeff = lam[i] if layer_keys else lam
        sd[k] = theta0[k] + sum(float(c) * tau[k] for c, tau in zip(coeff, taus))
    model = build(sd)
    total = 0.0
    for task, xs in batches.items():
        for x in xs:
            with torch.no_grad():
                logp = torch.log_softmax(model(x), -1)
            total += float(-(logp.exp() * logp).sum(-1).mean())
    return total


def fd_grad(f, lam, h=1e-5):
    lam = torch.as_tensor(lam, dtype=torch.float64)
    g = torch.zeros_like(lam)
    for idx in range(lam.numel()):
        e = torch.zeros_like(lam).view(-1)
        e[idx] = h
        e = e.view(lam.shape)
        g.view(-1)[idx] = (f(lam + e) - f(lam - e)) / (2 * h)
    return g


def adam_by_hand(grads, lam0, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = torch.zeros_like(lam0)
    v = torch.zeros_like(lam0)
    lam = lam0.clone()
    for step, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        lam = lam - lr * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps)
    return lam


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_two_steps_match_adam_on_hand_gradient(granularity):
    theta0, fts = models(n=2)
    taus = [merging.task_vector(theta0, fts[t]) for t in ("a", "b")]
    data = ToyData(tasks=["a", "b"], n=8)  # 2 batches per task: step 1 reads batch 0, step 2 batch 1
    lr = 0.01
    report = {}
    merging.adamerging(theta0, {"a": taus[0], "b": taus[1]}, data, granularity=granularity, lr=lr, steps=2,
                       batches_per_step=1, report=report)
    coeffs = report["adamerging"]["coefficients"]
    layer = granularity == "layer"
    lam0 = torch.full((len(theta0), 2) if layer else (2,), 0.3, dtype=torch.float64)
    grads, lam = [], lam0
    for step in range(2):
        batches = {t: [data.x[t][4 * step:4 * step + 4]] for t in ("a", "b")}
        g = fd_grad(lambda l: entropy_loss(theta0, taus, l, data, batches, layer), lam)
        grads.append(g)
        lam = adam_by_hand(grads, lam0, lr)
    got = torch.tensor([[coeffs[k][t] for t in ("a", "b")] for k in theta0] if layer else
                       [coeffs[t] for t in ("a", "b")], dtype=torch.float64)
    torch.testing.assert_close(got, lam, rtol=0, atol=2e-6)
    losses = report["adamerging"]["entropy_per_step"]
    first = {t: [data.x[t][:4]] for t in ("a", "b")}
    assert losses[0] == pytest.approx(entropy_loss(theta0, taus, lam0, data, first, layer), rel=1e-5)


def test_adamerging_lowers_entropy_and_returns_the_learned_merge():
    theta0, fts = models(n=2)
    taus = {t: merging.task_vector(theta0, fts[t]) for t in ("a", "b")}
    data = ToyData(tasks=["a", "b"], n=8)
    report = {}
    out = merging.adamerging(theta0, taus, data, granularity="task", lr=0.05, steps=30, report=report)
    lam = report["adamerging"]["coefficients"]
    every = {t: [data.x[t][:4], data.x[t][4:]] for t in ("a", "b")}
    before = entropy_loss(theta0, list(taus.values()), [0.3, 0.3], data, every)
    after = entropy_loss(theta0, list(taus.values()), [lam["a"], lam["b"]], data, every)
    assert after < before - 1e-3
    assert all(0.0 <= v <= 1.0 for v in lam.values()) and lam != {"a": 0.3, "b": 0.3}
    for k in theta0:  # the returned state dict is theta0 + sum lambda_t tau_t with the reported lambdas
        torch.testing.assert_close(out[k], theta0[k] + lam["a"] * taus["a"][k] + lam["b"] * taus["b"][k])


def test_adamerging_ties_base_uses_trimmed_sign_resolved_vectors_and_zero_vectors():
    theta0, fts = models(n=2)
    taus = {t: merging.task_vector(theta0, fts[t]) for t in ("a", "b")}
    data = ToyData(tasks=["a", "b"], n=8)
    report = {}
    out = merging.adamerging(theta0, taus, data, granularity="task", base="ties", density=0.5, steps=0,
                             report=report)
    # steps=0: the coefficients stay at init; TIES at lambda 0.3 with sum-disjoint merge = AdaMerging++ start
    ties = merging.ties_merging(theta0, list(taus.values()), scaling=0.3, density=0.5, disjoint="sum")
    for k in theta0:
        torch.testing.assert_close(out[k], ties[k])
    zero = {t: {k: torch.zeros_like(v) for k, v in theta0.items()} for t in ("a", "b")}
    out = merging.adamerging(theta0, zero, data, steps=3)
    for k in theta0:
        torch.testing.assert_close(out[k], theta0[k])


# --- on disk: YAML data source and statistics cache beside the checkpoints ---------------------


def _save(sd, directory):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"))


DATA_MODULE = '''
from tests.test_merging_data_methods import ToyData

PASSES = []

def make(fingerprint="toy-v1"):
    data = ToyData(fingerprint=fingerprint)
    data.passes = PASSES
    return data
'''


def test_yaml_data_source_and_disk_cache(tmp_path, monkeypatch):
    theta0, fts = models()
    for t in TASKS:
        _save(fts[t], tmp_path / t)
    _save(theta0, tmp_path / "base")
    (tmp_path / "toy_merge_data.py").write_text(textwrap.dedent(DATA_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_merge_data", raising=False)
    cfg = {"pretrained": str(tmp_path / "base"), "models": [{"name": t, "path": str(tmp_path / t)} for t in TASKS],
           "method": "regmean", "params": {"alpha": 0.7, "examples": 8}, "data": "toy_merge_data:make"}

    with pytest.raises(ValueError, match="add `data: package.module:function`"):
        merging.MergeConfig.from_dict({k: v for k, v in cfg.items() if k != "data"})
    with pytest.raises(ValueError, match="does not read data"):
        merging.MergeConfig.from_dict({**cfg, "method": "ties", "params": {}})
    with pytest.raises(ValueError, match="package.module:function"):
        merging.MergeConfig.from_dict({**cfg, "data": "not a callable spec"})

    report = merging.merge_models(cfg, tmp_path / "out1", progress=False)
    import toy_merge_data

    assert len(toy_merge_data.PASSES) == 3
    assert [s["source"] for s in report["data"]["statistics"]] == ["computed"] * 3
    cached = sorted((tmp_path / "a" / ".saft_merge_stats").glob("regmean-*.safetensors"))
    assert len(cached) == 1
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "out1" / "model.safetensors"))
    expected = merging.regmean(fts, ToyData(), pretrained=theta0, alpha=0.7, examples=8)
    for k in theta0:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-6, atol=1e-7)

    # a new process would find the statistics on disk: a fresh data object reads no data
    report = merging.merge_models({**cfg, "params": {"alpha": 0.3, "examples": 8}}, tmp_path / "out2", progress=False)
    assert len(toy_merge_data.PASSES) == 3
    assert [s["source"] for s in report["data"]["statistics"]] == ["disk cache"] * 3
    saved = json.loads((tmp_path / "out2" / "merge_report.json").read_text())
    assert saved["regmean"]["examples"] == [8, 8, 8]

    # other data (fingerprint) or other weights invalidate the cache
    cfg_v2 = {**cfg, "data": {"callable": "toy_merge_data:make", "args": {"fingerprint": "toy-v2"}}}
    merging.merge_models(cfg_v2, tmp_path / "out3", progress=False)
    assert len(toy_merge_data.PASSES) == 6
    _save({k: v + 0.01 for k, v in fts["a"].items()}, tmp_path / "a")
    report = merging.merge_models(cfg, tmp_path / "out4", progress=False)
    assert [s["source"] for s in report["data"]["statistics"]] == ["computed", "disk cache", "disk cache"]


# --- a tiny BERT (HF model, dict batches with attention masks) ----------------------------------


class BertData(MergeData):
    """Sequence classification with a tiny BertModel: logits = a fixed per-task head on [CLS]."""

    def __init__(self, tasks=("a", "b")):
        from transformers import BertConfig

        self.config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=16)
        g = torch.Generator().manual_seed(5)
        self.tasks = list(tasks)
        self.inputs = {}
        for t in self.tasks:
            ids = torch.randint(1, 30, (6, 5), generator=g)
            mask = torch.ones_like(ids)
            mask[::2, 3:] = 0  # padded examples
            self.inputs[t] = {"input_ids": ids * mask, "attention_mask": mask}
        self.heads = {t: torch.randn(3, 8, generator=g) for t in self.tasks}

    def model(self, state_dict):
        from transformers import BertModel

        m = BertModel(self.config, add_pooling_layer=False)
        m.load_state_dict(state_dict)
        return m.eval()

    def batches(self, task, split):
        x = self.inputs[task]
        for i in range(0, 6, 3):
            yield {k: v[i:i + 3] for k, v in x.items()}

    def logits(self, model, batch, task):
        return model(**batch).last_hidden_state[:, 0] @ self.heads[task].T


def bert_models():
    from transformers import BertModel

    data = BertData()
    torch.manual_seed(0)
    theta0 = {k: v.clone() for k, v in BertModel(data.config, add_pooling_layer=False).state_dict().items()}
    g = torch.Generator().manual_seed(9)
    fts = {t: {k: (v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
               for k, v in theta0.items()} for t in data.tasks}
    return data, theta0, fts


def test_tiny_bert_regmean_query_layer_equals_naive_formula_and_others_run():
    data, theta0, fts = bert_models()
    out = merging.regmean(fts, data, pretrained=theta0, alpha=0.9, examples=6)
    key = "encoder.layer.0.attention.self.query.weight"
    inputs = []
    for t in data.tasks:  # the query layer's input: the embeddings output of model t, every token
        m = data.model(fts[t])
        with torch.no_grad():
            h = m.embeddings(input_ids=data.inputs[t]["input_ids"])
        inputs.append(h.reshape(-1, 8).double())
    expected = naive_regmean_weight(inputs, [fts[t][key].double() for t in data.tasks], 0.9)
    torch.testing.assert_close(out[key].double(), expected, rtol=1e-4, atol=1e-5)
    bias = "encoder.layer.0.attention.self.query.bias"
    torch.testing.assert_close(out[bias], (fts["a"][bias] + fts["b"][bias]) / 2)
    fisher = merging.fisher_merging(fts, data, examples=4, estimator="sample")
    ada = merging.adamerging(theta0, {t: merging.task_vector(theta0, fts[t]) for t in data.tasks}, data, steps=2)
    for merged in (fisher, ada):
        assert set(merged) == set(theta0) and all(torch.isfinite(v).all() for v in merged.values()
                                                  if v.is_floating_point())


def test_adamerging_from_yaml_reports_learned_coefficients(tmp_path, monkeypatch):
    theta0, fts = models(n=2)
    for t in ("a", "b"):
        _save(fts[t], tmp_path / t)
    _save(theta0, tmp_path / "base")
    (tmp_path / "toy_ada_data.py").write_text(
        "from tests.test_merging_data_methods import ToyData\n\ndef make():\n    return ToyData(tasks=['a', 'b'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {"pretrained": str(tmp_path / "base"), "models": [{"name": t, "path": str(tmp_path / t)} for t in "ab"],
           "method": "adamerging", "params": {"granularity": "task", "steps": 3, "lr": 0.01},
           "data": "toy_ada_data:make"}
    merging.merge_models(cfg, tmp_path / "out", progress=False)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    lam = report["adamerging"]["coefficients"]
    assert set(lam) == {"a", "b"} and len(report["adamerging"]["entropy_per_step"]) == 3
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in theta0:
        expected = theta0[k] + lam["a"] * (fts["a"][k] - theta0[k]) + lam["b"] * (fts["b"][k] - theta0[k])
        torch.testing.assert_close(merged[k], expected)


def test_search_coefficients_over_regmean_alpha_reads_data_once():
    theta0, fts = models()
    data = ToyData()
    taus = {t: merging.task_vector(theta0, fts[t]) for t in TASKS}
    seen = []

    def evaluate(sd):
        seen.append(float(sd["fc1.weight"].sum()))
        return {"a": -abs(seen[-1])}

    result = merging.search_coefficients(theta0, taus, evaluate, method="regmean", grid={"alpha": [0.2, 1.0]},
                                         data=data, progress=False)
    assert len(result.points) == 2 and len(data.passes) == 3 and seen[0] != seen[1]


class ConvMLP(nn.Module):
    """fc1 as an HF Conv1D (weight stored (in, out), like GPT-2), fc2 an nn.Linear."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc1 = Conv1D(D_HID, D_IN)
        self.fc2 = nn.Linear(D_HID, C)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_row_blocks_and_conv1d_layout_give_the_same_merge(monkeypatch):
    from saft_hf.merging import engine

    torch.manual_seed(3)
    theta0 = {k: v.detach().double().clone() for k, v in ConvMLP().state_dict().items()}
    g = torch.Generator().manual_seed(4)
    fts = {t: {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in theta0.items()}
           for t in TASKS}

    class ConvData(ToyData):
        def model(self, state_dict):
            m = ConvMLP().double()
            m.load_state_dict(state_dict)
            return m.eval()

    data = ConvData()
    whole = {"regmean": merging.regmean(fts, data, alpha=0.8),
             "fisher": merging.fisher_merging(fts, data, examples=6),
             "ada": merging.adamerging(theta0, {t: merging.task_vector(theta0, fts[t]) for t in TASKS}, data,
                                       steps=2, lr=0.01)}
    # Conv1D: W (in, out) = (sum G_i)^-1 sum G_i W_i
    grams = [data.x[t].T @ data.x[t] / 12 for t in TASKS]
    grams = [0.8 * g_ + 0.2 * torch.diag(torch.diag(g_)) for g_ in grams]
    expected = torch.linalg.solve(sum(grams), sum(g_ @ fts[t]["fc1.weight"] for g_, t in zip(grams, TASKS)))
    torch.testing.assert_close(whole["regmean"]["fc1.weight"], expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 8)  # every weight now arrives in row blocks
    blocks = {"regmean": merging.regmean(fts, data, alpha=0.8),
              "fisher": merging.fisher_merging(fts, data, examples=6),
              "ada": merging.adamerging(theta0, {t: merging.task_vector(theta0, fts[t]) for t in TASKS}, data,
                                        steps=2, lr=0.01)}
    for name in whole:
        for k in theta0:
            torch.testing.assert_close(blocks[name][k], whole[name][k], rtol=1e-6, atol=1e-9)
