"""The plot writer and delve.plotting: file names, decoded images, drawn values, no figure leak."""

import gc
import os
import re

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.figure import Figure

from delve import CheckLayerSat
from delve.plotting import epoch_figure, history_figure, plot_table, read_table
from delve.writers import WRITERS, CSVandPlottingWriter
from tests.reference import np_stats
from tests.writer_runs import LAYERS, MODES, aligned, loss_value, make_model, np_embedding, run_epochs

FIGSIZE = (6, 4)  # inches at 100 dpi -> 400 x 600 pixels


def assert_real_png(path, shape=(400, 600)):
    image = mpimg.imread(path)
    assert image.shape[:2] == shape and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.01  # something is drawn


def drawn(ax):
    """What one axes shows: labels, the epoch and mode of its title, bar heights, image, points, lines.

    A spectrum or embed panel is titled by its layer alone: epoch and mode are then None.
    """
    found = re.search(r"\((train|eval)\)", ax.get_title())
    epoch = re.search(r"epoch (\d+)", ax.get_title())
    return {
        "xlabel": ax.get_xlabel(),
        "title": ax.get_title(),
        "mode": found.group(1) if found else None,
        "epoch": int(epoch.group(1)) if epoch else None,
        "ticks": [t.get_text() for t in ax.get_xticklabels()],
        "bars": [bar.get_height() for container in ax.containers for bar in container],
        "lines": [line.get_ydata()[0] for line in ax.get_lines()],
        "image": np.ma.getdata(ax.get_images()[0].get_array()).copy() if ax.get_images() else None,
        "points": np.array(ax.collections[0].get_offsets(), dtype=np.float64) if ax.collections else None,
    }


@pytest.mark.parametrize("key", ["plot", "csvplot", "plotcsv", "csvplotting"])
def test_every_key_makes_the_plot_writer(key):
    assert WRITERS[key] is CSVandPlottingWriter


def test_plot_writer_writes_csv_epoch_bars_history_spectrum_and_embed(tmp_path):
    model = make_model()
    savefile = str(tmp_path / "run")
    calls = []

    def manipulate(ax):
        seen = drawn(ax)  # read now: the writer clears every figure once it is saved
        if seen["epoch"] is None:  # a panel: drawn in the same save as the epoch's bars and history
            seen["epoch"] = calls[-1]["epoch"]
        calls.append(seen)
        return ax

    tracker = CheckLayerSat(
        savefile, "plot", model, stats=["lsat", "spectrum_train", "embed_eval"], average_sat=True,
        writer_args={"fontsize": 8, "figsize": FIGSIZE, "primary_metric": "loss", "plot_manipulation_func": manipulate,
                     "history_every": 1},
    )
    rows = run_epochs(tracker, model, epochs=2)
    tracker.close()

    written = set(os.listdir(tmp_path))
    expected = {f"run_lsat_{m}_epoch_{e}.png" for m in MODES for e in range(2)}
    expected |= {f"run_lsat_{m}_history.png" for m in MODES}
    expected |= {f"run_spectrum_train_epoch_{e}.png" for e in range(2)}
    expected |= {f"run_embed_eval_epoch_{e}.png" for e in range(2)}
    assert written == expected | {"run.csv"}
    for name in expected:
        assert_real_png(str(tmp_path / name))
    # Every axes went through the user's function: per epoch and mode a bar chart and the
    # refreshed history; one panel per layer in each spectrum and embed picture.
    assert len(calls) == 2 * 2 * 2 + 2 * 2 * len(LAYERS)

    table = read_table(savefile + ".csv")
    refs = {(e, layer, mode): np_stats(rows[e][(layer, mode)]) for e in range(2) for layer in LAYERS for mode in MODES}
    for epoch in range(2):
        for layer in LAYERS:
            for mode in MODES:
                assert table.at[epoch, f"{mode}-saturation_{layer}"] == pytest.approx(refs[epoch, layer, mode]["lsat"])

    # What the pictures show is the numpy reference of the rows each layer produced.
    bars = [c for c in calls if c["xlabel"] == "layer"]
    assert sorted((c["mode"], c["epoch"]) for c in bars) == sorted((m, e) for m in MODES for e in range(2))
    for chart in bars:
        epoch, mode = chart["epoch"], chart["mode"]
        assert chart["ticks"] == LAYERS
        expected = [refs[epoch, layer, mode]["lsat"] for layer in LAYERS]
        np.testing.assert_allclose(chart["bars"], expected)
        np.testing.assert_allclose(chart["lines"], [np.mean(expected)])  # the average_sat line
        assert f"loss: {loss_value(0, epoch):.4g}" in chart["title"]
    for mode in MODES:  # the history is redrawn at every save with the epochs so far
        heatmaps = [c["image"] for c in calls if c["xlabel"] == "epoch" and c["mode"] == mode]
        expected = np.array([[refs[e, layer, mode]["lsat"] for e in range(2)] for layer in LAYERS])
        assert len(heatmaps) == 2
        for seen, image in enumerate(heatmaps, start=1):
            np.testing.assert_allclose(image, expected[:, :seen])
    panels = [(e, layer) for e in range(2) for layer in sorted(LAYERS)]  # one per layer and epoch
    spectra = [c for c in calls if c["xlabel"] == "rank"]
    assert sorted((c["epoch"], c["title"]) for c in spectra) == panels
    for panel in spectra:  # spectrum_train only: the rows compared are the train rows
        eig = refs[panel["epoch"], panel["title"], "train"]["eig"]
        assert len(panel["bars"]) == 5  # spectrum_k defaults to 5; a 3-wide layer is padded with zeros
        top = np.concatenate([eig, np.zeros(5)])[:5]
        np.testing.assert_allclose(panel["bars"], top, rtol=1e-6, atol=1e-9 * eig[0])
    scatters = [c for c in calls if c["xlabel"] == "1st eigendirection"]
    assert sorted((c["epoch"], c["title"]) for c in scatters) == panels
    for panel in scatters:  # embed_eval only: the rows compared are the eval rows
        expected = np_embedding(rows[panel["epoch"]][(panel["title"], "eval")])
        assert panel["points"].shape == expected.shape
        np.testing.assert_allclose(aligned(panel["points"], expected), expected, atol=1e-5)


