"""A statistic and a layer type declared from outside the package are tracked and written like built-in ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import CheckLayerSat
from delve.activations import dense_rows
from delve.cli import summarize
from delve.layers import register_layer, unregister_layer
from delve.metrics import register_stat, unregister_stat
from tests.reference import OutputCapture, np_cov, np_eigenvalues


class Projection(nn.Module):
    """A layer type delve does not know: ``x @ W`` with its own parameter, not an nn.Linear."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))

    def forward(self, x):
        return x @ self.weight


def _top_share(space) -> float:
    return float(space.eigenvalues[0] / space.eigenvalues.sum())


@pytest.fixture
def declared():
    register_layer(Projection, rows=dense_rows, features=lambda layer, options: layer.weight.shape[1])
    register_stat("top1", "top-eigenvalue-share", _top_share, fmt="{:.4f}")
    yield
    unregister_stat("top1")
    unregister_layer(Projection)


def _np_top_share(rows) -> float:
    eig = np_eigenvalues(np_cov(rows))
    return float(eig[0] / eig.sum())


def test_a_declared_stat_and_layer_reach_csv_tensorboard_and_summary(tmp_path, declared):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(Projection(5, 4), nn.Tanh(), nn.Linear(4, 3))
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, ["csv", "tb"], model, stats=["top1", "idim"])
    assert list(tracker.layers) == ["0", "2"]
    capture = OutputCapture({"0": model[0], "2": model[2]})
    expected = {}
    with torch.no_grad():
        for epoch in range(2):
            for _ in range(3):
                model(torch.randn(16, 5) * torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1]))
            for name in ("0", "2"):
                expected[(epoch, name)] = _np_top_share(np.concatenate(capture.take(name, "train")))
            tracker.add_saturations()
    tracker.close()

    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    events = EventAccumulator(savefile)
    events.Reload()
    for (epoch, name), share in expected.items():
        column = f"train-top-eigenvalue-share_{name}"
        assert table.loc[epoch, column] == pytest.approx(share, rel=1e-6)
        scalars = {e.step: e.value for e in events.Scalars(f"train-top-eigenvalue-share/{name}")}  # grouped tag
        assert scalars[epoch] == pytest.approx(share, rel=1e-6)
    summary = summarize(table)
    assert "top1" in summary.columns
    assert summary.set_index("layer").loc["0", "top1"] == pytest.approx(expected[(1, "0")], rel=1e-6)


def test_the_memory_guard_reads_a_declared_width(tmp_path, declared):
    layer = Projection(3, 600)
    with pytest.raises(MemoryError, match="600 features"):
        CheckLayerSat(str(tmp_path / "r"), "csv", [layer], max_accumulator_bytes=1000)


def test_declarations_are_checked():
    with pytest.raises(TypeError, match="torch.nn.Module subclass"):
        register_layer(int, rows=dense_rows)
    with pytest.raises(ValueError, match="declared already"):
        register_layer(nn.Linear, rows=dense_rows)
    with pytest.raises(ValueError, match="a stat named 'lsat' exists already"):
        register_stat("lsat", "my-saturation", _top_share)
    with pytest.raises(ValueError, match="stem 'saturation' is already the stem of stat 'lsat'"):
        register_stat("mysat", "saturation", _top_share)
    with pytest.raises(ValueError, match=r"no '_'"):
        register_stat("mysat", "my_saturation", _top_share)
    with pytest.raises(ValueError, match="unknown kind 'table'"):
        register_stat("mysat", "my-saturation", _top_share, kind="table")


def test_an_undeclared_layer_type_is_refused_not_guessed():
    from delve.layers import to_data_rows

    with pytest.raises(TypeError, match="delve has no rule for Projection layers"):
        to_data_rows(Projection(2, 2), torch.randn(3, 2))
