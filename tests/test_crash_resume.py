"""A run killed mid-epoch, or inside any writer's save, keeps its completed epochs; a new tracker resumes from them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import image
from torch import nn

import delve
from delve import CheckLayerSat, reconstruct_csv_from_npy_data
from delve.metrics import STATMAP
from tests.reference import OutputCapture, np_stats

EPOCHS = 5
KILLED_IN = 3  # epochs 0..2 complete, epoch 3 interrupted
STEPS = 4
STATS = ["idim", "trc", "dtrc"]


def make_model() -> nn.Module:
    # Fixed weights keep the reference independent of any optimiser state the killed run carried.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def batch(epoch: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * epoch + step)
    return torch.randn(20, 6, generator=gen) * (1.0 + epoch) + step


#: save_to, writer_args and stats of each crash: "mid" is killed between batches, the others inside their
#: writer's save. The plot writer draws one picture per stat: one stat keeps it quick.
WRITERS = {
    "mid": ("csv", {}, STATS),
    "csv": ("csv", {}, STATS),
    "npy": ("npy", {}, STATS),
    "zip": ("npy", {"zip": True}, STATS),
    "plot": ("plot", {"figsize": (2, 2)}, ["idim"]),
    "tb": ("tb", {}, STATS),
}

# The training script uses this module's model and data; it signals progress through a file.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from delve import CheckLayerSat
    from test_crash_resume import WRITERS, KillPoint, batch, make_model

    savefile, progress, kind = sys.argv[1:4]
    killed_in, epochs, steps = map(int, sys.argv[4:])
    model = make_model()

    def say(text):
        with open(progress, "a") as handle:
            handle.write(text + "\\n")

    point = KillPoint(kind, killed_in, say)
    save_to, writer_args, stats = WRITERS[kind]
    tracker = CheckLayerSat(savefile, save_to, model, stats=stats, writer_args=writer_args)
    with torch.no_grad():
        for epoch in range(epochs):
            for step in range(steps):
                model(batch(epoch, step))
                if kind == "mid" and epoch == killed_in and step == steps // 2:
                    point.block()
            point.armed = epoch == killed_in
            tracker.add_saturations()
            say(f"done {epoch}")
    """
)


class KillPoint:
    """In the training script only: stop inside a writer's save, half-way through a file, for the test to kill.

    Once ``armed`` (the epoch to be killed), the save of the writer ``kind`` writes part
    of a file, as a process killed in the middle of it would leave it, says so in the
    progress file and waits to be killed (at most two minutes, so nothing hangs).
    """

    def __init__(self, kind, epoch, say):
        self.kind, self.epoch, self.say = kind, epoch, say
        self.armed = False
        patch = getattr(self, f"_patch_{kind}", None)
        if patch is not None:
            patch()

    def block(self):
        self.say(f"in {self.kind}")
        time.sleep(120)

    def _patch_csv(self):
        from delve.writers import csv_writer

        write_table = csv_writer.write_table

        def half_then_block(table, target):
            if self.armed:
                write_table(table.iloc[:1], target)  # the temporary file holds a first part
                self.block()
            write_table(table, target)

        csv_writer.write_table = half_then_block

    def _patch_npy(self):
        save, calls = np.save, []

        def third_file_cut_short(file, array, **kwargs):
            if self.armed:
                calls.append(file)
                if len(calls) == 3:  # two files of the epoch are complete, the third is cut short
                    with open(file, "wb") as handle:
                        handle.write(b"\x93NUMPY\x01\x00")
                    self.block()
            save(file, array, **kwargs)

        np.save = third_file_cut_short

    def _patch_zip(self):
        import zipfile

        write = zipfile.ZipFile.write

        def one_member_then_block(archive, *args, **kwargs):
            result = write(archive, *args, **kwargs)
            if self.armed and archive.mode == "a":  # adding in place: the old directory is overwritten
                archive.fp.flush()
                self.block()
            return result

        zipfile.ZipFile.write = one_member_then_block

    def _patch_plot(self):
        from matplotlib.figure import Figure

        savefig = Figure.savefig

        def png_header_then_block(figure, fname, *args, **kwargs):
            if self.armed:
                with open(fname, "wb") as handle:
                    handle.write(b"\x89PNG\r\n\x1a\n")
                self.block()
            return savefig(figure, fname, *args, **kwargs)

        Figure.savefig = png_header_then_block

    def _patch_tb(self):
        import struct

        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import RecordWriter

        write = RecordWriter.write

        def record_cut_short(writer, data):
            # tensorboardX writes from a thread of its own: the epoch's first event is cut short
            # there, and the tracker's save then waits for that thread (a lock) in its flush.
            if Event.FromString(data).step == self.epoch:
                writer._writer.write(struct.pack("Q", len(data)))
                writer._writer.flush()
                self.block()
            write(writer, data)

        RecordWriter.write = record_cut_short


def _reference(epoch: int, stats=STATS) -> dict:
    """numpy float64 statistics of one epoch, from outputs this test captures itself."""
    model = make_model()
    capture = OutputCapture({"0": model[0], "2": model[2]})
    with torch.no_grad():
        for step in range(STEPS):
            model(batch(epoch, step))
    capture.remove()
    expected = {}
    for name in ("0", "2"):
        ref = np_stats(np.concatenate(capture.take(name, "train")))
        for stat in stats:
            expected[f"train-{STATMAP[stat]}_{name}"] = ref[stat]
    return expected


def _check_rows(table: pd.DataFrame, epochs, stats=STATS) -> None:
    for epoch in epochs:
        for column, value in _reference(epoch, stats).items():
            assert table.loc[epoch, column] == pytest.approx(value, rel=1e-6), (epoch, column)


