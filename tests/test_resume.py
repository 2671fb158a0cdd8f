"""initial_epoch: a resumed run continues every writer's output; a new run replaces it."""

import io
import json
import os

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from delve import CheckLayerSat, reconstruct_csv_from_npy_data
from delve.plotting import history_figure, png_bytes
from delve.writers.npy_writer import STATE_FILE
from tests.reference import np_cov, np_stats, rel_err
from tests.writer_runs import LAYERS, loss_value, make_model, run_epochs

STATS = ["lsat_train", "trc_train", "cov_train"]


def tb_series(logdir):
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tb_images(logdir):
    events = EventAccumulator(str(logdir), size_guidance={"images": 0})
    events.Reload()
    return {tag: [(e.step, e.encoded_image_string) for e in events.Images(tag)] for tag in events.Tags()["images"]}


def pixels(png):
    return mpimg.imread(io.BytesIO(png), format="png")


def read_table(path):
    """The CSV file as SPEC §6 lays it out, read with pandas alone (separator ``;``, epoch index)."""
    return pd.read_csv(path, sep=";", index_col=0)


def npy_state(savefile):
    with open(os.path.join(savefile, STATE_FILE)) as handle:
        return {e["key"]: e["epochs"] for e in json.load(handle)["entries"]}


def file_bytes(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder) for name in names
    }


def track(savefile, save_to, model, **kwargs):
    # Small pictures, and fewer of them with the plot writer: drawing is the slow part.
    stats = ["lsat_train", "cov_train"] if "plot" in save_to else STATS
    return CheckLayerSat(savefile, save_to, model, stats=stats, writer_args={"figsize": (2, 2)}, **kwargs)


def check_epoch(table, events, savefile, rows, epoch, seed):
    """Every writer holds, at ``epoch``, the values of the rows the run with ``seed`` produced."""
    assert table.at[epoch, "loss"] == pytest.approx(loss_value(seed, epoch))
    assert dict(events["loss"])[epoch] == pytest.approx(loss_value(seed, epoch))
    for layer in LAYERS:
        data = rows[epoch][(layer, "train")]
        ref = np_stats(data)
        assert table.at[epoch, f"train-saturation_{layer}"] == pytest.approx(ref["lsat"])
        assert dict(events[f"train-saturation/{layer}"])[epoch] == pytest.approx(ref["lsat"])
        if f"train-covariance-trace_{layer}" in table:
            assert table.at[epoch, f"train-covariance-trace_{layer}"] == pytest.approx(ref["trc"], rel=1e-6)
            assert dict(events[f"train-covariance-trace/{layer}"])[epoch] == pytest.approx(ref["trc"], rel=1e-5)
        key = f"train-covariance-matrix_{layer}"
        stored = os.path.join(savefile, key, f"{key}_epoch{epoch}.npy")
        assert rel_err(np.load(stored, allow_pickle=False), np_cov(data)) <= 1e-6


def test_a_run_resumed_at_epoch_3_continues_every_writer(tmp_path):
    savefile = str(tmp_path / "run")
    model = make_model()
    first = track(savefile, ["npy", "tb", "plot"], model)
    rows = run_epochs(first, model, epochs=3, seed=0, train_batches=2)
    first.close()
    csv_before = read_table(savefile + ".csv")
    npy_before = file_bytes(savefile)
    tb_before = tb_series(savefile)
    images_before = tb_images(savefile)
    png_before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path) if n.endswith(".png")}
    assert len(png_before) == 3 + 1  # three epochs and the history of lsat (train)

    second = track(savefile, ["npy", "tb", "plot"], model, initial_epoch=3)
    rows.update(run_epochs(second, model, epochs=2, seed=1, first_epoch=3, train_batches=2))
    second.close()

    table = read_table(savefile + ".csv")
    events = tb_series(savefile)
    assert list(table.index) == [0, 1, 2, 3, 4]
    pd.testing.assert_frame_equal(table.loc[[0, 1, 2]], csv_before)
    for epoch in range(5):
        check_epoch(table, events, savefile, rows, epoch, seed=0 if epoch < 3 else 1)

    assert all(epochs == [0, 1, 2, 3, 4] for epochs in npy_state(savefile).values())
    after = file_bytes(savefile)
    for name, content in npy_before.items():
        if name.endswith(".npy"):
            assert after[name] == content  # earlier epochs untouched
    pd.testing.assert_frame_equal(reconstruct_csv_from_npy_data(savefile), table, check_index_type=False)

    assert set(events) == set(tb_before)
    for tag, values in events.items():
        assert [step for step, _ in values] == [0, 1, 2, 3, 4], tag
        assert values[:3] == tb_before[tag]
    images = tb_images(savefile)
    assert list(images) == list(images_before) == ["train-saturation/history"]
    heatmaps = images["train-saturation/history"]
    assert [step for step, _ in heatmaps] == [0, 1, 2, 3, 4]  # no step twice
    assert heatmaps[:3] == images_before["train-saturation/history"]
    for step, png in heatmaps[3:]:  # the resumed run's heatmaps hold the first run's epochs too
        expected = png_bytes(history_figure(table.loc[:step], "lsat", "train", figsize=(2, 2)))
        np.testing.assert_array_equal(pixels(png), pixels(expected))

    for name, content in png_before.items():
        if "_epoch_" in name:
            assert open(tmp_path / name, "rb").read() == content
        else:  # the history now covers five epochs
            assert open(tmp_path / name, "rb").read() != content
    for epoch in (3, 4):
        assert os.path.exists(tmp_path / f"run_lsat_train_epoch_{epoch}.png")


