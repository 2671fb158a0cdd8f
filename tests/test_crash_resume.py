"""A run killed mid-epoch keeps its completed epochs on disk; a new tracker resumes from them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import delve
from delve import CheckLayerSat
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


# The training script uses this module's model and data; it signals progress through a file.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from delve import CheckLayerSat
    from test_crash_resume import STATS, batch, make_model

    savefile, progress, killed_in, epochs, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    model = make_model()
    tracker = CheckLayerSat(savefile, "csv", model, stats=STATS)

    def say(text):
        with open(progress, "a") as handle:
            handle.write(text + "\\n")

    with torch.no_grad():
        for epoch in range(epochs):
            for step in range(steps):
                model(batch(epoch, step))
                if epoch == killed_in and step == steps // 2:
                    say(f"mid {epoch}")
                    time.sleep(120)  # waits here for SIGKILL
            tracker.add_saturations()
            say(f"done {epoch}")
    """
)


def _reference(epoch: int) -> dict:
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
        expected[f"train-intrinsic-dimensionality_{name}"] = ref["idim"]
        expected[f"train-covariance-trace_{name}"] = ref["trc"]
        expected[f"train-diagonal-trace_{name}"] = ref["dtrc"]
    return expected


def _check_rows(table: pd.DataFrame, epochs) -> None:
    for epoch in epochs:
        for column, value in _reference(epoch).items():
            assert table.loc[epoch, column] == pytest.approx(value, rel=1e-6), (epoch, column)


def _run_until_killed(tmp_path) -> str:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    progress = tmp_path / "progress.txt"
    savefile = str(tmp_path / "run" / "stats")
    here = os.path.dirname(os.path.abspath(__file__))  # the script imports this module, which imports tests.reference
    paths = [os.path.dirname(os.path.dirname(delve.__file__)), here, os.path.dirname(here)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.Popen(
        [sys.executable, str(script), savefile, str(progress), str(KILLED_IN), str(EPOCHS), str(STEPS)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (progress.exists() and f"mid {KILLED_IN}" in progress.read_text()):
            if proc.poll() is not None:
                pytest.fail(f"training script exited early: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("training script never reached the middle of the epoch")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert progress.read_text().splitlines() == [f"done {e}" for e in range(KILLED_IN)] + [f"mid {KILLED_IN}"]
    return savefile


def test_sigkill_mid_epoch_then_resume(tmp_path):
    savefile = _run_until_killed(tmp_path)

    # The completed epochs are on disk, whole; nothing half-written is left behind.
    assert os.listdir(os.path.dirname(savefile)) == ["stats.csv"]
    crashed = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(crashed.index) == list(range(KILLED_IN))
    _check_rows(crashed, range(KILLED_IN))

    # Resume at the first unfinished epoch with a new tracker.
    model = make_model()
    tracker = CheckLayerSat(savefile, "csv", model, stats=STATS, initial_epoch=KILLED_IN)
    with torch.no_grad():
        for epoch in range(KILLED_IN, EPOCHS):
            for step in range(STEPS):
                model(batch(epoch, step))
            assert tracker.add_saturations()  # not empty
    tracker.close()

    final = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(final.index) == list(range(EPOCHS))
    assert list(final.columns) == list(crashed.columns)
    pd.testing.assert_frame_equal(final.loc[: KILLED_IN - 1], crashed)  # earlier rows unchanged
    _check_rows(final, range(KILLED_IN, EPOCHS))


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