@pytest.mark.parametrize(
    "every, drawn_after_saves, drawn_at_close",
    [
        (1, [[1], [1, 2], [1, 2, 3]], []),
        (2, [[], [2], [2]], [3]),
        (None, [[], [], []], [3]),
        ("default", [[], [], []], [3]),  # only at close: an epoch costs its bar charts alone
    ],
)
def test_history_heatmaps_are_redrawn_every_n_epochs_and_at_close(tmp_path, every, drawn_after_saves, drawn_at_close):
    """``drawn_*``: the number of epochs each heatmap drawn so far shows."""
    model = make_model()
    savefile = str(tmp_path / "run")
    heatmaps = []

    def capture(ax):
        if ax.get_images():  # a heatmap, not a bar chart
            heatmaps.append(np.ma.getdata(ax.get_images()[0].get_array()).copy())
        return ax

    args = {"figsize": (2, 2), "plot_manipulation_func": capture}
    if every != "default":
        args["history_every"] = every
    tracker = CheckLayerSat(savefile, "plot", model, stats=["lsat_train"], writer_args=args)
    rows = {}
    for epoch, drawn in enumerate(drawn_after_saves):
        rows.update(run_epochs(tracker, model, epochs=1, first_epoch=epoch, train_batches=1))
        assert os.path.exists(tmp_path / f"run_lsat_train_epoch_{epoch}.png")  # the bars: at every epoch
        assert [image.shape[1] for image in heatmaps] == drawn
        assert os.path.exists(tmp_path / "run_lsat_train_history.png") == bool(drawn)
    tracker.close()
    assert [image.shape[1] for image in heatmaps] == drawn_after_saves[-1] + drawn_at_close
    expected = np.array([[np_stats(rows[e][(layer, "train")])["lsat"] for e in range(3)] for layer in LAYERS])
    for image in heatmaps:
        np.testing.assert_allclose(image, expected[:, : image.shape[1]])
    assert_real_png(str(tmp_path / "run_lsat_train_history.png"), shape=(200, 200))


def test_epoch_figure_draws_the_table_values_in_tracking_order(tmp_path):
    model = make_model()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "csv", model, stats=["lsat", "trc"], average_sat=True)
    rows = run_epochs(tracker, model, epochs=2)
    tracker.close()
    table = read_table(savefile + ".csv")

    figure = epoch_figure(table, "lsat", "eval", 1, figsize=FIGSIZE, primary_metric="loss")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS  # tracking order, not sorted
    assert ax.get_ylim() == (0.0, 1.0)
    heights = [bar.get_height() for bar in ax.containers[0]]
    expected = [np_stats(rows[1][(layer, "eval")])["lsat"] for layer in LAYERS]
    np.testing.assert_allclose(heights, expected)
    average = [line.get_ydata()[0] for line in ax.get_lines()]
    assert average == pytest.approx([np.mean(expected)])
    assert f"loss: {loss_value(0, 1):.4g}" in ax.get_title()

    figure = epoch_figure(table, "trc", "train", 0, figsize=FIGSIZE,
                          plot_manipulation_func=lambda ax: ax.set_yscale("log") or ax)
    ax = figure.axes[0]
    assert ax.get_yscale() == "log"
    heights = [bar.get_height() for bar in ax.containers[0]]
    expected = [np_stats(rows[0][(layer, "train")])["trc"] for layer in LAYERS]
    np.testing.assert_allclose(heights, expected, rtol=1e-6)


