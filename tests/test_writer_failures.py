"""One failing writer costs no other writer an epoch, and the failure is visible without logging set up."""

import logging
import os
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from delve import CheckLayerSat
from delve.writers import AbstractWriter
from tests.reference import np_stats, rel_err
from tests.writer_runs import LAYERS, MODES, SCALES, loss_value, make_model, run_epochs

EPOCHS = 3


class Failing(AbstractWriter):
    """A user's writer that raises in one of its methods, every time."""

    def __init__(self, method):
        self.method = method

    def _maybe_fail(self, method):
        if method == self.method:
            raise OSError(f"{method}: No space left on device")

    def add_scalar(self, name, value, **kwargs):
        self._maybe_fail("add_scalar")

    def add_scalars(self, prefix, value_dict, **kwargs):
        self._maybe_fail("add_scalars")

    def save(self):
        self._maybe_fail("save")


class Plain(AbstractWriter):
    """A user's writer written without ``**kwargs``: it names the one keyword it wants."""

    def __init__(self):
        self.rows = {}

    def add_scalar(self, name, value):
        self.rows.setdefault("no step", {})[name] = value

    def add_scalars(self, prefix, value_dict, global_step):
        self.rows.setdefault(global_step, {}).update({prefix + k: v for k, v in value_dict.items()})


def npy_file(savefile, key, epoch):
    return os.path.join(savefile, key, f"{key}_epoch{epoch}.npy")


def check_epoch_on_disk(savefile, rows, epoch):
    """The CSV row and the npy files of ``epoch`` exist and hold the values of the rows the layers produced."""
    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(table.index) == list(range(epoch + 1))
    assert table.at[epoch, "loss"] == pytest.approx(loss_value(0, epoch))
    for layer in LAYERS:
        for mode in MODES:
            ref = np_stats(rows[epoch][(layer, mode)])
            assert table.at[epoch, f"{mode}-saturation_{layer}"] == pytest.approx(ref["lsat"])
            cov = np.load(npy_file(savefile, f"{mode}-covariance-matrix_{layer}", epoch), allow_pickle=False)
            assert rel_err(cov, ref["cov"]) <= 1e-6
    assert np.load(npy_file(savefile, "loss", epoch), allow_pickle=False) == loss_value(0, epoch)


def run_and_check_each_epoch(tracker, model, savefile):
    rows = {}
    for epoch in range(EPOCHS):
        rows.update(run_epochs(tracker, model, epochs=1, first_epoch=epoch, train_batches=1))
        check_epoch_on_disk(savefile, rows, epoch)  # right after add_saturations, not only at close
    return rows


@pytest.mark.parametrize("method", ["add_scalar", "add_scalars", "save"])
def test_a_failing_writer_leaves_the_others_every_epoch(tmp_path, caplog, method):
    savefile = str(tmp_path / "run")
    model = make_model()
    plain = Plain()
    tracker = CheckLayerSat(savefile, [Failing(method), "csv", "npy", plain], model, stats=["lsat", "cov"])
    caplog.set_level(logging.ERROR, logger="delve")
    with pytest.warns(RuntimeWarning) as caught:
        rows = run_and_check_each_epoch(tracker, model, savefile)
        tracker.close()

    # one warning for the writer and cause, though it failed at every epoch; it names both
    failures = [w for w in caught if "Failing" in str(w.message)]
    assert len(failures) == 1
    assert f"Failing.{method}()" in str(failures[0].message) and "No space left" in str(failures[0].message)
    # the log has every failure, the traceback the first time
    logged = [r for r in caplog.records if r.name.startswith("delve") and f"Failing.{method}()" in r.getMessage()]
    assert len(logged) == EPOCHS
    assert logged[0].exc_info is not None and all(r.exc_info is None for r in logged[1:])
    # the writer without **kwargs received every epoch, with its step
    for epoch in range(EPOCHS):
        for layer in LAYERS:
            ref = np_stats(rows[epoch][(layer, "train")])
            assert plain.rows[epoch][f"train-saturation_{layer}"] == pytest.approx(ref["lsat"])
    assert plain.rows["no step"]["loss"] == loss_value(0, EPOCHS - 1)


