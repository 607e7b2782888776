"""saft_hf.stats: McNemar against scipy, bootstrap coverage, determinism, stratification,
normalized and hierarchical variants, validation, table rows and the forest plot."""

import numpy as np
import pytest

from saft_hf import stats

scipy_stats = pytest.importorskip("scipy.stats")


def _pair(rng, n, pa, pb, rho=0.5):
    """Correlated paired correctness with P(A right)=pa, P(B right)=pb (a shared latent difficulty)."""
    u = rng.random(n)
    shared = rng.random(n) < rho
    va = np.where(shared, u, rng.random(n))
    vb = np.where(shared, u, rng.random(n))
    return (va < pa).astype(int), (vb < pb).astype(int)


# ------------------------------------------------------------------ McNemar
def test_mcnemar_matches_scipy_binomtest_on_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(1, 400))
        a = rng.integers(0, 2, n)
        b = np.where(rng.random(n) < rng.random(), a, rng.integers(0, 2, n))
        res = stats.mcnemar(a, b)
        assert res.b == int(np.sum((a == 1) & (b == 0))) and res.c == int(np.sum((a == 0) & (b == 1)))
        if res.b + res.c == 0:
            assert res.p_value == 1.0
            continue
        expected = scipy_stats.binomtest(res.c, res.b + res.c, 0.5, alternative="two-sided").pvalue
        assert res.p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_exact_small_and_large_counts():
    # b=0, c=6: p = 2 * 0.5**6
    a = np.array([0] * 6 + [1] * 4)
    b = np.array([1] * 6 + [1] * 4)
    res = stats.mcnemar(a, b)
    assert (res.b, res.c) == (0, 6) and res.p_value == pytest.approx(2 * 0.5 ** 6, rel=1e-12)
    # large discordant counts stay exact (no float overflow of 2**n)
    a = np.r_[np.ones(1500), np.zeros(1700)].astype(int)
    res = stats.mcnemar(a, 1 - a)
    assert res.p_value == pytest.approx(scipy_stats.binomtest(1500, 3200, 0.5).pvalue, rel=1e-9)


def test_mcnemar_pools_tasks():
    a = {"x": [1, 1, 0], "y": [0, 0]}
    b = {"x": [0, 1, 1], "y": [1, 1]}
    res = stats.mcnemar(a, b)
    assert (res.b, res.c, res.n) == (1, 3, 5)


# ------------------------------------------------------------------ bootstrap basics
def test_identical_arrays_give_zero_effect_and_degenerate_ci():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 200)
    res = stats.paired_bootstrap(a, a.copy(), n_boot=500)
    assert res.effect == 0.0 and res.ci_low == 0.0 and res.ci_high == 0.0 and res.p_value == 1.0
    norm = stats.paired_bootstrap_normalized({"t": a}, {"t": a}, {"t": a}, {"t": a}, n_boot=200)
    assert (norm.effect, norm.ci_low, norm.ci_high) == (0.0, 0.0, 0.0)


def test_effect_is_b_minus_a_in_points_and_deterministic_with_seed():
    a = np.array([1, 0, 0, 1, 0, 1, 0, 0, 1, 0])
    b = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 0])
    r1 = stats.paired_bootstrap(a, b, n_boot=2000, seed=7)
    r2 = stats.paired_bootstrap(a, b, n_boot=2000, seed=7)
    r3 = stats.paired_bootstrap(a, b, n_boot=2000, seed=8)
    assert r1.effect == pytest.approx(30.0)
    assert (r1.accuracy_a, r1.accuracy_b) == (pytest.approx(40.0), pytest.approx(70.0))
    assert r1 == r2
    assert r1.ci_low >= 0  # B is never worse on any example: every resample has effect >= 0
    rng = np.random.default_rng(0)
    a, b = _pair(rng, 500, 0.6, 0.65)
    r1, r3 = stats.paired_bootstrap(a, b, n_boot=2000, seed=7), stats.paired_bootstrap(a, b, n_boot=2000, seed=8)
    assert r1 == stats.paired_bootstrap(a, b, n_boot=2000, seed=7)
    assert (r1.ci_low, r1.ci_high) != (r3.ci_low, r3.ci_high) and r1.effect == r3.effect


