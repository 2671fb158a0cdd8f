"""The spectrum, effective rank and participation ratio stats, against numpy float64 references."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from delve import CheckLayerSat, metrics
from delve.metrics import compute_effective_rank, compute_participation_ratio, compute_spectrum
from tests.reference import OutputCapture, np_cov, np_effective_rank, np_eigenvalues

MODES = ("train", "eval")


def np_spectrum(cov, k) -> np.ndarray:
    eig = np_eigenvalues(cov)[:k]
    return np.concatenate([eig, np.zeros(k - len(eig))])


def np_participation_ratio(cov) -> float:
    eig = np_eigenvalues(cov)
    if np.sum(eig**2) <= 0:
        return 0.0
    return float(eig.sum() ** 2 / np.sum(eig**2))


def low_rank_cov(d, rank, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((d, rank)) * np.geomspace(4, 0.05, rank)
    return scale * basis @ basis.T


# --------------------------------------------------------------------- public functions
@pytest.mark.parametrize("d, rank", [(1, 1), (4, 4), (9, 3), (12, 12)])
@pytest.mark.parametrize("k", [1, 5, 15])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_public_functions_match_numpy(d, rank, k, as_tensor):
    cov = low_rank_cov(d, rank, seed=d * 31 + rank)
    given_cov = torch.from_numpy(cov) if as_tensor else cov
    spectrum = compute_spectrum(given_cov, k)
    assert isinstance(spectrum, np.ndarray) and spectrum.shape == (k,)
    np.testing.assert_allclose(spectrum, np_spectrum(cov, k), rtol=1e-10, atol=1e-12 * np.trace(cov))
    assert np.all(np.diff(spectrum) <= 0), "spectrum must be in descending order"
    assert compute_effective_rank(given_cov) == pytest.approx(np_effective_rank(cov), rel=1e-9)
    assert compute_participation_ratio(given_cov) == pytest.approx(np_participation_ratio(cov), rel=1e-9)


def test_default_spectrum_length_and_known_values():
    assert compute_spectrum(np.diag([1.0, 4.0, 2.0, 3.0, 0.5, 7.0])).tolist() == [7, 4, 3, 2, 1]
    # Equal eigenvalues: the entropy is log d, so both measures are exactly d.
    assert compute_effective_rank(np.eye(6)) == pytest.approx(6)
    assert compute_participation_ratio(np.eye(6)) == pytest.approx(6)
    # Eigenvalues 3 and 1: p = (3/4, 1/4).
    cov = np.diag([3.0, 1.0, 0.0])
    assert compute_effective_rank(cov) == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    assert compute_participation_ratio(cov) == pytest.approx(16 / 10)
    # Rounding makes tiny negative eigenvalues: they are clamped, not fed to log or squared.
    noisy = np.diag([2.0, 2.0, -1e-13])
    assert compute_effective_rank(noisy) == pytest.approx(2)
    assert compute_participation_ratio(noisy) == pytest.approx(2)
    np.testing.assert_array_equal(compute_spectrum(noisy, 3), [2, 2, 0])


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 8),
    rank=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-6, 1e6),
)
def test_erank_and_pr_bounds_and_scale_invariance(d, rank, seed, scale):
    rank = min(rank, d)
    cov = low_rank_cov(d, rank, seed)
    erank, pr = compute_effective_rank(cov), compute_participation_ratio(cov)
    # pr is exp of the order-2 Renyi entropy, erank of the Shannon entropy: 1 <= pr <= erank <= rank.
    assert 1 - 1e-9 <= pr <= erank * (1 + 1e-9)
    assert erank <= rank * (1 + 1e-9)
    # Both depend on the shape of the spectrum only.
    assert compute_effective_rank(scale * cov) == pytest.approx(erank, rel=1e-7)
    assert compute_participation_ratio(scale * cov) == pytest.approx(pr, rel=1e-7)
    # Rounding leaves eigenvalues of ~1e-16 of the trace where the exact ones are 0.
    atol = 1e-12 * scale * np.trace(cov)
    np.testing.assert_allclose(compute_spectrum(scale * cov, 3), scale * compute_spectrum(cov, 3), rtol=1e-7, atol=atol)


# ------------------------------------------------------------------------- in the tracker
class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(6, 7)
        self.narrow = nn.Linear(7, 5)

    def forward(self, x):
        return self.narrow(torch.tanh(self.wide(x)))


def train_and_eval(model, tracker, capture, epochs=3):
    """Run epochs of train and eval passes; return, per epoch, (tracker values, our rows)."""
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    mix = torch.randn(6, 6, generator=gen) * torch.linspace(2.0, 0.1, 6)
    for _ in range(epochs):
        model.train()
        for _ in range(4):
            loss = model(2.0 + torch.randn(16, 6, generator=gen) @ mix).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for _ in range(3):
                model(2.0 + torch.randn(16, 6, generator=gen) @ mix)
        rows = {
            (name, mode): np.concatenate(capture.take(name, mode)) for name in tracker.layers for mode in MODES
        }
        history.append((tracker.add_saturations(), rows))
    return history


def test_tracker_spectrum_erank_pr_match_numpy(tmp_path):
    torch.manual_seed(0)
    model = TwoLayers()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "csv", model, stats=["spectrum", "erank", "pr", "lsat"], spectrum_k=3)
    capture = OutputCapture(dict(tracker.layers))
    history = train_and_eval(model, tracker, capture)
    tracker.close()
    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    for epoch, (values, rows) in enumerate(history):
        for (name, mode), layer_rows in rows.items():
            cov = np_cov(layer_rows)
            spectrum = values[f"{mode}-spectrum_{name}"]
            assert isinstance(spectrum, np.ndarray) and spectrum.shape == (3,)
            np.testing.assert_allclose(spectrum, np_spectrum(cov, 3), rtol=1e-6)
            references = (("effective-rank", np_effective_rank), ("participation-ratio", np_participation_ratio))
            for stat, reference in references:
                key = f"{mode}-{stat}_{name}"
                assert values[key] == pytest.approx(reference(cov), rel=1e-6)
                assert table.loc[epoch, key] == pytest.approx(reference(cov), rel=1e-6)
    # The spectrum is an array: it goes to writers that store arrays, not to CSV columns.
    assert not any("spectrum" in column for column in table.columns)
    assert list(table.index) == [0, 1, 2]


def test_spectrum_k_default_and_padding(tmp_path):
    torch.manual_seed(1)
    model = TwoLayers()
    default = CheckLayerSat("unused", "csv", model, stats=["spectrum"], nosave=True)
    padded = CheckLayerSat("unused", "csv", model, stats=["spectrum"], nosave=True, spectrum_k=9)
    capture = OutputCapture(dict(default.layers))
    with torch.no_grad():
        model(torch.randn(40, 6))
    values_default, values_padded = default.add_saturations(), padded.add_saturations()
    for name in ("wide", "narrow"):
        cov = np_cov(np.concatenate(capture.take(name, "train")))
        # 'wide' maps 6 inputs to 7 features: its 7th eigenvalue is 0 up to float32 products.
        atol = 1e-7 * np.trace(cov)
        np.testing.assert_allclose(values_default[f"train-spectrum_{name}"], np_spectrum(cov, 5), rtol=1e-6, atol=atol)
        # k beyond the width: the missing eigenvalues are zeros.
        np.testing.assert_allclose(values_padded[f"train-spectrum_{name}"], np_spectrum(cov, 9), rtol=1e-6, atol=atol)
    assert values_padded["train-spectrum_narrow"][5:].tolist() == [0, 0, 0, 0]
    default.close()
    padded.close()


def test_mode_suffixes_limit_the_new_stats():
    model = TwoLayers()
    tracker = CheckLayerSat("unused", "csv", model, stats=["spectrum_eval", "erank_train", "pr"], nosave=True)
    model.train()
    model(torch.randn(20, 6))
    model.eval()
    with torch.no_grad():
        model(torch.randn(20, 6))
    keys = set(tracker.add_saturations())
    assert keys == {
        f"{mode}-{stat}_{name}"
        for name in ("wide", "narrow")
        for mode, stat in [
            ("train", "effective-rank"),
            ("train", "participation-ratio"),
            ("eval", "participation-ratio"),
            ("eval", "spectrum"),
        ]
    }
    tracker.close()


@pytest.mark.parametrize("with_embed", [False, True], ids=["eigvalsh", "eigh"])
def test_one_eigendecomposition_per_layer_and_mode(monkeypatch, with_embed):
    calls = []
    real_eigvalsh, real_eigh = torch.linalg.eigvalsh, torch.linalg.eigh

    def eigvalsh(matrix, *args, **kwargs):
        calls.append(("eigvalsh", matrix.shape[0]))
        return real_eigvalsh(matrix, *args, **kwargs)

    def eigh(matrix, *args, **kwargs):
        calls.append(("eigh", matrix.shape[0]))
        return real_eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", eigvalsh)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    stats = ["lsat", "idim", "det", "trc", "dtrc", "spectrum", "erank", "pr", "cov"] + (["embed"] if with_embed else [])
    model = TwoLayers()  # widths 7 and 5 tell the layers' decompositions apart
    tracker = CheckLayerSat("unused", "csv", model, stats=stats, nosave=True, average_sat=True)
    solver = "eigh" if with_embed else "eigvalsh"
    for _ in range(2):
        calls.clear()
        model.train()
        for _ in range(3):
            model(torch.randn(12, 6))
        model.eval()
        with torch.no_grad():
            model(torch.randn(12, 6))
        values = tracker.add_saturations()
        # One per layer per mode, whatever the number of stats: (2 layers) x (train, eval).
        assert sorted(calls) == sorted([(solver, 7), (solver, 7), (solver, 5), (solver, 5)])
        assert "average-train-sat" in values and "eval-spectrum_narrow" in values
    tracker.close()


def test_bad_spectrum_k_and_unknown_stat_fail_at_construction():
    model = TwoLayers()
    for bad in (0, -2, 2.5, "3", True):
        with pytest.raises(ValueError, match="spectrum_k"):
            CheckLayerSat("unused", "csv", model, stats=["spectrum"], spectrum_k=bad, nosave=True)
    with pytest.raises(ValueError, match="unknown stat 'spectra'") as err:
        CheckLayerSat("unused", "csv", model, stats=["spectra"], nosave=True)
    for name in ("spectrum", "erank", "pr"):
        assert repr(name) in str(err.value)
    assert not model._forward_hooks and not model.wide._forward_hooks, "a failed construction leaves no hook"


def test_metrics_module_exposes_the_new_stats():
    assert metrics.STATMAP["spectrum"] == "spectrum"
    assert metrics.STATMAP["erank"] == "effective-rank"
    assert metrics.STATMAP["pr"] == "participation-ratio"
    assert {"erank", "pr"} <= set(metrics.SCALAR_STATS) and "spectrum" not in metrics.SCALAR_STATS
