"""reconstruct_csv_from_npy_data: the CSV writer's table again, and saturation at a new threshold."""

import logging
import os

import numpy as np
import pandas as pd
import pytest

from delve import CheckLayerSat, reconstruct_csv_from_npy_data
from delve.tools import reconstruct_csv_from_npy_data as from_tools
from delve.writers.npy_writer import STATE_FILE
from tests.reference import np_stats
from tests.writer_runs import LAYERS, MODES, make_model, run_epochs


def read_csv(path):
    return pd.read_csv(path, sep=";", index_col=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three epochs written by the CSV and npy writers, with the rows each layer produced."""
    savefile = str(tmp_path_factory.mktemp("reconstruct") / "run")
    model = make_model()
    tracker = CheckLayerSat(savefile, ["csv", "npy"], model, stats=["lsat", "idim", "cov", "trc", "spectrum", "embed"],
                            average_sat=True)
    rows = run_epochs(tracker, model, epochs=2)
    tracker.add_scalar("late", 7.0)  # a column that first appears at epoch 2
    rows.update(run_epochs(tracker, model, epochs=1, first_epoch=2))
    tracker.close()
    return savefile, rows


def test_public_import_paths():
    assert reconstruct_csv_from_npy_data is from_tools


def test_reconstruct_reproduces_the_csv_writers_file(run, tmp_path):
    savefile, rows = run
    original = read_csv(savefile + ".csv")
    table = reconstruct_csv_from_npy_data(savefile)
    pd.testing.assert_frame_equal(table, original, check_index_type=False)
    assert np.isnan(table.at[1, "late"]) and table.at[2, "late"] == 7.0
    # and the values are those of the rows each layer produced, not just the CSV writer's
    for epoch in range(3):
        for mode in MODES:
            lsats = []
            for layer in LAYERS:
                ref = np_stats(rows[epoch][(layer, mode)])
                assert table.at[epoch, f"{mode}-saturation_{layer}"] == pytest.approx(ref["lsat"])
                assert table.at[epoch, f"{mode}-intrinsic-dimensionality_{layer}"] == ref["idim"]
                assert table.at[epoch, f"{mode}-covariance-trace_{layer}"] == pytest.approx(ref["trc"], rel=1e-6)
                lsats.append(ref["lsat"])
            assert table.at[epoch, f"average-{mode}-sat"] == pytest.approx(np.mean(lsats))

    out = tmp_path / "again.csv"
    reconstruct_csv_from_npy_data(savefile, savefile=str(out))
    assert out.read_text() == open(savefile + ".csv").read()


@pytest.mark.parametrize("name", ["x.csv", "x", "x.tsv"])
def test_savefile_is_the_exact_file_written(run, tmp_path, name):
    savefile, _ = run
    target = tmp_path / "out" / name  # a folder that does not exist yet
    table = reconstruct_csv_from_npy_data(savefile, savefile=target)  # a Path works too
    assert os.listdir(tmp_path / "out") == [name]  # no "x.csv.csv", no temporary file beside it
    pd.testing.assert_frame_equal(read_csv(target), table, check_index_type=False)
    assert target.read_text() == open(savefile + ".csv").read()


def expected_idim(rows, thresh):
    # SPEC §5 directly: smallest k whose leading eigenvalues explain thresh of the variance
    eig = np.clip(np.sort(np.linalg.eigvals(np.cov(rows, rowvar=False, bias=True)).real)[::-1], 0, None)
    return int(np.argmax(np.cumsum(eig) / eig.sum() >= thresh) + 1)


def test_a_new_threshold_is_recomputed_from_the_stored_covariances(run, tmp_path):
    savefile, rows = run
    original = read_csv(savefile + ".csv")
    table = reconstruct_csv_from_npy_data(savefile, savefile=str(tmp_path / "t60.csv"), thresh=0.6)
    assert list(table.columns) == list(original.columns) and list(table.index) == [0, 1, 2]
    pd.testing.assert_frame_equal(read_csv(str(tmp_path / "t60.csv")), table, check_index_type=False)
    changed = 0
    for epoch in range(3):
        for mode in MODES:
            lsats = []
            for layer in LAYERS:
                data = rows[epoch][(layer, mode)]
                idim = expected_idim(data, 0.6)
                assert idim == np_stats(data, 0.6)["idim"]
                assert table.at[epoch, f"{mode}-intrinsic-dimensionality_{layer}"] == idim
                lsat = idim / data.shape[1]
                assert table.at[epoch, f"{mode}-saturation_{layer}"] == pytest.approx(lsat)
                changed += lsat != original.at[epoch, f"{mode}-saturation_{layer}"]
                lsats.append(lsat)
                # values that do not depend on the threshold are the stored ones
                assert table.at[epoch, f"{mode}-covariance-trace_{layer}"] == original.at[
                    epoch, f"{mode}-covariance-trace_{layer}"]
            assert table.at[epoch, f"average-{mode}-sat"] == pytest.approx(np.mean(lsats))
    assert changed > 0  # the threshold matters for this data
    assert table["loss"].equals(original["loss"])

    only_idim = reconstruct_csv_from_npy_data(savefile, thresh=0.6, stats=["idim"])
    assert only_idim["train-saturation_zeta"].equals(original["train-saturation_zeta"])
    assert only_idim["train-intrinsic-dimensionality_zeta"].equals(table["train-intrinsic-dimensionality_zeta"])


def test_values_without_a_covariance_are_left_out_at_a_new_threshold(tmp_path, caplog):
    savefile = str(tmp_path / "run")
    model = make_model()
    tracker = CheckLayerSat(savefile, "npy", model, stats=["lsat", "cov_train"], average_sat=True)
    rows = run_epochs(tracker, model, epochs=2, train_batches=1)
    tracker.close()

    with caplog.at_level(logging.WARNING, logger="delve"):
        table = reconstruct_csv_from_npy_data(savefile, thresh=0.5)
    # eval had no covariance: its values are left out; idim was not tracked but is recomputed
    assert list(table.columns) == ["loss"] + [
        f"train-{stat}_{layer}" for layer in LAYERS for stat in ("saturation", "intrinsic-dimensionality")
    ] + ["average-train-sat"]
    ref = np_stats(rows[1][("alpha", "train")], 0.5)
    assert table.at[1, "train-saturation_alpha"] == pytest.approx(ref["lsat"])
    assert table.at[1, "train-intrinsic-dimensionality_alpha"] == ref["idim"]
    assert any("eval-saturation_zeta" in r.getMessage() for r in caplog.records)


def test_errors_name_the_folder_and_the_valid_values(run, tmp_path):
    savefile, _ = run
    with pytest.raises(FileNotFoundError, match="nowhere"):
        reconstruct_csv_from_npy_data(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"thresh must lie in \(0, 1\].*1.5"):
        reconstruct_csv_from_npy_data(savefile, thresh=1.5)
    with pytest.raises(ValueError, match=r"\['trc'\].*'lsat', 'idim'"):
        reconstruct_csv_from_npy_data(savefile, thresh=0.5, stats=["trc"])

    no_cov = str(tmp_path / "nocov")
    model = make_model()
    tracker = CheckLayerSat(no_cov, "npy", model, stats=["lsat"])
    run_epochs(tracker, model, epochs=1, train_batches=1)
    tracker.close()
    assert list(reconstruct_csv_from_npy_data(no_cov).index) == [0]  # fine without a threshold
    with pytest.raises(FileNotFoundError, match="nocov.*no covariance matrix"):
        reconstruct_csv_from_npy_data(no_cov, thresh=0.5)


def test_a_folder_without_its_state_file_is_read_from_folder_names(run, tmp_path):
    savefile, _ = run
    copy = tmp_path / "copy"
    for folder, _, files in os.walk(savefile):
        target = copy / os.path.relpath(folder, savefile)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name != STATE_FILE:
                (target / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    original = read_csv(savefile + ".csv")
    table = reconstruct_csv_from_npy_data(str(copy))
    assert sorted(table.columns) == sorted(original.columns)
    pd.testing.assert_frame_equal(table[original.columns], original, check_index_type=False)
