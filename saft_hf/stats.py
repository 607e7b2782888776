"""Paired statistics for comparing two fine-tuning methods (e.g. ASAM vs AdamW) on the same test
examples: paired bootstrap confidence intervals (stratified by task, over seeds when several run),
the exact McNemar test, effect-table rows and a forest plot.

Inputs are per-example correctness arrays (0/1 or bool), one per (system, task[, seed]), all on
the same test examples in the same order. Effects are `B - A` in percentage points of the
task-averaged accuracy (every task weighs the same, as in the demo's "avg" columns).

Only numpy is needed here (matplotlib for `forest_plot`, imported lazily); the binomial tail of
McNemar's test is computed exactly with integers, so scipy (a dev dependency) is not required.
See docs/statistics.md for what each number means and its assumptions.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "BootstrapResult", "McNemarResult", "effect_table", "forest_plot", "hierarchical_bootstrap", "markdown_effect_table",
    "mcnemar", "paired_bootstrap", "paired_bootstrap_normalized",
]

_CHUNK = 500  # bootstrap replicates drawn per block: bounds memory, results do not depend on it


@dataclass
class BootstrapResult:
    """Effect (B - A, percentage points) with a percentile confidence interval.

    p_value is the two-sided bootstrap p-value 2 * min(P*(effect <= 0), P*(effect >= 0)) with the
    +1 correction, capped at 1. n_invalid counts replicates dropped because a resampled fine-tuned
    accuracy was 0 (normalized accuracy undefined); it is 0 for absolute accuracy."""

    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    ci: float
    n_boot: int
    n_seeds: int
    n_examples: dict = field(default_factory=dict)  # task -> examples per seed
    accuracy_a: float = float("nan")  # observed task-mean score of A (percent)
    accuracy_b: float = float("nan")
    n_invalid: int = 0
    examples: str = "shared"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class McNemarResult:
    """Exact two-sided McNemar test on paired correctness.

    b = examples A got right and B wrong, c = A wrong and B right; under H0 (same error rate)
    c ~ Binomial(b + c, 1/2). p_value = min(1, 2 * P(X <= min(b, c)))."""

    b: int
    c: int
    p_value: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# validation


def _as_correctness(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array of per-example correctness, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what}: correctness array is empty; every task needs at least one test example")
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what}: correctness must be numeric 0/1 or bool, got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what}: correctness must be 0/1 (or bool); value {arr[i]!r} at index {i}. "
                         "Pass per-example correctness (prediction == label), not scores or labels.")
    return arr.astype(np.float64)


def _as_tasks(x, what: str) -> dict[str, np.ndarray]:
    """A single array means one task named 'all'; a mapping is {task: array}."""
    if isinstance(x, Mapping):
        if not x:
            raise ValueError(f"{what}: no tasks given")
        return {str(t): _as_correctness(v, f"{what}[{t!r}]") for t, v in x.items()}
    return {"all": _as_correctness(x, what)}


def _check_pair(a: dict, b: dict, what_a: str, what_b: str) -> None:
    if set(a) != set(b):
        raise ValueError(f"{what_a} and {what_b} cover different tasks: {sorted(a)} vs {sorted(b)}")
    for t in a:
        if len(a[t]) != len(b[t]):
            raise ValueError(f"task {t!r}: {what_a} has {len(a[t])} examples but {what_b} has {len(b[t])}; "
                             "paired statistics need both systems' correctness on the same test examples, in the same order")


def _check_ci(ci: float, n_boot: int) -> None:
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), e.g. 0.95; got {ci}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


# ---------------------------------------------------------------------------------------------
# the bootstrap engine


def _resample_weights(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """rows x n counts of how often each example is drawn in one resample of size n."""
    idx = rng.integers(0, n, size=(rows, n))
    flat = (idx + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _score(stats: np.ndarray, normalized: bool) -> np.ndarray:
    """stats[..., k]: resampled means of (A, B[, fine-tuned A, fine-tuned B]); returns (score A, score B)."""
    if not normalized:
        return stats[..., 0], stats[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where(stats[..., 2] > 0, stats[..., 0] / stats[..., 2], np.nan),
                np.where(stats[..., 3] > 0, stats[..., 1] / stats[..., 3], np.nan))


def _engine(runs: list[dict[str, np.ndarray]], tasks: list[str], n_boot: int, seed: int, ci: float,
            normalized: bool, examples: str) -> BootstrapResult:
    """runs[s][task] = (n_t, k) matrix whose columns are A, B (and fine-tuned A, B when normalized).

    Each replicate draws S seeds with replacement (skipped when S == 1, so one seed is exactly the
    within-seed bootstrap) and, per task, n_t examples with replacement: one draw shared by every
    seed ("shared": the same test examples in every seed, crossed design) or one draw per drawn
    seed ("nested": each seed has its own test examples). Score = mean over tasks, then over seeds.
    """
    n_seeds = len(runs)
    rng = np.random.default_rng(seed)
    k = runs[0][tasks[0]].shape[1]
    # observed effect
    obs = np.stack([np.stack([runs[s][t].mean(axis=0) for t in tasks]) for s in range(n_seeds)])  # S x T x k
    sa, sb = _score(obs, normalized)
    if normalized and (np.isnan(sa).any() or np.isnan(sb).any()):
        raise ValueError("a fine-tuned accuracy is 0 on some task/seed; normalized accuracy (merged / fine-tuned) is undefined")
    acc_a, acc_b = 100 * float(sa.mean()), 100 * float(sb.mean())
    effect = acc_b - acc_a

    boot = np.empty(n_boot)
    for start in range(0, n_boot, _CHUNK):
        rows = min(_CHUNK, n_boot - start)
        draw = rng.integers(0, n_seeds, size=(rows, n_seeds)) if n_seeds > 1 else np.zeros((rows, 1), dtype=np.int64)
        per_seed = np.zeros((rows, n_seeds, len(tasks), k))  # resampled means at (replicate, seed position, task)
        for ti, t in enumerate(tasks):
            if examples == "shared":
                n = runs[0][t].shape[0]
                w = _resample_weights(rng, rows, n)
                allseeds = np.stack([runs[s][t] for s in range(n_seeds)], axis=1).reshape(n, n_seeds * k)
                means = (w @ allseeds / n).reshape(rows, n_seeds, k)
                per_seed[:, :, ti, :] = np.take_along_axis(means, draw[:, :, None], axis=1)
            else:  # nested: an independent example draw for every drawn seed
                for j in range(n_seeds):
                    for s in range(n_seeds):
                        hit = draw[:, j] == s
                        if not hit.any():
                            continue
                        n = runs[s][t].shape[0]
                        w = _resample_weights(rng, int(hit.sum()), n)
                        per_seed[hit, j, ti, :] = w @ runs[s][t] / n
        ra, rb = _score(per_seed, normalized)
        boot[start:start + rows] = 100 * (rb.mean(axis=(1, 2)) - ra.mean(axis=(1, 2)))

    valid = boot[~np.isnan(boot)]
    n_invalid = int(n_boot - valid.size)
    if valid.size == 0:
        raise ValueError("every bootstrap replicate had a fine-tuned accuracy of 0 on some task; normalized effect undefined")
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(valid, [alpha, 1 - alpha])
    m = valid.size
    p = min(1.0, 2 * min((1 + np.sum(valid <= 0)) / (m + 1), (1 + np.sum(valid >= 0)) / (m + 1)))
    sizes = {t: int(runs[0][t].shape[0]) for t in tasks}
    return BootstrapResult(effect=float(effect), ci_low=float(lo), ci_high=float(hi), p_value=float(p), ci=ci,
                           n_boot=int(n_boot), n_seeds=n_seeds, n_examples=sizes, accuracy_a=acc_a, accuracy_b=acc_b,
                           n_invalid=n_invalid, examples=examples)


def _build_runs(a_by_seed: Mapping, b_by_seed: Mapping, fa_by_seed: Mapping | None, fb_by_seed: Mapping | None,
                examples: str) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    if examples not in ("shared", "nested"):
        raise ValueError(f"examples must be 'shared' (the same test examples in every seed) or 'nested' "
                         f"(each seed has its own test examples), got {examples!r}")
    if not a_by_seed:
        raise ValueError("no seeds given")
    if set(a_by_seed) != set(b_by_seed):
        raise ValueError(f"system A and B were run on different seeds: {sorted(a_by_seed)} vs {sorted(b_by_seed)}")
    normalized = fa_by_seed is not None
    runs, tasks = [], None
    for s in a_by_seed:
        a = _as_tasks(a_by_seed[s], f"A (seed {s})")
        b = _as_tasks(b_by_seed[s], f"B (seed {s})")
        _check_pair(a, b, f"A (seed {s})", f"B (seed {s})")
        cols = [a, b]
        if normalized:
            for name, src in (("fine-tuned A", fa_by_seed), ("fine-tuned B", fb_by_seed)):
                if s not in src:
                    raise ValueError(f"{name} has no entry for seed {s!r}; normalized accuracy needs the fine-tuned "
                                     "correctness of every task for every seed")
                f = _as_tasks(src[s], f"{name} (seed {s})")
                _check_pair(a, f, f"A (seed {s})", f"{name} (seed {s})")
                cols.append(f)
        if tasks is None:
            tasks = list(a)
        elif set(a) != set(tasks):
            raise ValueError(f"seed {s!r} covers tasks {sorted(a)}, another seed covers {sorted(tasks)}; "
                             "every seed must have the same tasks")
        runs.append({t: np.stack([c[t] for c in cols], axis=1) for t in tasks})
    if examples == "shared":
        for t in tasks:
            sizes = {int(r[t].shape[0]) for r in runs}
            if len(sizes) > 1:
                raise ValueError(f"task {t!r} has different numbers of test examples across seeds {sorted(sizes)}; "
                                 "with examples='shared' every seed must be scored on the same test examples "
                                 "(pass examples='nested' if each seed has its own test set)")
    return runs, tasks


def paired_bootstrap(correct_a, correct_b, n_boot: int = 10000, seed: int = 0, ci: float = 0.95) -> BootstrapResult:
    """Paired bootstrap of the accuracy difference B - A (percentage points) within one seed.

    `correct_a`, `correct_b`: 1-D 0/1 arrays on the same examples, or {task: array} for several
    tasks; then examples are resampled within each task (stratified) and the score is the mean
    over tasks of per-task accuracy (tasks weigh equally, whatever their size)."""
    _check_ci(ci, n_boot)
    runs, tasks = _build_runs({0: correct_a}, {0: correct_b}, None, None, "shared")
    return _engine(runs, tasks, int(n_boot), seed, ci, False, "shared")


def paired_bootstrap_normalized(merged_a: Mapping, merged_b: Mapping, finetuned_a: Mapping, finetuned_b: Mapping,
                                n_boot: int = 10000, seed: int = 0, ci: float = 0.95) -> BootstrapResult:
    """Paired bootstrap of the normalized-accuracy difference within one seed.

    Normalized accuracy of a method on task t = merged accuracy / that method's own individually
    fine-tuned accuracy on t; the score is its mean over tasks. All four arrays of a task
    (merged A/B, fine-tuned A/B) are scored on the same test examples, so every replicate uses one
    set of resampled indices for all four: the denominator's sampling noise is correlated with the
    numerator's exactly as in the observed ratio (resampling the fine-tuned accuracy separately, or
    treating it as a constant, would misstate the ratio's variance)."""
    _check_ci(ci, n_boot)
    runs, tasks = _build_runs({0: merged_a}, {0: merged_b}, {0: finetuned_a}, {0: finetuned_b}, "shared")
    return _engine(runs, tasks, int(n_boot), seed, ci, True, "shared")


