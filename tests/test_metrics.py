"""Offline metric functions (saft_hf.metrics): hand-computed cases and cross-checks with sklearn/scipy."""
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from saft_hf.metrics import (
    accuracy,
    compute_metrics,
    f1_binary,
    matthews_corrcoef,
    pearson,
    rankdata_average,
    spearman,
)


def test_hand_computed_binary_case():
    pred, ref = [1, 0, 1, 1], [1, 1, 1, 0]
    # TP=2 (rows 0, 2), FN=1 (row 1), FP=1 (row 3), TN=0
    assert accuracy(pred, ref) == pytest.approx(0.5)
    assert f1_binary(pred, ref) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (0 - 1) / sqrt(3*3*1*1)
    assert matthews_corrcoef(pred, ref) == pytest.approx(-1 / 3)


def test_hand_computed_correlations_with_ties():
    assert rankdata_average(np.array([10, 20, 20, 30])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert rankdata_average(np.array([3.0, 1.0, 2.0, 1.0])).tolist() == [4.0, 1.5, 3.0, 1.5]
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # monotone but not linear: Spearman 1, Pearson < 1
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.99


def test_degenerate_inputs_follow_glue_conventions():
    # constant predictions: correlation undefined -> 0.0 (sklearn's MCC convention), never NaN
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    # no positive anywhere: F1 is 0.0 (sklearn's zero_division=0)
    assert f1_binary([0, 0], [0, 0]) == 0.0
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_and_scipy_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = 200
    ref = rng.integers(0, 3, n)
    # -1 plays the "unparseable generation" class, as GLUE evaluation produces it
    pred = np.where(rng.random(n) < 0.6, ref, rng.integers(-1, 3, n))
    assert accuracy(pred, ref) == pytest.approx(skm.accuracy_score(ref, pred))
    assert matthews_corrcoef(pred, ref) == pytest.approx(skm.matthews_corrcoef(ref, pred))
    bref, bpred = (ref > 0).astype(int), np.where(pred == -1, -1, (pred > 0).astype(int))
    assert f1_binary(bpred, bref) == pytest.approx(skm.f1_score(bref, bpred == 1))
    assert matthews_corrcoef(bpred, bref) == pytest.approx(skm.matthews_corrcoef(bref, bpred))
    x = np.round(rng.uniform(0, 5, n) * 5) / 5  # STS-B-like grid with many ties
    y = np.clip(x + rng.normal(0, 1, n), 0, 5)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    assert rankdata_average(x) == pytest.approx(stats.rankdata(x))


def test_compute_metrics_and_errors():
    out = compute_metrics(["accuracy", "f1"], [1, 0], [1, 1])
    assert out == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    with pytest.raises(KeyError, match="unknown metric"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(ValueError, match="equal length"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="zero examples"):
        accuracy([], [])
