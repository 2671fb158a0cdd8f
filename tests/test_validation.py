"""Every bad argument fails at construction, naming the bad value and the valid ones."""

import pytest
import torch
from torch import nn

from delve import CheckLayerSat


def make(**kwargs):
    args = dict(savefile="unused", save_to="csv", modules=nn.Linear(2, 2), nosave=True)
    args.update(kwargs)
    return CheckLayerSat(**args)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"stats": ["lsat", "bogus"]}, r"unknown stat 'bogus'.*'idim'.*'lsat'"),
        ({"stats": ["lsat_test"]}, r"unknown stat 'lsat_test'.*_train"),
        ({"conv_method": "avg"}, r"unknown conv_method 'avg'.*'channelwise'.*'flatten'"),
        ({"timeseries_method": "last"}, r"unknown timeseries_method 'last'.*'last_timestep'.*'timestepwise'"),
        ({"sat_threshold": 0}, r"sat_threshold must lie in \(0, 1\], got 0"),
        ({"sat_threshold": 1.5}, r"sat_threshold must lie in \(0, 1\], got 1.5"),
        ({"sat_threshold": "0.99"}, r"sat_threshold must be a number in \(0, 1\], got '0.99'"),
        ({"log_interval": 0}, r"log_interval must be an integer >= 1, got 0"),
        ({"log_interval": 1.5}, r"log_interval must be an integer >= 1, got 1.5"),
        ({"max_samples": 0}, r"max_samples must be an integer >= 1 or None, got 0"),
        ({"initial_epoch": -1}, r"initial_epoch must be an integer >= 0, got -1"),
        ({"interpolation_strategy": "cubic"}, r"unknown interpolation_strategy 'cubic'.*'bilinear'"),
        ({"interpolation_downsampling": 0}, r"interpolation_downsampling must be an integer >= 1"),
        ({"device": "gpu"}, r"device 'gpu' is not a torch device"),
        ({"device": "mps"}, r"device 'mps' has no float64 arithmetic.*device=None.*'cpu'"),
        ({"modules": nn.ReLU()}, r"no trackable layer found: delve tracks Linear"),
        ({"modules": [nn.Conv2d(1, 1, 1)], "include_conv": False}, r"excluded by include_conv=False"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(**kwargs)


def test_unavailable_cuda_device_is_refused_at_construction(monkeypatch):
    # Runs on every machine: CUDA is made to look absent (or too small) rather than skipped where present.
    layer = nn.Linear(2, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda:0' was asked for but CUDA is not available"):
        make(device="cuda:0", modules=layer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' does not exist: 1 CUDA device\(s\) are visible"):
        make(device="cuda:3", modules=layer)
    assert not layer._forward_hooks


def test_unknown_writer_key_and_writer_args(tmp_path):
    with pytest.raises(ValueError, match=r"unknown writer 'excel'; valid keys are \[.*'csv'.*\]"):
        make(save_to="excel", nosave=False, savefile=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"unknown writer 'xls'"):
        make(save_to=["csv", "xls"], nosave=False, savefile=str(tmp_path / "r"))
    with pytest.raises(TypeError, match="AbstractWriter"):
        make(save_to=[object()], nosave=False, savefile=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"writer_args \['colour'\] are accepted by none"):
        make(save_to="csv", writer_args={"colour": "red"}, nosave=False, savefile=str(tmp_path / "r"))


def test_bad_modules_and_filter():
    with pytest.raises(TypeError, match="modules must be a torch.nn.Module"):
        make(modules="model")
    with pytest.raises(TypeError, match=r"modules\[1\] is a int"):
        make(modules=[nn.Linear(1, 1), 3])
    with pytest.raises(TypeError, match="layer_filter must be callable"):
        make(layer_filter="linear")
    with pytest.raises(ValueError, match="no trackable layer"):
        make(layer_filter=lambda layers: {})


def test_nothing_is_hooked_when_validation_fails():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError):
        CheckLayerSat("unused", "csv", layer, stats=["nope"], nosave=True)
    assert not layer._forward_hooks


def test_unknown_ignore_names_are_logged_not_fatal(caplog):
    with caplog.at_level("WARNING", logger="delve"):
        tracker = make(ignore_layer_names=["linear9"])
    assert "linear9" in caplog.text
    assert list(tracker.layers) == ["Module-0-Linear"]
