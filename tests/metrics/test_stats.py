"""DeLong's test (fast algorithm) against the O(m n) structural-components definition, and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from medvox.metrics.stats import delong_ci, delong_test, fast_delong, paired_bootstrap_auc


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def slow_delong(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) by definition: V10, V01 from every positive/negative pair, then S10/m + S01/n."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    v10 = np.array([[np.mean([_psi(s[i], s[j]) for j in neg]) for i in pos] for s in scores])
    v01 = np.array([[np.mean([_psi(s[i], s[j]) for i in pos]) for j in neg] for s in scores])
    aucs = v10.mean(axis=1)
    s10 = np.array([[np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1) for b in range(len(scores))]
                    for a in range(len(scores))])
    s01 = np.array([[np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1) for b in range(len(scores))]
                    for a in range(len(scores))])
    return aucs, s10 / m + s01 / n


@pytest.fixture
def two_models(rng):
    """60 cases, model A informative, model B weaker and correlated with A, scores rounded to make ties."""
    y = (rng.random(60) < 0.4).astype(int)
    a = np.round(y * 1.2 + rng.normal(size=60), 1)
    b = np.round(0.5 * a + y * 0.3 + rng.normal(size=60), 1)
    return y, a, b


def test_fast_delong_equals_the_structural_components_definition(two_models):
    y, a, b = two_models
    c = np.round(-a + np.linspace(0, 1, 60), 1)  # a third model, anti-correlated
    aucs, cov = fast_delong(y, [a, b, c])
    ref_aucs, ref_cov = slow_delong(y, [a, b, c])
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    assert cov[0, 1] > 0 and cov[0, 2] < 0  # the correlation structure is captured, not only the variances


def test_delong_auc_equals_sklearn_with_ties(two_models):
    y, a, b = two_models
    result = delong_test(y, a, b)
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)


def test_z_and_p_follow_from_the_reference_covariance(two_models):
    y, a, b = two_models
    ref_aucs, ref_cov = slow_delong(y, [a, b])
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    z = (ref_aucs[0] - ref_aucs[1]) / np.sqrt(var)
    result = delong_test(y, a, b)
    assert result["z"] == pytest.approx(z, rel=1e-9)
    assert result["p_value"] == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-9)
    assert result["n"] == 60 and result["n_pos"] == int(y.sum())


def test_identical_predictions_give_p_one(two_models):
    y, a, _ = two_models
    result = delong_test(y, a, a.copy())
    assert result["diff"] == 0 and result["z"] == 0 and result["p_value"] == 1.0


def test_a_clearly_better_model_is_significant(rng):
    y = np.repeat([0, 1], 100)
    good = y * 3.0 + rng.normal(size=200)
    weak = y * 0.3 + rng.normal(size=200)
    result = delong_test(y, good, weak)
    assert result["auc_a"] > 0.95 and result["auc_b"] < 0.7
    assert result["z"] > 5 and result["p_value"] < 1e-6
    assert result["ci95_diff"][0] > 0
    assert delong_test(y, weak, good)["z"] == pytest.approx(-result["z"])  # antisymmetric


def test_p_values_are_calibrated_under_the_null(rng):
    """Two equally good, correlated models: about 5 % of tests reject at 0.05."""
    rejections = 0
    for _ in range(400):
        y = (rng.random(120) < 0.5).astype(int)
        shared = rng.normal(size=120)
        a = y + shared + rng.normal(size=120)
        b = y + shared + rng.normal(size=120)
        rejections += delong_test(y, a, b)["p_value"] < 0.05
    assert 0.02 <= rejections / 400 <= 0.09


def test_delong_ci_covers_the_auc(two_models):
    y, a, _ = two_models
    lo, hi = delong_ci(y, a)
    assert lo < roc_auc_score(y, a) < hi and 0 <= lo and hi <= 1


def test_paired_bootstrap_agrees_with_delong(two_models):
    y, a, b = two_models
    boot = paired_bootstrap_auc(y, a, b, n_boot=2000, seed=1)
    delong = delong_test(y, a, b)
    assert boot["diff"] == pytest.approx(delong["diff"], abs=1e-12)
    assert boot["ci"][0] < boot["diff"] < boot["ci"][1]
    width, delong_width = boot["ci"][1] - boot["ci"][0], delong["ci95_diff"][1] - delong["ci95_diff"][0]
    assert 0.7 < width / delong_width < 1.3
    assert paired_bootstrap_auc(y, a, b, n_boot=200, seed=1) == paired_bootstrap_auc(y, a, b, n_boot=200, seed=1)


def test_paired_bootstrap_multiclass_uses_the_macro_auc(rng):
    y = rng.integers(0, 3, size=90)
    pa = rng.dirichlet(np.ones(3), size=90) + np.eye(3)[y]
    pa /= pa.sum(1, keepdims=True)
    pb = rng.dirichlet(np.ones(3), size=90)
    out = paired_bootstrap_auc(y, pa, pb, n_boot=300)
    assert out["metric"] == "macro_ovr_auc"
    expected = roc_auc_score(y, pa, multi_class="ovr") - roc_auc_score(y, pb, multi_class="ovr")
    assert out["diff"] == pytest.approx(expected, abs=1e-12)
    assert out["ci"][0] > 0


@pytest.mark.parametrize("labels, message", [([0, 0, 0, 0], "both positive and negative"),
                                             ([0, 1, 2, 1], "binary labels")])
def test_bad_labels_raise(labels, message):
    with pytest.raises(ValueError, match=message):
        delong_test(labels, [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])


def test_score_length_must_match():
    with pytest.raises(ValueError, match="one per label"):
        fast_delong([0, 1, 0, 1], [[0.1, 0.2, 0.3]])


def test_wilson_interval_matches_the_textbook_value_and_edges():
    from medvox.metrics.stats import wilson_ci

    assert wilson_ci(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)  # Wilson (1927) / Newcombe (1998)
    lo, hi = wilson_ci(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_ci(0, 0) is None


def test_metric_intervals_count_what_each_proportion_rests_on():
    from medvox.metrics.stats import delong_ci, metric_intervals

    y = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.2, 0.6, 0.3, 0.8, 0.4, 0.9, 0.2, 0.7, 0.35])
    pred = (p1 >= 0.5).astype(int)
    got = metric_intervals(y, np.c_[1 - p1, p1], pred)
    assert (got["sensitivity"]["k"], got["sensitivity"]["n"]) == (3, 4)
    assert (got["specificity"]["k"], got["specificity"]["n"]) == (5, 6)
    assert (got["precision"]["k"], got["precision"]["n"]) == (3, 4)
    assert (got["accuracy"]["k"], got["accuracy"]["n"]) == (8, 10)
    assert got["accuracy"]["ci"] == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert got["auc"]["ci"] == delong_ci(y, p1) and got["auc"]["method"] == "DeLong"