def test_p_value_reflects_no_effect():
    rng = np.random.default_rng(3)
    a, b = _pair(rng, 300, 0.7, 0.7, rho=0.3)
    res = stats.paired_bootstrap(a, b, n_boot=2000)
    assert res.ci_low < res.effect < res.ci_high
    # the p-value agrees with whether the CI contains 0
    assert (res.p_value < 0.05) == (res.ci_low > 0 or res.ci_high < 0)


def test_bootstrap_ci_covers_true_difference_at_nominal_rate():
    """200 simulated paired datasets (3 tasks x 150 examples): the 95% CI holds the true
    difference (4 points) in about 95% of them. Wrong quantiles or unpaired resampling would miss."""
    rng = np.random.default_rng(2024)
    true = 100 * (0.74 - 0.70)
    hits, widths = 0, []
    for i in range(200):
        a, b = {}, {}
        for t in ("t1", "t2", "t3"):
            a[t], b[t] = _pair(rng, 150, 0.70, 0.74, rho=0.6)
        res = stats.paired_bootstrap(a, b, n_boot=400, seed=i)
        hits += res.ci_low <= true <= res.ci_high
        widths.append(res.ci_high - res.ci_low)
    coverage = hits / 200
    assert 0.90 <= coverage <= 0.99, coverage
    # the paired CI is narrower than an unpaired one would be (correlation 0.6 is exploited)
    unpaired_sd = 100 * np.sqrt((0.7 * 0.3 + 0.74 * 0.26) / 150 / 3)
    assert np.mean(widths) < 0.85 * (2 * 1.96 * unpaired_sd)


def test_stratified_resampling_keeps_each_task_whole():
    # task x: B always right, A always wrong (effect 100); task y: identical (effect 0); sizes differ.
    # Within-task resampling gives exactly 50 in every replicate; pooled resampling would not.
    a = {"x": np.zeros(10, int), "y": np.r_[np.ones(50), np.zeros(50)].astype(int)}
    b = {"x": np.ones(10, int), "y": a["y"].copy()}
    res = stats.paired_bootstrap(a, b, n_boot=1000)
    assert res.effect == pytest.approx(50.0)
    assert res.ci_low == pytest.approx(50.0) and res.ci_high == pytest.approx(50.0)
    assert res.n_examples == {"x": 10, "y": 100}
    # tasks weigh equally: pooled accuracy would give 100 * 10/110
    assert res.accuracy_b == pytest.approx(100 * (1 + 0.5) / 2)


def test_normalized_uses_each_methods_own_finetuned_accuracy_on_same_indices():
    rng = np.random.default_rng(5)
    n = 200
    fa = (rng.random(n) < 0.9).astype(int)
    fb = (rng.random(n) < 0.8).astype(int)
    ma = fa * (rng.random(n) < 0.8)  # merged is right only where fine-tuned is right
    mb = fb * (rng.random(n) < 0.9)
    res = stats.paired_bootstrap_normalized({"t": ma}, {"t": mb}, {"t": fa}, {"t": fb}, n_boot=2000)
    expected = 100 * (mb.mean() / fb.mean() - ma.mean() / fa.mean())
    assert res.effect == pytest.approx(expected)
    assert res.ci_low < expected < res.ci_high
    # same indices for numerator and denominator: a merged model equal to its fine-tuned model
    # has normalized accuracy exactly 1 in every replicate
    same = stats.paired_bootstrap_normalized({"t": fa}, {"t": fb}, {"t": fa}, {"t": fb}, n_boot=500)
    assert (same.effect, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)


def test_normalized_with_zero_finetuned_accuracy_is_refused():
    z = np.zeros(5, int)
    with pytest.raises(ValueError, match="fine-tuned accuracy is 0"):
        stats.paired_bootstrap_normalized({"t": z}, {"t": z}, {"t": z}, {"t": z + 1}, n_boot=10)


