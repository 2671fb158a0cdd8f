import numpy as np
import pytest
import torch

from delve import metrics
from delve.metrics import (
    STATMAP,
    compute_cov_determinant,
    compute_cov_trace,
    compute_diag_trace,
    compute_effective_rank,
    compute_intrinsic_dimensionality,
    compute_participation_ratio,
    compute_saturation,
    compute_spectrum,
    layer_statistics,
)
from tests.reference import np_stats


def random_cov(d, rank, seed):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((d, rank)) * np.linspace(3, 0.1, rank)
    return basis @ basis.T


@pytest.mark.parametrize("thresh", [0.5, 0.9, 0.99, 0.999, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_scalar_stats_match_numpy(thresh, seed):
    # Full rank, so that every threshold (1.0 included) has one unambiguous answer.
    cov = random_cov(12, 12, seed)
    rows = np.random.default_rng(seed).multivariate_normal(np.zeros(12), cov, size=400)
    ref = np_stats(rows, thresh)
    cov = ref["cov"]
    assert compute_intrinsic_dimensionality(cov, thresh) == ref["idim"]
    assert compute_saturation(torch.from_numpy(cov), thresh) == pytest.approx(ref["lsat"])
    assert compute_cov_trace(cov) == pytest.approx(ref["trc"], rel=1e-12)
    assert compute_diag_trace(cov) == pytest.approx(ref["dtrc"], rel=1e-9)
    assert compute_cov_determinant(cov) == pytest.approx(ref["det"], rel=1e-6, abs=1e-300)


def test_idim_rule_is_the_documented_one():
    # Eigenvalues 6, 3, 1: cumulative ratios 0.6, 0.9, 1.0. The smallest k reaching the
    # threshold, including equality (the old release answered one less here).
    cov = np.diag([1.0, 6.0, 3.0])
    assert compute_intrinsic_dimensionality(cov, 0.6) == 1
    assert compute_intrinsic_dimensionality(cov, 0.61) == 2
    assert compute_intrinsic_dimensionality(cov, 0.9) == 2
    assert compute_intrinsic_dimensionality(cov, 0.95) == 3
    assert compute_intrinsic_dimensionality(cov, 1.0) == 3
    assert compute_saturation(cov, 0.9) == pytest.approx(2 / 3)


def test_threshold_one_gives_the_rank():
    cov = random_cov(10, 4, 3)  # rank 4; rounding leaves ~1e-16 eigenvalues behind
    assert compute_intrinsic_dimensionality(cov, 1.0) == 4


def test_degenerate_covariances():
    zero = np.zeros((4, 4))
    assert compute_intrinsic_dimensionality(zero) == 0
    assert compute_saturation(zero) == 0
    assert compute_effective_rank(zero) == 0
    assert compute_participation_ratio(zero) == 0
    # Negative eigenvalues from rounding are clamped to 0.
    nearly_psd = np.diag([2.0, -1e-12, 1.0])
    assert compute_diag_trace(nearly_psd) == pytest.approx(3.0)
    assert compute_cov_determinant(nearly_psd) == 0.0
    assert compute_intrinsic_dimensionality(nearly_psd, 0.99) == 2


def test_spectrum_effective_rank_participation_ratio():
    cov = random_cov(9, 5, 11)
    eig = np.clip(np.sort(np.linalg.eigvalsh(cov))[::-1], 0, None)
    np.testing.assert_allclose(compute_spectrum(cov, 3), eig[:3], rtol=1e-10)
    np.testing.assert_allclose(compute_spectrum(np.eye(2), 4), [1, 1, 0, 0])
    p = eig / eig.sum()
    p = p[p > 0]
    assert compute_effective_rank(cov) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert compute_participation_ratio(cov) == pytest.approx(eig.sum() ** 2 / (eig**2).sum(), rel=1e-9)


def test_all_stats_from_one_eigendecomposition(monkeypatch):
    calls = {"eigvalsh": 0, "eigh": 0}
    real_eigvalsh, real_eigh = torch.linalg.eigvalsh, torch.linalg.eigh

    def eigvalsh(x):
        calls["eigvalsh"] += 1
        return real_eigvalsh(x)

    def eigh(x):
        calls["eigh"] += 1
        return real_eigh(x)

    monkeypatch.setattr(metrics.torch.linalg, "eigvalsh", eigvalsh)
    monkeypatch.setattr(metrics.torch.linalg, "eigh", eigh)
    rows = np.random.default_rng(2).multivariate_normal(np.zeros(6), random_cov(6, 6, 2), size=200)
    ref = np_stats(rows)
    cov = ref["cov"]
    scalar = [s for s in STATMAP if s != "embed"]
    first = layer_statistics(cov, scalar)
    assert calls == {"eigvalsh": 1, "eigh": 0}
    second = layer_statistics(cov, scalar + ["embed"], samples=torch.from_numpy(rows[:5]), mean=torch.zeros(6))
    assert calls == {"eigvalsh": 1, "eigh": 1}
    # One decomposition still gives every stat its own correct value, with or without eigenvectors.
    for out in (first, second):
        assert out["idim"] == ref["idim"] and out["lsat"] == pytest.approx(ref["lsat"])
        np.testing.assert_allclose(out["cov"], cov, rtol=0, atol=0)
        for stat in ("trc", "dtrc", "det"):
            assert out[stat] == pytest.approx(ref[stat], rel=1e-9), stat
        np.testing.assert_allclose(out["spectrum"], ref["eig"][:5], rtol=1e-10)
    top = np.linalg.eigh(cov)[1][:, ::-1][:, :2]
    expected = rows[:5] @ top  # mean given as 0: no centring
    signs = np.sign(np.sum(second["embed"] * expected, axis=0))  # eigenvectors have no sign
    np.testing.assert_allclose(second["embed"] * signs, expected, rtol=1e-8, atol=1e-10)


def test_embed_projects_on_top_two_eigenvectors():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((300, 4)) @ np.diag([5.0, 2.0, 0.5, 0.1]) + 7
    ref = np_stats(rows)
    vals, vecs = np.linalg.eigh(ref["cov"])
    top = vecs[:, ::-1][:, :2]
    mean = rows.mean(0)
    expected = (rows[:20] - mean) @ top
    got = layer_statistics(
        ref["cov"], ["embed"], samples=torch.from_numpy(rows[:20]), mean=torch.from_numpy(mean)
    )["embed"]
    assert got.shape == (20, 2)
    # Eigenvectors are defined up to sign.
    for column in range(2):
        sign = np.sign(got[:, column] @ expected[:, column])
        np.testing.assert_allclose(sign * got[:, column], expected[:, column], rtol=1e-8, atol=1e-10)


def test_unknown_stat_and_bad_matrix():
    with pytest.raises(ValueError, match="unknown stat 'bogus'"):
        layer_statistics(np.eye(2), ["bogus"])
    with pytest.raises(ValueError, match="square"):
        compute_cov_trace(np.ones((2, 3)))