def _run_until_killed(tmp_path, kind: str) -> str:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    progress = tmp_path / "progress.txt"
    savefile = str(tmp_path / "run" / "stats")
    here = os.path.dirname(os.path.abspath(__file__))  # the script imports this module, which imports tests.reference
    paths = [os.path.dirname(os.path.dirname(delve.__file__)), here, os.path.dirname(here)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.Popen(
        [sys.executable, str(script), savefile, str(progress), kind, str(KILLED_IN), str(EPOCHS), str(STEPS)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (progress.exists() and f"in {kind}" in progress.read_text()):
            if proc.poll() is not None:
                pytest.fail(f"training script exited early: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"training script never reached its kill point {kind!r}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert progress.read_text().splitlines() == [f"done {e}" for e in range(KILLED_IN)] + [f"in {kind}"]
    return savefile


def _resume(savefile: str, kind: str) -> None:
    save_to, writer_args, stats = WRITERS[kind]
    model = make_model()
    tracker = CheckLayerSat(savefile, save_to, model, stats=stats, writer_args=writer_args, initial_epoch=KILLED_IN)
    with torch.no_grad():
        for epoch in range(KILLED_IN, EPOCHS):
            for step in range(STEPS):
                model(batch(epoch, step))
            assert tracker.add_saturations()  # not empty
    tracker.close()


def _no_temporary_files(folder) -> None:
    left = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.startswith(".")]
    assert not left, left


def test_sigkill_mid_epoch_then_resume(tmp_path):
    savefile = _run_until_killed(tmp_path, "mid")

    # The completed epochs are on disk, whole; nothing half-written is left behind.
    assert os.listdir(os.path.dirname(savefile)) == ["stats.csv"]
    crashed = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(crashed.index) == list(range(KILLED_IN))
    _check_rows(crashed, range(KILLED_IN))

    _resume(savefile, "mid")
    final = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(final.index) == list(range(EPOCHS))
    assert list(final.columns) == list(crashed.columns)
    pd.testing.assert_frame_equal(final.loc[: KILLED_IN - 1], crashed)  # earlier rows unchanged
    _check_rows(final, range(KILLED_IN, EPOCHS))


def _tb_table(logdir) -> pd.DataFrame:
    """The scalars of a TensorBoard folder as a table (one row per step, one column per key); steps seen twice fail."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    columns = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)  # no step written twice
        # a tag is the key, or the key with its layer after a "/"; these layer names hold neither "/" nor "_"
        columns[tag.replace("/", "_")] = pd.Series({e.step: e.value for e in events.Scalars(tag)})
    return pd.DataFrame(columns)


def _read(savefile: str, kind: str) -> pd.DataFrame:
    """The table of statistics a writer of ``kind`` holds on disk."""
    if kind in ("csv", "plot"):
        return pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    if kind in ("npy", "zip"):
        return reconstruct_csv_from_npy_data(savefile)
    return _tb_table(savefile)


@pytest.mark.parametrize("kind", ["csv", "npy", "zip", "plot", "tb"])
def test_sigkill_inside_a_writers_save_then_resume(tmp_path, kind):
    savefile = _run_until_killed(tmp_path, kind)

    crashed = _read(savefile, kind)
    # the completed epochs are whole (the plot writer saves its CSV before drawing: the killed epoch may be there)
    assert list(crashed.index)[:KILLED_IN] == list(range(KILLED_IN)) and len(crashed.index) <= KILLED_IN + 1
    _check_rows(crashed, range(KILLED_IN), WRITERS[kind][2])

    _resume(savefile, kind)
    final = _read(savefile, kind)
    assert list(final.index) == list(range(EPOCHS))  # each epoch once
    assert sorted(final.columns) == sorted(crashed.columns)
    pd.testing.assert_frame_equal(final.loc[: KILLED_IN - 1, crashed.columns], crashed.loc[: KILLED_IN - 1])
    _check_rows(final, range(EPOCHS), WRITERS[kind][2])
    _no_temporary_files(tmp_path / "run")

    if kind == "zip":  # the archive the kill left torn is whole again, each file once
        with zipfile.ZipFile(savefile + ".zip") as archive:
            assert archive.testzip() is None
            names = archive.namelist()
            assert len(names) == len(set(names))
            archive.extractall(tmp_path / "extracted")
        pd.testing.assert_frame_equal(reconstruct_csv_from_npy_data(str(tmp_path / "extracted" / "stats")), final)
    if kind == "plot":  # every epoch's picture is a whole PNG, the one the kill cut short included
        for epoch in range(EPOCHS):
            picture = image.imread(f"{savefile}_idim_train_epoch_{epoch}.png")
            assert picture.ndim == 3 and picture.shape[0] > 10


def test_a_failing_save_leaves_the_previous_file(tmp_path, monkeypatch, caplog):
    savefile = str(tmp_path / "stats")
    model = make_model()
    tracker = CheckLayerSat(savefile, "csv", model, stats=STATS)
    with torch.no_grad():
        model(batch(0, 0))
    tracker.add_saturations()
    before = open(savefile + ".csv").read()

    def half_then_fail(self, path, *args, **kwargs):
        with open(path, "w") as handle:
            handle.write(";half a row")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    caplog.set_level(logging.ERROR, logger="delve")
    with torch.no_grad():
        model(batch(1, 0))
    with pytest.warns(RuntimeWarning, match=r"CSVWriter\(.*\)\.save\(\) failed at epoch 1 with OSError: disk full"):
        tracker.add_saturations()  # the failure is reported, training goes on
    assert any(r.exc_info for r in caplog.records if "save() failed" in r.getMessage())  # with its traceback
    assert open(savefile + ".csv").read() == before
    assert os.listdir(tmp_path) == ["stats.csv"]
    tracker.close()
