"""The CSV file: SPEC §6 layout, values from numpy references, late columns, resume."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import CheckLayerSat
from tests.reference import np_stats


def read(path):
    return pd.read_csv(path, sep=";", index_col=0)


def test_csv_layout_and_values(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    savefile = str(tmp_path / "sub" / "run")
    tracker = CheckLayerSat(savefile, "csv", model, stats=["lsat", "idim", "cov"], average_sat=True)
    expected = []
    for epoch in range(3):
        model.train()
        train = [model[0](torch.randn(10, 6)).detach().double().numpy() for _ in range(2)]
        model.eval()
        evals = [model[0](torch.randn(7, 6)).detach().double().numpy()]
        model.train()
        if epoch == 2:
            tracker.add_scalar("late", 1.0)  # first appears at epoch 2
        tracker.add_scalar("loss", 10.0 - epoch)
        tracker.add_saturations()
        expected.append((np_stats(np.concatenate(train)), np_stats(np.concatenate(evals))))
    tracker.close()

    text = open(savefile + ".csv").read()
    assert text.startswith(";")  # the epoch index column is unnamed
    table = read(savefile + ".csv")
    assert list(table.index) == [0, 1, 2]
    assert list(table.columns) == [
        "loss", "late",
        "train-saturation_0", "train-intrinsic-dimensionality_0", "average-train-sat",
        "eval-saturation_0", "eval-intrinsic-dimensionality_0", "average-eval-sat",
    ]
    assert np.isnan(table.loc[0, "late"]) and np.isnan(table.loc[1, "late"]) and table.loc[2, "late"] == 1.0
    assert list(table["loss"]) == [10.0, 9.0, 8.0]
    for epoch, (train_ref, eval_ref) in enumerate(expected):
        assert table.loc[epoch, "train-intrinsic-dimensionality_0"] == train_ref["idim"]
        assert table.loc[epoch, "train-saturation_0"] == pytest.approx(train_ref["lsat"])
        assert table.loc[epoch, "eval-saturation_0"] == pytest.approx(eval_ref["lsat"])
        assert table.loc[epoch, "eval-intrinsic-dimensionality_0"] == eval_ref["idim"]
        # one tracked layer saw data: the average is its saturation
        assert table.loc[epoch, "average-train-sat"] == pytest.approx(train_ref["lsat"])
        assert table.loc[epoch, "average-eval-sat"] == pytest.approx(eval_ref["lsat"])
    assert table.filter(like="covariance-matrix").empty  # arrays are not CSV columns
    assert ((table.filter(like="saturation") >= 0) & (table.filter(like="saturation") <= 1)).all().all()


def test_resume_keeps_rows_below_initial_epoch(tmp_path):
    savefile = str(tmp_path / "run")
    layer = nn.Linear(3, 3)
    first = CheckLayerSat(savefile, "csv", layer, stats=["lsat"])
    for epoch in range(3):
        layer(torch.randn(8, 3))
        first.add_scalar("epoch_value", float(epoch))
        first.add_saturations()
    first.close()
    before = read(savefile + ".csv")

    second = CheckLayerSat(savefile, "csv", layer, stats=["lsat"], initial_epoch=2)
    for epoch in range(2, 5):
        layer(torch.randn(8, 3))
        second.add_scalar("epoch_value", float(epoch) + 100)
        second.add_saturations()
    second.close()
    after = read(savefile + ".csv")
    assert list(after.index) == [0, 1, 2, 3, 4]
    pd.testing.assert_frame_equal(after.loc[[0, 1]], before.loc[[0, 1]])
    assert list(after["epoch_value"]) == [0.0, 1.0, 102.0, 103.0, 104.0]

    fresh = CheckLayerSat(savefile, "csv", layer, stats=["lsat"])  # initial_epoch=0 starts over
    layer(torch.randn(8, 3))
    fresh.add_saturations()
    fresh.close()
    assert list(read(savefile + ".csv").index) == [0]


def test_print_writer_one_line_per_value(capsys):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    tracker = CheckLayerSat("unused", "print", layer, stats=["lsat", "idim"])
    out = layer(torch.randn(8, 4) * torch.tensor([3.0, 1.0, 0.05, 0.01])).detach().double().numpy()
    ref = np_stats(out)
    tracker.add_scalar("loss", 0.5)
    tracker.add_saturations()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0] == "[epoch 0] loss: 0.5"
    name, value = lines[1].rsplit(": ", 1)
    assert name == "[epoch 0] train-saturation_Module-0-Linear" and float(value) == pytest.approx(ref["lsat"])
    name, value = lines[2].rsplit(": ", 1)
    assert name == "[epoch 0] train-intrinsic-dimensionality_Module-0-Linear" and float(value) == ref["idim"]
    assert not any(line.startswith("[epoch 0] _") for line in lines)


def test_writer_failure_does_not_stop_training(tmp_path, caplog, monkeypatch):
    layer = nn.Linear(3, 2)
    tracker = CheckLayerSat(str(tmp_path / "run"), "csv", layer, stats=["lsat", "trc"])

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tracker.writer, "save", disk_full)
    outputs = [layer(torch.randn(5, 3)).detach().double().numpy()]
    with caplog.at_level("ERROR", logger="delve"):
        values = tracker.add_saturations()
    assert "training goes on" in caplog.text
    assert "train-saturation_Module-0-Linear" in values
    monkeypatch.undo()
    outputs.append(layer(torch.randn(5, 3) * 10).detach().double().numpy())
    tracker.add_saturations()  # the next epoch writes both rows
    table = read(str(tmp_path / "run.csv"))
    assert list(table.index) == [0, 1]
    for epoch, out in enumerate(outputs):  # each row holds its own epoch's values
        trc = np_stats(out)["trc"]
        assert table.at[epoch, "train-covariance-trace_Module-0-Linear"] == pytest.approx(trc, rel=1e-6)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        layer = nn.Linear(2, 2)
        tracker = CheckLayerSat(str(tmp_path / "run"), "csv", layer)
        layer(torch.randn(4, 2))
        tracker.add_saturations()
        tracker.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "run.csv").st_mode) == 0o644
