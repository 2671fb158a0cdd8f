"""The example scripts the documentation shows run, and write the table they promise.

Each script runs as ``python examples/SCRIPT ARGS`` would, in this process, with hooks of
our own on the layers its tracker follows; the table it writes is compared with float64
numpy statistics of the outputs those hooks recorded.
"""

import os
import re
import runpy
import sys

import numpy as np
import pandas as pd
import pytest
from torch.nn.utils.rnn import PackedSequence

import delve
from tests.reference import conv_rows, np_stats, recording_tracker, recurrent_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def run_example(monkeypatch, capsys, script, *args):
    """Run ``examples/SCRIPT ARGS`` as ``__main__``; return its stdout and, per epoch, the layers' raw outputs."""
    epochs = []  # per add_saturations(): (layer, mode) -> outputs our hooks saw since the last one

    path = os.path.join(ROOT, "examples", script)
    # What the script's `from delve import CheckLayerSat` gets.
    monkeypatch.setattr(delve, "CheckLayerSat", recording_tracker(delve.CheckLayerSat, epochs))
    monkeypatch.setattr(sys, "argv", [path, *args])
    runpy.run_path(path, run_name="__main__")
    return capsys.readouterr().out, epochs


def check_layers(table, widths, epochs, to_rows, thresh=0.99):
    """Every layer's saturation / intrinsic dimensionality equals numpy's on the rows our hooks saw."""
    assert list(table.index) == list(range(len(epochs)))
    references = {}
    for epoch, outputs in enumerate(epochs):
        for mode in ("train", "eval"):
            for layer, width in widths.items():
                rows = np.concatenate([to_rows(raw) for raw in outputs[(layer, mode)]])
                assert rows.shape[1] == width, (layer, rows.shape)
                ref = np_stats(rows, thresh)
                ratios = np.cumsum(ref["eig"]) / ref["eig"].sum()
                assert np.min(np.abs(ratios - thresh)) > 1e-6  # not on the edge of a step
                assert table.loc[epoch, f"{mode}-intrinsic-dimensionality_{layer}"] == ref["idim"], (epoch, mode, layer)
                assert table.loc[epoch, f"{mode}-saturation_{layer}"] == pytest.approx(ref["lsat"], rel=1e-12)
                references[(epoch, mode, layer)] = ref
    return references


def test_cifar_example_runs_on_synthetic_data(tmp_path, monkeypatch, capsys):
    savefile = str(tmp_path / "cifar")
    out, epochs = run_example(
        monkeypatch, capsys,
        "cifar_cnn.py", "--synthetic", "--epochs", "2", "--batches", "2", "--batch-size", "8", "--width", "4",
        "--savefile", savefile,
    )  # fmt: skip
    assert out.count("epoch ") == 2
    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(table.columns[:3]) == ["train-loss", "test-loss", "test-accuracy"]
    # Channels of the three convolutions (width 4), then the two linear layers.
    widths = {"features-0": 4, "features-3": 8, "features-6": 16, "classifier-1": 128, "classifier-3": 10}
    refs = check_layers(table, widths, epochs, lambda raw: conv_rows(raw, "channelwise") if raw.ndim == 4 else raw)
    for epoch in (0, 1):
        for mode in ("train", "eval"):
            mean = np.mean([refs[(epoch, mode, layer)]["lsat"] for layer in widths])
            assert table.loc[epoch, f"average-{mode}-sat"] == pytest.approx(mean, rel=1e-12)
    assert table["test-accuracy"].between(0, 1).all()


def valid_steps(out):
    """Rows of a layer output by SPEC §3 ``timestepwise``: every valid step of a packed sequence."""
    return recurrent_rows(out, True, "timestepwise") if isinstance(out, PackedSequence) else out


def test_lstm_example_runs_on_packed_variable_length_sequences(tmp_path, monkeypatch, capsys):
    savefile = str(tmp_path / "lstm")
    out, epochs = run_example(
        monkeypatch, capsys,
        "lstm.py", "--epochs", "2", "--batches", "3", "--batch-size", "8", "--hidden", "6",
        "--timeseries-method", "timestepwise", "--savefile", savefile,
    )  # fmt: skip
    assert out.count("epoch ") == 2
    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(table.columns[:2]) == ["train-loss", "test-accuracy"]
    # (With last_timestep, the LSTM's idim would be 3 or 4 instead of 5: the option must reach the tracker.)
    check_layers(table, {"lstm": 6, "head": 4}, epochs, valid_steps)


def test_every_file_the_docs_include_exists():
    included = []
    for name in os.listdir(DOCS):
        if name.endswith(".rst"):
            with open(os.path.join(DOCS, name), encoding="utf-8") as handle:
                included += re.findall(r"^\.\. literalinclude:: (\S+)", handle.read(), flags=re.M)
    assert included, "the examples page includes the example scripts"
    for path in included:
        assert os.path.isfile(os.path.normpath(os.path.join(DOCS, path))), path
