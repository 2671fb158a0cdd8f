"""The TensorBoard writer: event files read back with TensorBoard's own reader."""

import io
import os
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from delve import CheckLayerSat
from delve.keys import layer_key, parse_tag
from delve.plotting import history_figure, png_bytes, read_table
from delve.writers import WRITERS, TensorBoardWriter
from tests.reference import np_stats
from tests.writer_runs import LAYERS, MODES, loss_value, make_model, run_epochs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGSIZE = (4, 3)  # inches at 100 dpi -> 300 x 400 pixels


def read_events(logdir):
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def series(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def decoded(png):
    return mpimg.imread(io.BytesIO(png), format="png")


@pytest.mark.parametrize("key", ["tensorboard", "tb"])
def test_keys(key):
    assert WRITERS[key] is TensorBoardWriter


def test_values_are_grouped_by_statistic_with_the_csv_values(tmp_path):
    model = make_model()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, ["tb", "csv"], model, stats=["lsat", "trc", "spectrum", "cov", "embed"],
                            spectrum_k=3, average_sat=True, writer_args={"images": False})
    rows = run_epochs(tracker, model, epochs=1)
    assert series(read_events(savefile), "loss") == [(0, pytest.approx(loss_value(0, 0)))]  # flushed at save
    rows.update(run_epochs(tracker, model, epochs=2, first_epoch=1))
    tracker.close()

    events = read_events(savefile)
    per_layer = [f"{m}-{s}/{layer}" for m in MODES for layer in LAYERS for s in ("saturation", "covariance-trace")]
    ranks = [f"{m}-spectrum/{layer}/rank-{i}" for m in MODES for layer in LAYERS for i in (1, 2, 3)]
    assert sorted(events.Tags()["scalars"]) == sorted(
        per_layer + ranks + ["loss", "train-saturation/average", "eval-saturation/average"]
    )  # cov and embed are arrays: not TensorBoard scalars
    assert events.Tags()["images"] == []  # images=False
    table = read_table(savefile + ".csv")
    # Every CSV column is one tag, read back as the column's key, with the same values.
    for column in table.columns:
        tag = expected_tag(column)
        assert series(events, tag) == [(e, pytest.approx(table.at[e, column], rel=1e-6)) for e in range(3)]
    for mode in MODES:
        lsats = {e: [] for e in range(3)}
        for layer in LAYERS:
            refs = [np_stats(rows[e][(layer, mode)]) for e in range(3)]
            for e in range(3):
                lsats[e].append(refs[e]["lsat"])
            got = series(events, f"{mode}-saturation/{layer}")
            assert got == [(e, pytest.approx(refs[e]["lsat"], rel=1e-6)) for e in range(3)]
            got = series(events, f"{mode}-covariance-trace/{layer}")
            assert got == [(e, pytest.approx(refs[e]["trc"], rel=1e-5)) for e in range(3)]
            for rank in (1, 2, 3):
                got = series(events, f"{mode}-spectrum/{layer}/rank-{rank}")
                expected = [(e, pytest.approx(refs[e]["eig"][rank - 1], rel=1e-5, abs=1e-9)) for e in range(3)]
                assert got == expected
        assert series(events, f"{mode}-saturation/average") == [
            (e, pytest.approx(np.mean(lsats[e]))) for e in range(3)
        ]


def expected_tag(column):
    """The tag of a CSV column (SPEC §6 key), made here from the column's parts."""
    if column == "loss":
        return column
    if column.startswith("average-"):  # average-{mode}-sat
        return f"{column.split('-')[1]}-saturation/average"
    mode, rest = column.split("-", 1)  # {mode}-{stem}_{layer}
    stem, layer = rest.split("_", 1)
    return f"{mode}-{stem}/{layer}"


def test_a_tag_reads_back_as_the_key_it_was_made_from():
    for mode in MODES:
        for stat in ("lsat", "idim", "trc", "erank"):
            for layer in ("features-0", "a_b", "x/y", "average2"):
                key = layer_key(mode, stat, layer)
                back = parse_tag(key.tag)
                assert back == key and (back.mode, back.stat, back.layer) == (mode, stat, layer)
        average = parse_tag(f"{mode}-saturation/average")
        assert average == f"average-{mode}-sat" and average.is_average
    assert parse_tag("loss") is None and parse_tag("train-saturation_zeta") is None