def hierarchical_bootstrap(runs_a: Mapping, runs_b: Mapping, finetuned_a: Mapping | None = None,
                           finetuned_b: Mapping | None = None, n_boot: int = 10000, seed: int = 0, ci: float = 0.95,
                           examples: str = "shared") -> BootstrapResult:
    """Bootstrap over seeds and test examples: `runs_a[seed]` / `runs_b[seed]` are {task: array}
    (or one array). Each replicate resamples the seeds with replacement, then examples within each
    task; the effect is the mean over seeds of the task-mean difference. With one seed it is exactly
    `paired_bootstrap` (same numbers for the same `seed`).

    examples="shared" (default; the demo scores every seed on the same test set): one example draw
    per replicate is used for all drawn seeds, because the examples are crossed with the seeds, not
    nested in them; drawing them independently per seed would treat the per-example difficulty as
    independent across seeds and understate the test-set part of the variance. examples="nested":
    each seed has its own test examples, drawn independently (classic two-level bootstrap).

    Give `finetuned_a` / `finetuned_b` ({seed: {task: array}}) for the normalized effect."""
    _check_ci(ci, n_boot)
    if (finetuned_a is None) != (finetuned_b is None):
        raise ValueError("give both finetuned_a and finetuned_b (normalized effect) or neither (absolute effect)")
    runs, tasks = _build_runs(runs_a, runs_b, finetuned_a, finetuned_b, examples)
    return _engine(runs, tasks, int(n_boot), seed, ci, finetuned_a is not None, examples)