def test_a_plot_writer_whose_manipulation_raises_leaves_the_npy_writer(tmp_path):
    def broken(ax):
        raise ValueError("cannot set a log scale on these axes")

    savefile = str(tmp_path / "run")
    model = make_model()
    tracker = CheckLayerSat(savefile, ["plot", "npy"], model, stats=["lsat", "cov"],
                            writer_args={"plot_manipulation_func": broken, "figsize": (2, 2)})
    with pytest.warns(RuntimeWarning) as caught:
        run_and_check_each_epoch(tracker, model, savefile)
        tracker.close()
    reported = [str(w.message) for w in caught if "CSVandPlottingWriter" in str(w.message)]
    # Once for the bar charts of the first save, once for the heatmaps drawn at close.
    assert len(reported) == 2
    assert re.search(r"CSVandPlottingWriter\(.*\)\.save\(\).*cannot set a log scale", reported[0])
    assert re.search(r"CSVandPlottingWriter\(.*\)\.close\(\).*cannot set a log scale", reported[1])


def test_a_single_failing_writer_warns_and_training_goes_on(tmp_path):
    model = make_model()
    tracker = CheckLayerSat(str(tmp_path / "run"), Failing("save"), model, stats=["lsat"])
    generator = torch.Generator().manual_seed(0)
    with pytest.warns(RuntimeWarning, match=r"Failing\.save\(\) failed at epoch 0") as caught:
        for _ in range(2):
            with torch.no_grad():
                outputs = model[0](torch.randn(16, 6, generator=generator) * SCALES)
                model[2](model[1](outputs))
            values = tracker.add_saturations()  # the epoch's values come back all the same
            assert values["train-saturation_zeta"] == pytest.approx(np_stats(outputs.double().numpy())["lsat"])
    assert len(caught) == 1
    tracker.close()


def test_a_writer_without_kwargs_raises_no_warning(tmp_path):
    model = make_model()
    plain = Plain()
    tracker = CheckLayerSat(str(tmp_path / "run"), plain, model, stats=["lsat", "embed"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        rows = run_epochs(tracker, model, epochs=2, train_batches=1)
        tracker.close()
    for epoch in range(2):
        for layer in LAYERS:
            for mode in MODES:
                ref = np_stats(rows[epoch][(layer, mode)])
                assert plain.rows[epoch][f"{mode}-saturation_{layer}"] == pytest.approx(ref["lsat"])


class Resumable(AbstractWriter):
    """A user's writer that checks its saved state the way published writers do."""

    def __init__(self, path):
        self.path = path
        self.resumed = None

    def add_scalar(self, name, value, **kwargs):
        pass

    def add_scalars(self, prefix, value_dict, **kwargs):
        pass

    def resume_from_saved_state(self, initial_epoch):
        self.resumed = self._check_savestate_ok(self.path)


def test_check_savestate_ok_says_whether_the_state_exists(tmp_path):
    missing = tmp_path / "nothing-here.json"
    writer = Resumable(str(missing))
    with pytest.warns(RuntimeWarning, match="nothing-here.json"):
        CheckLayerSat(str(tmp_path / "run"), writer, make_model(), initial_epoch=2).close()
    assert writer.resumed is False

    missing.write_text("{}")
    writer = Resumable(missing)  # a Path works as well
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CheckLayerSat(str(tmp_path / "run"), writer, make_model(), initial_epoch=2).close()
    assert writer.resumed is True


def test_warnings_turned_into_errors_still_reach_every_writer(tmp_path):
    model = make_model()
    plain = Plain()
    tracker = CheckLayerSat(str(tmp_path / "run"), [Failing("add_scalars"), plain], model, stats=["lsat"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as in a test suite with filterwarnings = error
        rows = run_epochs(tracker, model, epochs=1, train_batches=1)
    tracker.close()
    for layer in LAYERS:
        assert plain.rows[0][f"train-saturation_{layer}"] == pytest.approx(np_stats(rows[0][(layer, "train")])["lsat"])
