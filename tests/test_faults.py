"""Bad input fails at construction naming the parameter; what was recorded survives recoverable failures."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import CheckLayerSat, gram
from tests.reference import OutputCapture, np_cov, np_stats, rel_err


def make(tmp_path, **kwargs):
    args = dict(savefile=str(tmp_path / "run"), save_to="csv", modules=nn.Linear(2, 2))
    args.update(kwargs)
    return CheckLayerSat(**args)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"savefile": ""}, ValueError, r"savefile must not be empty"),
        ({"savefile": "runs/a\0b"}, ValueError, r"savefile 'runs/a\\x00b' contains a NUL byte"),
        ({"savefile": 3}, TypeError, r"savefile must be a path"),
        ({"device": "meta"}, ValueError, r"device 'meta' holds no data"),
        ({"device": "xpu"}, ValueError, r"device 'xpu': this torch build cannot use 'xpu' devices"),
        ({"writer_args": [("zip", True)]}, TypeError, r"writer_args must be a mapping"),
        ({"layer_filter": lambda layers: {"x": "linear"}}, TypeError, r"layer_filter returned 'x': str"),
        ({"layer_filter": lambda layers: {"x": nn.ReLU()}}, TypeError, r"layer_filter returned 'x': ReLU"),
        ({"stats": None}, TypeError, r"stats must be a list of stat names"),
        ({"verbose": "yes"}, ValueError, r"verbose must be True or False, got 'yes'"),
        ({"ignore_layer_names": [3]}, TypeError, r"ignore_layer_names must hold layer names"),
    ],
)
def test_bad_arguments_name_the_parameter(tmp_path, kwargs, error, pattern):
    layer = nn.Linear(2, 2)
    with pytest.raises(error, match=pattern):
        make(tmp_path, modules=layer, **kwargs)
    assert not layer._forward_hooks  # nothing was hooked
    assert not (tmp_path / "run.csv").exists()


def test_empty_savefile_is_fine_when_nothing_is_saved(tmp_path):
    tracker = make(tmp_path, savefile="", nosave=True)
    assert tracker.writer is None
    tracker.close()


def test_user_scalars_never_cost_a_row(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    tracker = make(tmp_path, modules=model, stats=["trc"])
    with pytest.raises(TypeError, match=r"add_scalar\('loss', \.\.\.\) needs a number \(or None\), got str 'low'"):
        tracker.add_scalar("loss", "low")
    with pytest.raises(TypeError, match=r"add_scalar needs a name \(str\), got int 3"):
        tracker.add_scalar(3, 1.0)
    capture = OutputCapture({"m": model})
    with torch.no_grad():
        model(torch.randn(10, 4))
    tracker.add_scalar("loss", None)
    tracker.add_scalar("accuracy", torch.tensor(0.5))
    tracker.add_saturations()
    tracker.close()
    table = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    assert np.isnan(table.loc[0, "loss"]) and table.loc[0, "accuracy"] == 0.5
    (out,) = capture.take("m", "train")
    assert table.loc[0, "train-covariance-trace_Module-0-Linear"] == pytest.approx(np.trace(np_cov(out)), rel=1e-6)


def test_an_epoch_of_only_nonfinite_batches_keeps_its_row(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    tracker = make(tmp_path, modules=model, stats=["lsat", "trc"])
    capture = OutputCapture({"1": model[1]})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="delve"):
        for _ in range(2):
            model[0].weight[0, 0] = float("nan")  # layer 0 gives NaN, so does layer 1 then
            model(torch.randn(5, 3))
        tracker.add_saturations()
        with torch.no_grad():
            model[0].weight[0, 0] = 0.5
            model[1].weight[0, 0] = 0.5
        model(torch.randn(6, 3))
        tracker.add_saturations()
    tracker.close()
    table = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1]
    assert table.loc[0].isna().all()  # the row exists, every value NaN
    assert [r.getMessage() for r in caplog.records if "NaN/Inf" in r.getMessage()] == [
        "layer 0 (train): 2 batch(es) with NaN/Inf activations were skipped",
        "layer 1 (train): 2 batch(es) with NaN/Inf activations were skipped",
    ]
    last = capture.take("1", "train")[-1]
    assert table.loc[1, "train-covariance-trace_1"] == pytest.approx(np.trace(np_cov(last)), rel=1e-6)


def test_activations_near_1e18_are_merged_exactly(tmp_path):
    # Their float32 products would overflow (a Gram entry sums thousands of 1e36 squares).
    torch.manual_seed(0)
    layer = nn.Linear(6, 40)
    with torch.no_grad():
        layer.weight.mul_(1e18)
        layer.bias.fill_(3e18)
    tracker = make(tmp_path, modules=layer, stats=["cov"], nosave=True)
    capture = OutputCapture({"l": layer})
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(2000, 6))
    values = tracker.add_saturations()
    tracker.close()
    rows = np.concatenate(capture.take("l", "train"))
    assert np.isfinite(rows).all() and np.abs(rows).max() > 1e18
    assert rel_err(values["train-covariance-matrix_Module-0-Linear"], np_cov(rows)) < 1e-6


def test_layers_whose_names_collide_are_both_tracked(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Module()
    model.heads = nn.ModuleDict({"out-1": nn.Linear(3, 2)})
    model.add_module("heads-out", nn.ModuleDict({"1": nn.Linear(3, 4)}))
    with caplog.at_level(logging.WARNING, logger="delve"):
        tracker = make(tmp_path, modules=model, stats=["idim", "trc"])
    assert list(tracker.layers) == ["heads-out-1", "heads-out-1-2"]
    assert tracker.layers["heads-out-1-2"] is model.get_submodule("heads-out.1")
    assert "'heads-out-1'" in caplog.text and "'heads-out-1-2'" in caplog.text
    capture = OutputCapture(dict(tracker.layers))
    x = torch.randn(9, 3)
    with torch.no_grad():
        for layer in tracker.layers.values():
            layer(x)
    values = tracker.add_saturations()
    tracker.close()
    for name in tracker.layers:
        (out,) = capture.take(name, "train")
        assert values[f"train-covariance-trace_{name}"] == pytest.approx(np.trace(np_cov(out)), rel=1e-6)


def test_a_layer_name_with_a_line_break_is_still_a_column(tmp_path):
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleDict({"a\nb": nn.Linear(3, 3), "tab\there": nn.Linear(3, 2)})
    tracker = make(tmp_path, modules=model, stats=["idim"])
    capture = OutputCapture(dict(tracker.layers))
    with torch.no_grad():
        for layer in tracker.layers.values():
            layer(torch.randn(7, 3))
    tracker.add_saturations()
    tracker.close()
    table = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    for name in ("blocks-a\nb", "blocks-tab\there"):
        (out,) = capture.take(name, "train")
        assert table.loc[0, f"train-intrinsic-dimensionality_{name}"] == np_stats(out)["idim"]


def test_close_frees_the_scratch_buffer(tmp_path):
    tracker = make(tmp_path, modules=nn.Linear(64, 64), nosave=True)
    with torch.no_grad():
        tracker.layers["Module-0-Linear"](torch.randn(4096, 64))
    assert gram.workspace_bytes() >= 4096 * 64 * 4
    tracker.close()
    assert gram.workspace_bytes() == 0