# ---------------------------------------------------------------------------------------------
# McNemar


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact (integer arithmetic, one rounding at the end)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    total, term = 0, 1  # term = C(n, i)
    for i in range(k + 1):
        total += term
        term = term * (n - i) // (i + 1)
    return total / (1 << n)  # int / int: correctly rounded even for huge integers


def mcnemar(correct_a, correct_b) -> McNemarResult:
    """Exact two-sided McNemar test on paired per-example correctness (1-D arrays, or {task: array}
    which is pooled over tasks: the test counts examples, it is not task-weighted)."""
    a = _as_tasks(correct_a, "correct_a")
    b = _as_tasks(correct_b, "correct_b")
    _check_pair(a, b, "correct_a", "correct_b")
    xa = np.concatenate([a[t] for t in a]).astype(bool)
    xb = np.concatenate([b[t] for t in a]).astype(bool)
    n_b = int(np.sum(xa & ~xb))
    n_c = int(np.sum(~xa & xb))
    p = min(1.0, 2 * _binomial_half_cdf(min(n_b, n_c), n_b + n_c)) if n_b + n_c else 1.0
    return McNemarResult(b=n_b, c=n_c, p_value=float(p), n=int(xa.size))


# ---------------------------------------------------------------------------------------------
# table rows and forest plot

