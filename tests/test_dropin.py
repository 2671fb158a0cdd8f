"""Code written for delve 0.1.x runs unchanged: import paths, arguments and naming it relied on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import delve
from tests.reference import OutputCapture, np_stats, recurrent_rows


def test_torchcallback_exports_the_tracker_classes():
    from delve.torchcallback import CheckLayerSat, SaturationTracker

    assert CheckLayerSat is delve.CheckLayerSat
    assert SaturationTracker is delve.SaturationTracker is delve.CheckLayerSat


def test_no_downsampling_passed_through_as_none(tmp_path):
    # Configs pass their "no downsampling" straight through: fine while nothing interpolates.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    tracker = delve.CheckLayerSat(str(tmp_path / "r"), "csv", [conv], interpolation_downsampling=None,
                                  stats=["idim"])
    capture = OutputCapture({"c": conv})
    with torch.no_grad():
        conv(torch.randn(3, 2, 40, 40))  # larger than the default 32: no resizing happens
    values = tracker.add_saturations()
    tracker.close()
    (out,) = capture.take("c", "train")
    rows = np.moveaxis(out, 1, -1).reshape(-1, 4)
    assert values["train-intrinsic-dimensionality_Module-0-Conv2d"] == np_stats(rows)["idim"]
    # With a strategy, None is no size: the error names the parameter.
    with pytest.raises(ValueError, match=r"interpolation_downsampling must be an integer >= 1, got None"):
        delve.CheckLayerSat(str(tmp_path / "s"), "csv", [conv], interpolation_strategy="bilinear",
                            interpolation_downsampling=None)


def test_a_module_name_attribute_names_its_columns(tmp_path):
    # The original examples set `lstm.name = 'lstm2'`.
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 5, batch_first=True)
            self.lstm.name = "lstm2"
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    model = Net()
    savefile = str(tmp_path / "named")
    tracker = delve.CheckLayerSat(savefile, "csv", model, stats=["lsat", "idim"])
    assert list(tracker.layers) == ["lstm2", "head"]
    capture = OutputCapture({"lstm2": model.lstm})
    with torch.no_grad():
        model(torch.randn(8, 6, 3))
    tracker.add_saturations()
    tracker.close()
    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert "train-saturation_lstm2" in table.columns and "train-saturation_head" in table.columns
    (out,) = capture.take("lstm2", "train")
    ref = np_stats(recurrent_rows(out, True, "last_timestep"))
    assert table.loc[0, "train-intrinsic-dimensionality_lstm2"] == ref["idim"]
    assert table.loc[0, "train-saturation_lstm2"] == pytest.approx(ref["lsat"])


def test_numbers_of_any_kind_and_paths_are_accepted(tmp_path):
    layer = nn.Linear(3, 3)
    for threshold in (np.float32(0.9), torch.tensor(0.9), np.float64(0.9)):
        tracker = delve.CheckLayerSat(tmp_path / "p", "csv", layer, sat_threshold=threshold)
        assert tracker.config.sat_threshold == pytest.approx(0.9) and isinstance(tracker.sat_threshold, float)
        assert tracker.config.savefile == str(tmp_path / "p")
        tracker.close()
    tracker = delve.CheckLayerSat(tmp_path / "q", "csv", layer, log_interval=np.int64(2), max_samples=torch.tensor(8))
    assert (tracker.log_interval, tracker.max_samples) == (2, 8)
    tracker.close()