def test_heatmaps_are_images_at_every_epoch_drawn_like_the_csv_history(tmp_path):
    model = make_model()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, ["tb", "csv"], model, stats=["lsat", "trc_train", "spectrum"],
                            writer_args={"figsize": FIGSIZE})
    run_epochs(tracker, model, epochs=3, train_batches=1)
    tracker.close()

    events = read_events(savefile)
    groups = [("lsat", "train"), ("trc", "train"), ("lsat", "eval")]
    stems = {"lsat": "saturation", "trc": "covariance-trace"}
    # One image tag per scalar statistic and mode that was asked for (spectrum is a vector).
    assert sorted(events.Tags()["images"]) == sorted(f"{m}-{stems[s]}/history" for s, m in groups)
    table = read_table(savefile + ".csv")
    for stat, mode in groups:
        images = events.Images(f"{mode}-{stems[stat]}/history")
        assert [image.step for image in images] == [0, 1, 2]
        for image in images:
            pixels = decoded(image.encoded_image_string)
            assert (image.height, image.width) == pixels.shape[:2] == (300, 400)
            assert pixels[..., :3].std() > 0.01  # something is drawn
            # The picture the plot writer draws of the CSV's epochs so far.
            reference = history_figure(table.loc[: image.step], stat, mode, figsize=FIGSIZE)
            np.testing.assert_array_equal(pixels, decoded(png_bytes(reference)))


def test_images_off_draws_nothing_and_never_imports_matplotlib(tmp_path):
    code = (
        "import sys, torch\n"
        "from delve import CheckLayerSat\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 3))\n"
        f"tracker = CheckLayerSat({str(tmp_path / 'run')!r}, 'tb', model, stats=['lsat', 'idim'],\n"
        "                        writer_args={'images': False})\n"
        "for epoch in range(2):\n"
        "    model(torch.randn(8, 4))\n"
        "    tracker.add_saturations()\n"
        "tracker.close()\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    events = read_events(tmp_path / "run")
    assert events.Tags()["images"] == []
    assert [step for step, _ in series(events, "train-saturation/0")] == [0, 1]


def test_a_resume_reads_what_a_killed_run_left_and_skips_an_unreadable_file(tmp_path, caplog):
    model = make_model()
    savefile = str(tmp_path / "run")
    first = CheckLayerSat(savefile, ["tb", "csv"], model, stats=["lsat_train"], writer_args={"figsize": FIGSIZE})
    run_epochs(first, model, epochs=3, train_batches=1)
    first.close()
    last = sorted(os.listdir(savefile))[-1]  # one file per save: the last one is epoch 2's
    with open(os.path.join(savefile, last), "r+b") as handle:  # a run killed while writing it
        handle.truncate(os.path.getsize(handle.name) - 7)
    with open(os.path.join(savefile, "events.out.tfevents.0.garbage"), "wb") as handle:
        handle.write(b"\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00not a protobuf\x00\x00\x00\x00")

    second = CheckLayerSat(savefile, ["tb", "csv"], model, stats=["lsat_train"], writer_args={"figsize": FIGSIZE},
                           initial_epoch=2)
    run_epochs(second, model, epochs=1, first_epoch=2, train_batches=1, seed=1)
    second.close()
    assert any("could not read the TensorBoard events" in r.getMessage() and "garbage" in r.getMessage()
               for r in caplog.records)
    table = read_table(savefile + ".csv")
    (image,) = [i for i in read_events(savefile).Images("train-saturation/history") if i.step == 2]
    # Epochs 0 and 1 of the killed run are read back: the heatmap at epoch 2 is the whole run's.
    reference = history_figure(table.loc[:2], "lsat", "train", figsize=FIGSIZE)
    np.testing.assert_array_equal(decoded(image.encoded_image_string), decoded(png_bytes(reference)))


@pytest.mark.parametrize(
    "args, message",
    [
        ({"flush_secs": 0}, "flush_secs must be a positive integer, got 0"),
        ({"images": "yes"}, "images must be True or False, got 'yes'"),
        ({"figsize": (4, 0)}, "figsize must be a pair of positive numbers"),
    ],
)
def test_bad_arguments_fail_at_construction(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        CheckLayerSat(str(tmp_path / "run"), "tb", make_model(), writer_args=args)
    assert os.listdir(tmp_path) == []