INDIVIDUAL = "individual (fine-tuned)"


def effect_table(merged: Mapping, finetuned: Mapping, baseline: str, treatment: str, n_boot: int = 10000,
                 seed: int = 0, ci: float = 0.95, examples: str = "shared") -> list[dict]:
    """One row per merge method (plus a first row for the individually fine-tuned models) with the
    effect `treatment - baseline`.

    merged:    {fine-tuning method: {seed: {merge method: {task: correctness array}}}}
    finetuned: {fine-tuning method: {seed: {task: correctness array}}}  (each task's own model)

    Row: {"method", "absolute": BootstrapResult, "normalized": BootstrapResult | None (None for the
    fine-tuned row, whose normalized accuracy is 1 by definition), "mcnemar": {seed: McNemarResult},
    "n_seeds"}. The absolute and normalized effects use the same bootstrap seed."""
    for name in (baseline, treatment):
        if name not in merged or name not in finetuned:
            raise KeyError(f"fine-tuning method {name!r} missing: merged has {sorted(merged)}, finetuned has {sorted(finetuned)}")
    seeds = list(merged[baseline])
    if set(seeds) != set(merged[treatment]) or set(seeds) != set(finetuned[baseline]) or set(seeds) != set(finetuned[treatment]):
        raise ValueError(f"{baseline} and {treatment} must have merged and fine-tuned results for the same seeds")
    methods: list[str] = []
    for s in seeds:
        for m in list(merged[baseline][s]) + list(merged[treatment][s]):
            if m not in methods:
                methods.append(m)
    fa = {s: finetuned[baseline][s] for s in seeds}
    fb = {s: finetuned[treatment][s] for s in seeds}
    rows = [{"method": INDIVIDUAL, "n_seeds": len(seeds),
             "absolute": hierarchical_bootstrap(fa, fb, n_boot=n_boot, seed=seed, ci=ci, examples=examples),
             "normalized": None, "mcnemar": {s: mcnemar(fa[s], fb[s]) for s in seeds}}]
    for m in methods:
        missing = [(name, s) for name in (baseline, treatment) for s in seeds if m not in merged[name][s]]
        if missing:
            raise KeyError(f"merge method {m!r} has no results for (fine-tuning method, seed) {missing}")
        ma = {s: merged[baseline][s][m] for s in seeds}
        mb = {s: merged[treatment][s][m] for s in seeds}
        rows.append({
            "method": m, "n_seeds": len(seeds),
            "absolute": hierarchical_bootstrap(ma, mb, n_boot=n_boot, seed=seed, ci=ci, examples=examples),
            "normalized": hierarchical_bootstrap(ma, mb, fa, fb, n_boot=n_boot, seed=seed, ci=ci, examples=examples),
            "mcnemar": {s: mcnemar(ma[s], mb[s]) for s in seeds},
        })
    return rows