def test_history_figure_is_a_layers_by_epochs_heatmap_of_the_table(tmp_path):
    model = make_model()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "csv", model, stats=["idim"])
    rows = run_epochs(tracker, model, epochs=4)
    tracker.close()
    table = read_table(savefile + ".csv")

    figure = history_figure(table, "idim", "train", figsize=FIGSIZE)
    ax = figure.axes[0]
    image = np.ma.getdata(ax.get_images()[0].get_array())
    expected = [[np_stats(rows[e][(layer, "train")])["idim"] for e in range(4)] for layer in LAYERS]
    np.testing.assert_array_equal(image, expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]


def test_plot_table_redraws_a_csv_for_chosen_epochs(tmp_path):
    model = make_model()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "csv", model, stats=["lsat_train"])
    run_epochs(tracker, model, epochs=3, train_batches=1)
    tracker.close()
    table = read_table(savefile + ".csv")

    out = str(tmp_path / "pictures" / "again")
    paths = plot_table(table, out, epochs=[2], figsize=FIGSIZE, primary_metric="loss")
    assert sorted(paths) == [f"{out}_lsat_train_epoch_2.png", f"{out}_lsat_train_history.png"]
    for path in paths:
        assert_real_png(path)
    paths = plot_table(table, out, figsize=(2, 2))  # every epoch by default
    assert paths == [f"{out}_lsat_train_epoch_{e}.png" for e in range(3)] + [f"{out}_lsat_train_history.png"]

    with pytest.raises(ValueError, match="epochs \\[7\\]"):
        plot_table(table, out, epochs=[7])
    with pytest.raises(ValueError, match="'accuracy'.*loss"):
        plot_table(table, out, primary_metric="accuracy")


def live_figures():
    gc.collect()
    return sum(type(obj) is Figure for obj in gc.get_objects())


def test_many_epochs_leave_no_figure_behind_and_stopped_epochs_are_skipped(tmp_path):
    before = live_figures()
    model = make_model()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "plot", model, stats=["lsat_train"], writer_args={"figsize": (2, 2)})
    run_epochs(tracker, model, epochs=4, train_batches=1, batch=8)
    tracker.stop()
    run_epochs(tracker, model, epochs=1, first_epoch=4, train_batches=1, batch=8)
    tracker.resume()
    run_epochs(tracker, model, epochs=1, first_epoch=5, train_batches=1, batch=8)
    tracker.close()
    assert live_figures() == before

    written = set(os.listdir(tmp_path))
    assert written == {"run.csv", "run_lsat_train_history.png"} | {
        f"run_lsat_train_epoch_{e}.png" for e in (0, 1, 2, 3, 5)  # a stopped epoch has nothing to draw
    }
    table = read_table(savefile + ".csv")
    heatmap = history_figure(table, "lsat", "train")
    values = heatmap.axes[0].get_images()[0].get_array()
    assert values.shape == (len(LAYERS), 6)
    assert values.mask[:, 4].all() and not values.mask[:, 5].any()


@pytest.mark.parametrize(
    "args, message",
    [
        ({"fontsize": -3}, "fontsize must be a positive number, got -3"),
        ({"figsize": (4,)}, "figsize must be a pair"),
        ({"figsize": (4, 0)}, "figsize must be a pair of positive numbers"),
        ({"plot_manipulation_func": 3}, "plot_manipulation_func must be a callable"),
        ({"primary_metric": 1}, "primary_metric must be the name"),
        ({"history_every": 0}, "history_every must be an integer >= 1 or None, got 0"),
    ],
)
def test_bad_plot_options_fail_at_construction(tmp_path, args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CheckLayerSat(str(tmp_path / "run"), "plot", make_model(), writer_args=args)
    assert os.listdir(tmp_path) == []


def test_unrecorded_primary_metric_only_warns(tmp_path, caplog):
    model = make_model()
    tracker = CheckLayerSat(str(tmp_path / "run"), "plot", model, stats=["lsat_train"],
                            writer_args={"primary_metric": "accuracy", "figsize": (2, 2)})
    run_epochs(tracker, model, epochs=2, train_batches=1)
    tracker.close()
    assert sum("primary_metric 'accuracy'" in r.getMessage() for r in caplog.records) == 1
    assert os.path.exists(tmp_path / "run_lsat_train_epoch_1.png")