def test_resuming_inside_the_old_run_replaces_the_overlap_once(tmp_path):
    savefile = str(tmp_path / "run")
    model = make_model()
    first = track(savefile, ["npy", "tb", "csv"], model)
    rows = run_epochs(first, model, epochs=4, seed=0, train_batches=1)  # epochs 0..3
    first.close()
    second = track(savefile, ["npy", "tb", "csv"], model, initial_epoch=3)
    rows.update(run_epochs(second, model, epochs=2, seed=1, first_epoch=3, train_batches=1))
    second.close()

    table = read_table(savefile + ".csv")
    events = tb_series(savefile)
    assert list(table.index) == [0, 1, 2, 3, 4]
    for tag, values in events.items():
        assert [step for step, _ in values] == [0, 1, 2, 3, 4], tag  # no duplicated step 3
    for tag, values in tb_images(savefile).items():
        assert [step for step, _ in values] == [0, 1, 2, 3, 4], tag
    for epoch in range(5):
        check_epoch(table, events, savefile, rows, epoch, seed=0 if epoch < 3 else 1)
    assert all(epochs == [0, 1, 2, 3, 4] for epochs in npy_state(savefile).values())


def test_initial_epoch_0_starts_fresh_in_every_writer(tmp_path):
    savefile = str(tmp_path / "run")
    model = make_model()
    first = track(savefile, ["npy", "tb", "csv"], model)
    run_epochs(first, model, epochs=4, seed=0, train_batches=1)
    first.close()
    second = track(savefile, ["npy", "tb", "csv"], model)
    rows = run_epochs(second, model, epochs=2, seed=1, train_batches=1)
    second.close()

    table = read_table(savefile + ".csv")
    events = tb_series(savefile)
    assert list(table.index) == [0, 1]
    for tag, values in events.items():
        assert [step for step, _ in values] == [0, 1], tag
    for tag, values in tb_images(savefile).items():
        assert [step for step, _ in values] == [0, 1], tag
    for epoch in range(2):
        check_epoch(table, events, savefile, rows, epoch, seed=1)
    assert all(epochs == [0, 1] for epochs in npy_state(savefile).values())
    assert not [name for name in file_bytes(savefile) if "_epoch2" in name or "_epoch3" in name]
    assert list(reconstruct_csv_from_npy_data(savefile).index) == [0, 1]


def test_resuming_without_saved_state_warns_and_starts_at_initial_epoch(tmp_path, caplog):
    savefile = str(tmp_path / "run")
    model = make_model()
    tracker = track(savefile, ["npy", "tb", "plot"], model, initial_epoch=3)
    rows = run_epochs(tracker, model, epochs=1, first_epoch=3, train_batches=1)
    tracker.close()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "no CSV to resume" in messages and "no npy state to resume" in messages
    assert "no TensorBoard events to resume" in messages
    table = read_table(savefile + ".csv")
    assert list(table.index) == [3]
    check_epoch(table, tb_series(savefile), savefile, rows, 3, seed=0)
