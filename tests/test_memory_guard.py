"""Accumulators too large for memory are refused, at construction whenever the width is known."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from delve import CheckLayerSat, TorchCovarianceMatrix
from delve.covariance import covariance_bytes
from tests.reference import OutputCapture, conv_rows, np_stats


def _refuse(self, dim, device):
    raise AssertionError(f"an accumulator of dimension {dim} was allocated")


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if any accumulator allocates its state."""
    monkeypatch.setattr(TorchCovarianceMatrix, "_allocate", _refuse)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_wide_linear_is_refused_at_construction(tmp_path, no_allocation):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 20000))
    savefile = str(tmp_path / "out" / "stats")
    with pytest.raises(MemoryError) as info:
        CheckLayerSat(savefile, "csv", model)
    message = str(info.value)
    needed = covariance_bytes(20000)
    assert "'2'" in message and "20000 features" in message
    assert f"{needed} bytes" in message and "7.5 GiB" in message
    assert f"max_accumulator_bytes={4 * 2**30}" in message
    for remedy in ("ignore_layer_names", "layer_filter", "raise max_accumulator_bytes"):
        assert remedy in message
    # Nothing happened before the refusal: no hook, no folder, no file.
    assert _hooks(model) == 0
    assert not os.path.exists(tmp_path / "out")


def test_leaving_the_wide_layer_out_is_accepted(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 20000))
    tracker = CheckLayerSat(str(tmp_path / "s"), "csv", model, ignore_layer_names=["2"])
    assert list(tracker.layers) == ["0"]
    tracker.close()


def _capture_width(model: nn.Module, layer: nn.Module, x, **tracker_args) -> int:
    """Width of the data matrix the tracker really records for ``layer`` (seen from outside)."""
    tracker = CheckLayerSat("unused", "csv", model, nosave=True, stats=["cov"], **tracker_args)
    with torch.no_grad():
        model(x)
    values = tracker.add_saturations()
    tracker.close()
    (cov,) = [v for k, v in values.items() if k.startswith("train-")]
    return cov.shape[0]


@pytest.mark.parametrize(
    "layer, x, conv_method, width",
    [
        (nn.Linear(5, 7), torch.randn(4, 3, 5), "channelwise", 7),
        (nn.Conv2d(2, 6, 3), torch.randn(3, 2, 8, 8), "channelwise", 6),
        (nn.Conv2d(2, 6, 3), torch.randn(3, 2, 8, 8), "mean", 6),
        (nn.Conv2d(2, 6, 3), torch.randn(3, 2, 8, 8), "median", 6),
        (nn.ConvTranspose1d(2, 5, 3), torch.randn(3, 2, 8), "max", 5),
        (nn.LSTM(4, 6, batch_first=True), torch.randn(3, 5, 4), "channelwise", 6),
        (nn.LSTM(4, 6, bidirectional=True), torch.randn(5, 3, 4), "channelwise", 12),
        (nn.LSTM(4, 6, proj_size=2, bidirectional=True), torch.randn(5, 3, 4), "channelwise", 4),
        (nn.GRU(4, 3, num_layers=2, bidirectional=True), torch.randn(5, 3, 4), "channelwise", 6),
    ],
)
@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_construction_check_uses_the_true_width(layer, x, conv_method, width, monkeypatch):
    model = nn.Sequential(layer)
    # The width the tracker records agrees with the layer's true output width (SPEC §3) ...
    assert _capture_width(model, layer, x, conv_method=conv_method) == width
    # ... and the construction-time check budgets for that width.
    exact = covariance_bytes(width)
    monkeypatch.setattr(TorchCovarianceMatrix, "_allocate", _refuse)
    # A budget of exactly the true need is accepted; one byte less is refused at construction.
    CheckLayerSat("unused", "csv", model, nosave=True, conv_method=conv_method, max_accumulator_bytes=exact).close()
    with pytest.raises(MemoryError, match=f"{width} features"):
        CheckLayerSat("unused", "csv", model, nosave=True, conv_method=conv_method, max_accumulator_bytes=exact - 1)
    assert _hooks(model) == 0


def test_flatten_of_a_large_feature_map_is_refused_before_allocation(tmp_path, no_allocation):
    conv = nn.Conv2d(3, 64, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU())
    # The width of 'flatten' depends on the input, so construction succeeds ...
    tracker = CheckLayerSat(str(tmp_path / "s"), "csv", model, conv_method="flatten")
    # ... and the first batch is refused before any state is allocated.
    with pytest.raises(MemoryError) as info:
        model(torch.randn(1, 3, 128, 128))
    message = str(info.value)
    dim = 64 * 128 * 128
    assert f"layer '0' has {dim} features" in message
    assert f"{covariance_bytes(dim)} bytes (20.0 TiB)" in message
    assert "conv_method='channelwise'" in message and "interpolation_strategy" in message
    tracker.close()


def test_flatten_after_interpolation_fits(tmp_path):
    conv = nn.Conv2d(3, 64, 3, padding=1)
    model = nn.Sequential(conv)
    capture = OutputCapture({"0": conv})
    tracker = CheckLayerSat(
        str(tmp_path / "s"),
        "csv",
        model,
        conv_method="flatten",
        interpolation_strategy="nearest",
        interpolation_downsampling=4,
        stats=["trc"],
    )
    with torch.no_grad():
        model(torch.randn(4, 3, 128, 128))
    assert tracker.accumulator("0").dim == 64 * 4 * 4
    values = tracker.add_saturations(save=False)
    tracker.close()
    # Nearest resizing 128 -> 4 keeps every 32nd row and column, then C·4·4 features per sample.
    (out,) = capture.take("0", "train")
    rows = conv_rows(out[:, :, ::32, ::32], "flatten")
    assert rows.shape == (4, 64 * 4 * 4)
    assert values["train-covariance-trace_0"] == pytest.approx(np_stats(rows)["trc"], rel=1e-6)
