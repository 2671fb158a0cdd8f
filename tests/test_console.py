"""The console view of verbose=True: one tqdm bar per layer and mode, filled to the saturation."""

import logging
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from tqdm import tqdm

import delve.tracker
from delve import CheckLayerSat
from delve.console import SaturationBars, bar_label
from tests.reference import OutputCapture, np_stats

# A bar as tqdm draws it: carriage return, label, the percentage, the bar.
BAR = re.compile(r"\r([^\r\n\x1b]+?): +(\d+\.\d)%\|")


def last_drawn(err):
    """Label -> the last percentage drawn for it."""
    drawn = {}
    for label, percent in BAR.findall(err):
        drawn[label.strip()] = float(percent)
    return drawn


def low_rank_batch(generator, rows=16, rank=2, dim=5):
    z = torch.randn(rows, rank, generator=generator)
    mix = torch.randn(rank, dim, generator=generator)
    return z @ mix + 0.05 * torch.randn(rows, dim, generator=generator)


def test_verbose_draws_one_bar_per_layer_and_mode_at_the_layers_saturation(capsys):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
    capture = OutputCapture({"0": model[0], "2": model[2]})  # (layer, mode) -> outputs of the epoch
    thresh = 0.9
    tracker = CheckLayerSat("unused", "csv", model, nosave=True, verbose=True, stats=["lsat"], sat_threshold=thresh)
    for _ in range(2):
        model.train()
        for _ in range(3):
            model(low_rank_batch(generator))
        model.eval()
        with torch.no_grad():
            for _ in range(2):
                model(low_rank_batch(generator, rank=3))
        tracker.add_saturations()
        drawn = last_drawn(capsys.readouterr().err)
        expected = {}
        for name in ("0", "2"):
            for mode, label in (("train", name), ("eval", f"{name} (eval)")):
                ref = np_stats(np.concatenate(capture.take(name, mode)), thresh)
                ratios = np.cumsum(ref["eig"]) / ref["eig"].sum()
                assert np.min(np.abs(ratios - thresh)) > 1e-6  # not on the edge of a step
                expected[label] = 100 * ref["lsat"]
        assert set(drawn) == set(expected)
        for label, percent in expected.items():
            assert drawn[label] == pytest.approx(percent, abs=0.05), label
    # Not all bars full or empty: the data are low rank, so the check above means something.
    assert 0 < drawn["0"] < 100

    bars = list(tracker._bars.bars.values())
    tracker.close()
    assert all(bar.disable for bar in bars)  # tqdm marks a closed bar disabled
    assert tracker._bars.bars == {}


def test_no_bars_without_verbose(capsys):
    model = nn.Linear(3, 3)
    tracker = CheckLayerSat("unused", "csv", model, nosave=True, stats=["lsat"])
    model(torch.randn(8, 3))
    tracker.add_saturations()
    tracker.close()
    assert capsys.readouterr().err == ""


def test_bars_go_below_the_users_own_bar_and_leave_it_alone():
    with open("/dev/null", "w") as sink:
        user_bar = tqdm(total=10, desc="steps", position=0, file=sink)
        bars = SaturationBars(file=sink)
        bars.update({"train-saturation_a": 0.5, "train-saturation_b": 0.25, "eval-saturation_a": 1.0})
        positions = [abs(bar.pos) for bar in bars.bars.values()]
        assert len(set(positions)) == 3
        assert abs(user_bar.pos) not in positions
        assert [bar.n for bar in bars.bars.values()] == [50.0, 25.0, 100.0]
        user_bar.update(3)
        bars.close()
        assert user_bar.n == 3 and not user_bar.disable
        user_bar.close()


def test_explicit_position_stacks_bars_from_it():
    with open("/dev/null", "w") as sink:
        bars = SaturationBars(position=4, file=sink)
        bars.update({"train-saturation_a": 0.1, "train-saturation_b": 0.2})
        assert [abs(bar.pos) for bar in bars.bars.values()] == [4, 5]
        bars.close()


def test_bars_redraw_in_place_and_show_nan_as_empty():
    with open("/dev/null", "w") as sink:
        bars = SaturationBars(file=sink)
        bars.update({"train-saturation_a": 0.5})
        first = bars.bars["a"]
        bars.update({"train-saturation_a": math.nan, "average-train-sat": 0.75})
        assert bars.bars["a"] is first  # the same bar, redrawn
        assert first.n == 0.0
        assert bars.bars["average"].n == 75.0
        bars.close()


def test_bar_labels():
    assert bar_label("train-saturation_features-0") == "features-0"
    assert bar_label("eval-saturation_lstm") == "lstm (eval)"
    assert bar_label("average-eval-sat") == "average (eval)"
    # Only saturations get bars: other stats and the user's own values do not.
    assert bar_label("train-intrinsic-dimensionality_features-0") is None
    assert bar_label("train-loss") is None


def test_a_broken_console_does_not_stop_training(monkeypatch, caplog):
    class Broken:
        def update(self, values):
            raise OSError("terminal gone")

        def close(self):
            raise OSError("terminal gone")

    monkeypatch.setattr(delve.tracker, "SaturationBars", Broken)
    model = nn.Linear(3, 2)
    tracker = CheckLayerSat("unused", "csv", model, nosave=True, verbose=True, stats=["lsat"])
    model(torch.randn(8, 3))
    with caplog.at_level(logging.ERROR, logger="delve"):
        values = tracker.add_saturations()
        tracker.close()
    assert values["train-saturation_Module-0-Linear"] == 1.0
    assert "console view failed" in caplog.text