# ------------------------------------------------------------------ seeds
def test_hierarchical_with_one_seed_is_the_within_seed_bootstrap():
    rng = np.random.default_rng(9)
    a = {t: rng.integers(0, 2, 80) for t in "pq"}
    b = {t: rng.integers(0, 2, 80) for t in "pq"}
    assert stats.hierarchical_bootstrap({0: a}, {0: b}, n_boot=800, seed=4) == stats.paired_bootstrap(a, b, n_boot=800, seed=4)
    f = {t: np.ones(80, int) for t in "pq"}
    h = stats.hierarchical_bootstrap({0: a}, {0: b}, {0: f}, {0: f}, n_boot=800, seed=4)
    assert h == stats.paired_bootstrap_normalized(a, b, f, f, n_boot=800, seed=4)


def test_hierarchical_bootstrap_adds_seed_variance():
    rng = np.random.default_rng(11)
    n = 300
    base = rng.integers(0, 2, n)
    runs_a, runs_b = {}, {}
    for s, shift in enumerate((-0.25, 0.0, 0.25)):  # the seed matters a lot for B
        runs_a[s] = {"t": base}
        runs_b[s] = {"t": np.where(rng.random(n) < 0.5 + shift, 1, base)}
    h = stats.hierarchical_bootstrap(runs_a, runs_b, n_boot=1500)
    one = stats.paired_bootstrap(runs_a[1]["t"], runs_b[1]["t"], n_boot=1500)
    assert h.n_seeds == 3
    assert (h.ci_high - h.ci_low) > 2 * (one.ci_high - one.ci_low)
    pooled_effect = np.mean([100 * (runs_b[s]["t"].mean() - base.mean()) for s in range(3)])
    assert h.effect == pytest.approx(pooled_effect)


def test_shared_examples_are_not_understated_like_nested():
    # The same (identical) per-example outcomes in every seed: only the test set varies. The
    # shared design keeps the one-seed width; the nested one wrongly shrinks it by ~sqrt(3).
    rng = np.random.default_rng(12)
    a, b = _pair(rng, 400, 0.6, 0.65, rho=0.2)
    runs_a = {s: {"t": a} for s in range(3)}
    runs_b = {s: {"t": b} for s in range(3)}
    one = stats.paired_bootstrap(a, b, n_boot=3000)
    shared = stats.hierarchical_bootstrap(runs_a, runs_b, n_boot=3000)
    nested = stats.hierarchical_bootstrap(runs_a, runs_b, n_boot=3000, examples="nested")
    w = lambda r: r.ci_high - r.ci_low  # noqa: E731
    assert w(shared) == pytest.approx(w(one), rel=0.1)
    assert w(nested) < 0.75 * w(one)


def test_nested_design_accepts_different_test_sets_per_seed():
    rng = np.random.default_rng(1)
    runs_a = {0: {"t": rng.integers(0, 2, 50)}, 1: {"t": rng.integers(0, 2, 70)}}
    runs_b = {0: {"t": rng.integers(0, 2, 50)}, 1: {"t": rng.integers(0, 2, 70)}}
    with pytest.raises(ValueError, match="examples='nested'"):
        stats.hierarchical_bootstrap(runs_a, runs_b, n_boot=10)
    res = stats.hierarchical_bootstrap(runs_a, runs_b, n_boot=200, examples="nested")
    assert res.ci_low <= res.effect <= res.ci_high


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("a,b,match", [
    ([1, 0, 1], [1, 0], "same test examples"),
    ([1, 2, 0], [1, 0, 0], "must be 0/1"),
    ([0.5, 1, 0], [1, 0, 0], "must be 0/1"),
    ([], [], "empty"),
    ({"x": [1, 0]}, {"y": [1, 0]}, "different tasks"),
    ({}, {}, "no tasks"),
    (np.ones((2, 3)), np.ones((2, 3)), "1-D"),
    (["a", "b"], [1, 0], "numeric 0/1"),
])
def test_invalid_inputs_are_named(a, b, match):
    with pytest.raises(ValueError, match=match):
        stats.paired_bootstrap(a, b, n_boot=10)
    if match not in ("no tasks",):
        with pytest.raises(ValueError, match=match):
            stats.mcnemar(a, b)


