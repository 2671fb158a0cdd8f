"""The example scripts the documentation shows run, and write the table they promise."""

import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def run_example(script, *args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def check_layers(table, widths):
    """Every layer has consistent train and eval saturation / intrinsic dimensionality columns."""
    for mode in ("train", "eval"):
        for layer, width in widths.items():
            lsat = table[f"{mode}-saturation_{layer}"].to_numpy()
            idim = table[f"{mode}-intrinsic-dimensionality_{layer}"].to_numpy()
            assert np.all((idim >= 1) & (idim <= width)), (mode, layer, idim)
            np.testing.assert_allclose(lsat, idim / width, rtol=1e-12)


def test_cifar_example_runs_on_synthetic_data(tmp_path):
    savefile = str(tmp_path / "cifar")
    out = run_example(
        "cifar_cnn.py", "--synthetic", "--epochs", "2", "--batches", "2", "--batch-size", "8", "--width", "4",
        "--savefile", savefile,
    )
    assert out.count("epoch ") == 2
    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1]
    assert list(table.columns[:3]) == ["train-loss", "test-loss", "test-accuracy"]
    # Channels of the three convolutions (width 4), then the two linear layers.
    widths = {"features-0": 4, "features-3": 8, "features-6": 16, "classifier-1": 128, "classifier-3": 10}
    check_layers(table, widths)
    for mode in ("train", "eval"):
        mean = table[[f"{mode}-saturation_{layer}" for layer in widths]].mean(axis=1)
        np.testing.assert_allclose(table[f"average-{mode}-sat"], mean, rtol=1e-12)
    assert table["test-accuracy"].between(0, 1).all()


def test_lstm_example_runs_on_packed_variable_length_sequences(tmp_path):
    savefile = str(tmp_path / "lstm")
    out = run_example(
        "lstm.py", "--epochs", "2", "--batches", "3", "--batch-size", "8", "--hidden", "6",
        "--timeseries-method", "timestepwise", "--savefile", savefile,
    )
    assert out.count("epoch ") == 2
    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1]
    assert list(table.columns[:2]) == ["train-loss", "test-accuracy"]
    check_layers(table, {"lstm": 6, "head": 4})


def test_every_file_the_docs_include_exists():
    included = []
    for name in os.listdir(DOCS):
        if name.endswith(".rst"):
            with open(os.path.join(DOCS, name), encoding="utf-8") as handle:
                included += re.findall(r"^\.\. literalinclude:: (\S+)", handle.read(), flags=re.M)
    assert included, "the examples page includes the example scripts"
    for path in included:
        assert os.path.isfile(os.path.normpath(os.path.join(DOCS, path))), path

