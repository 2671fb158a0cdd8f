"""A user's own writer (examples/custom_writer.py) receives the tracker's values, and resumes."""

import importlib.util
import json
import os

import pandas as pd
import pytest

from delve import CheckLayerSat
from tests.reference import np_stats
from tests.writer_runs import LAYERS, MODES, loss_value, make_model, run_epochs

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "custom_writer.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("custom_writer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_lines(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_the_custom_writer_gets_every_epoch_value(example, tmp_path):
    savefile = str(tmp_path / "run")
    model = make_model()
    tracker = CheckLayerSat(savefile, example.JSONLinesWriter(savefile), model, stats=["lsat", "idim", "cov"])
    rows = run_epochs(tracker, model, epochs=2, train_batches=1)
    tracker.close()

    records = read_lines(savefile + ".jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        epoch = record["epoch"]
        assert record["loss"] == pytest.approx(loss_value(0, epoch))
        for layer in LAYERS:
            for mode in MODES:
                ref = np_stats(rows[epoch][(layer, mode)])
                assert record[f"{mode}-saturation_{layer}"] == pytest.approx(ref["lsat"])
                assert record[f"{mode}-intrinsic-dimensionality_{layer}"] == ref["idim"]
                assert f"{mode}-covariance-matrix_{layer}" not in record  # arrays are skipped

    resumed = CheckLayerSat(savefile, example.JSONLinesWriter(savefile), model, initial_epoch=1)
    first = records[0]
    rows = run_epochs(resumed, model, epochs=2, seed=3, first_epoch=1, train_batches=1)
    resumed.close()
    records = read_lines(savefile + ".jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[0] == first  # the line below initial_epoch is kept as it was
    for record in records[1:]:  # the resumed epochs hold the new run's values
        epoch = record["epoch"]
        assert record["loss"] == pytest.approx(loss_value(3, epoch))
        for layer in LAYERS:
            for mode in MODES:
                ref = np_stats(rows[epoch][(layer, mode)])
                assert record[f"{mode}-saturation_{layer}"] == pytest.approx(ref["lsat"])


def test_the_example_runs(example, tmp_path):
    path = example.main(str(tmp_path / "custom"), epochs=2)
    records = read_lines(path)
    assert [r["epoch"] for r in records] == [0, 1]
    table = pd.read_csv(tmp_path / "custom.csv", sep=";", index_col=0)  # the CSV writer beside it
    for record in records:
        assert record["average-train-sat"] == pytest.approx(table.at[record["epoch"], "average-train-sat"])
        assert record["loss"] == pytest.approx(table.at[record["epoch"], "loss"])