def test_invalid_options():
    with pytest.raises(ValueError, match="ci must be in"):
        stats.paired_bootstrap([1], [1], ci=95)
    with pytest.raises(ValueError, match="n_boot"):
        stats.paired_bootstrap([1], [1], n_boot=0)
    with pytest.raises(ValueError, match="different seeds"):
        stats.hierarchical_bootstrap({0: [1]}, {1: [1]}, n_boot=5)
    with pytest.raises(ValueError, match="examples must be"):
        stats.hierarchical_bootstrap({0: [1]}, {0: [1]}, n_boot=5, examples="crossed")
    with pytest.raises(ValueError, match="both finetuned_a and finetuned_b"):
        stats.hierarchical_bootstrap({0: [1]}, {0: [1]}, finetuned_a={0: [1]}, n_boot=5)


def test_bool_arrays_are_accepted():
    res = stats.paired_bootstrap(np.array([True, False]), np.array([True, True]), n_boot=50)
    assert res.effect == pytest.approx(50.0)


# ------------------------------------------------------------------ table + plot
def _study(rng, seeds=(0, 1)):
    tasks = ("t1", "t2")
    merged, finetuned = {}, {}
    for method, p_ft, p_m in (("adamw", 0.85, 0.70), ("asam", 0.84, 0.76)):
        merged[method], finetuned[method] = {}, {}
        for s in seeds:
            finetuned[method][s] = {t: (rng.random(120) < p_ft).astype(int) for t in tasks}
            merged[method][s] = {m: {t: (rng.random(120) < p_m).astype(int) for t in tasks} for m in ("task_arithmetic", "ties")}
    return merged, finetuned


def test_effect_table_rows_and_markdown(tmp_path):
    merged, finetuned = _study(np.random.default_rng(0))
    rows = stats.effect_table(merged, finetuned, baseline="adamw", treatment="asam", n_boot=300)
    assert [r["method"] for r in rows] == [stats.INDIVIDUAL, "task_arithmetic", "ties"]
    assert rows[0]["normalized"] is None and set(rows[0]["mcnemar"]) == {0, 1}
    ta = rows[1]
    expected = stats.hierarchical_bootstrap({s: merged["adamw"][s]["task_arithmetic"] for s in (0, 1)},
                                            {s: merged["asam"][s]["task_arithmetic"] for s in (0, 1)}, n_boot=300)
    assert ta["absolute"] == expected
    assert ta["mcnemar"][1] == stats.mcnemar(merged["adamw"][1]["task_arithmetic"], merged["asam"][1]["task_arithmetic"])
    assert ta["normalized"].n_seeds == 2
    text = stats.markdown_effect_table(rows, "adamw", "asam")
    assert "asam - adamw abs" in text and "| task_arithmetic |" in text and text.count("\n") == 5
    png, svg = stats.forest_plot(rows, tmp_path / "forest.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and svg.read_text().lstrip().startswith("<?xml")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_effect_table_missing_method_is_named():
    merged, finetuned = _study(np.random.default_rng(0), seeds=(0,))
    del merged["asam"][0]["ties"]
    with pytest.raises(KeyError, match="'ties'"):
        stats.effect_table(merged, finetuned, "adamw", "asam", n_boot=10)
    with pytest.raises(KeyError, match="'sam'"):
        stats.effect_table(merged, finetuned, "adamw", "sam", n_boot=10)


def test_stats_needs_neither_scipy_nor_torch():
    import subprocess
    import sys

    code = ("import sys, saft_hf.stats as s; s.mcnemar([1, 0], [0, 0]); s.paired_bootstrap([1, 0], [1, 1], n_boot=5); "
            "print(sorted(m for m in ('scipy', 'torch', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