def _fmt_effect(r: BootstrapResult | None) -> str:
    if r is None:
        return "-"
    return f"{r.effect:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def markdown_effect_table(rows: Sequence[dict], baseline: str = "A", treatment: str = "B") -> str:
    """The rows of `effect_table` as a Markdown table (effects in percentage points)."""
    ci = rows[0]["absolute"].ci if rows else 0.95
    head = ["method", f"{treatment} - {baseline} abs (pp) [{100 * ci:g}% CI]", f"norm (pp) [{100 * ci:g}% CI]",
            "McNemar p per seed (b/c)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mc = ", ".join(f"{s}: {_fmt_p(m.p_value)} ({m.b}/{m.c})" for s, m in r["mcnemar"].items())
        lines.append(f"| {r['method']} | {_fmt_effect(r['absolute'])} | {_fmt_effect(r['normalized'])} | {mc} |")
    return "\n".join(lines) + "\n"


def forest_plot(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> list[Path]:
    """Forest plot of `effect_table` rows: one row per method, the effect and its CI against a
    vertical line at zero; absolute effect on the left, normalized on the right. Writes
    `<path>.png` and `<path>.svg` (suffix of `path` replaced) atomically; returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io_utils import atomic_path

    if not rows:
        raise ValueError("forest_plot: no rows to draw")
    path = Path(path)
    names = [r["method"] for r in rows]
    y = np.arange(len(rows))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 1.6), sharey=True)
    for ax, kind, label in ((axes[0], "absolute", "absolute accuracy"), (axes[1], "normalized", "normalized accuracy")):
        for yi, r in zip(y, rows):
            res = r.get(kind)
            if res is None:
                continue
            ax.errorbar([res.effect], [yi], xerr=[[res.effect - res.ci_low], [res.ci_high - res.effect]], fmt="o",
                        color="C0" if res.ci_low > 0 or res.ci_high < 0 else "0.3", capsize=3)
        ax.axvline(0.0, color="C3", lw=1, ls="--")
        ci = rows[0]["absolute"].ci
        ax.set_xlabel(f"{label}: effect, pp ({100 * ci:g}% CI)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = []
    try:
        for fmt in ("png", "svg"):
            target = path.with_suffix(f".{fmt}")
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=fmt, dpi=120)
            out.append(target)
    finally:
        plt.close(fig)
    return out
