"""What the writers find on disk when they start: damaged state, leftovers of a killed save, symlinks, the zip."""

import logging
import os
import zipfile

import numpy as np
import pandas as pd
import pytest

from delve import CheckLayerSat, reconstruct_csv_from_npy_data
from delve.writers import NPYWriter
from delve.writers.npy_writer import STATE_FILE, folder_name, load_index
from tests.reference import np_stats, rel_err
from tests.writer_runs import LAYERS, MODES, loss_value, make_model, run_epochs

STATS = ["lsat", "cov"]


def first_run(savefile, epochs=3, save_to="npy", **kwargs):
    model = make_model()
    tracker = CheckLayerSat(savefile, save_to, model, stats=STATS, **kwargs)
    rows = run_epochs(tracker, model, epochs=epochs, train_batches=1)
    tracker.close()
    return model, rows


def check_rows(table, rows, epochs, seed, resumed_at=3):
    """Each epoch's row holds the values of the rows the layers produced in it (the resumed run's ``seed``)."""
    assert list(table.index) == list(epochs)
    for epoch in epochs:
        assert table.at[epoch, "loss"] == pytest.approx(loss_value(seed if epoch >= resumed_at else 0, epoch))
        for layer in LAYERS:
            for mode in MODES:
                ref = np_stats(rows[epoch][(layer, mode)])
                assert table.at[epoch, f"{mode}-saturation_{layer}"] == pytest.approx(ref["lsat"])


def tree(folder):
    """Every file under ``folder`` (links not followed) and its bytes."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


# ---------------------------------------------------------------- npy state
@pytest.mark.parametrize("damage", ["missing", "garbage", "empty"])
def test_npy_resume_without_a_readable_state_rebuilds_the_index_from_the_files(tmp_path, caplog, damage):
    savefile = str(tmp_path / "run")
    model, rows = first_run(savefile)
    state = os.path.join(savefile, STATE_FILE)
    if damage == "missing":
        os.remove(state)
    else:
        open(state, "wb").write(b"\x00\xff{not json" if damage == "garbage" else b"")

    caplog.set_level(logging.WARNING, logger="delve")
    tracker = CheckLayerSat(savefile, "npy", model, stats=STATS, initial_epoch=3)
    rows.update(run_epochs(tracker, model, epochs=2, seed=1, first_epoch=3, train_batches=1))
    tracker.close()

    table = reconstruct_csv_from_npy_data(savefile)
    check_rows(table, rows, range(5), seed=1)
    assert any("found by their folder names" in r.getMessage() for r in caplog.records)


def test_reconstruct_reads_a_folder_whose_state_file_is_damaged(tmp_path, caplog):
    savefile = str(tmp_path / "run")
    _, rows = first_run(savefile)
    open(os.path.join(savefile, STATE_FILE), "wb").write(b"\x00\xff{not json")
    with caplog.at_level(logging.WARNING, logger="delve"):
        table = reconstruct_csv_from_npy_data(savefile, thresh=0.99)
    assert "unreadable" in caplog.text
    check_rows(table, rows, range(3), seed=0)


def test_npy_index_rebuilt_from_files_gives_sanitised_keys_their_names_back(tmp_path):
    savefile = str(tmp_path / "run")
    key = "train-saturation_conv/ü 1"  # not a file name: its folder is a sanitised name with a hash
    writer = NPYWriter(savefile)
    for epoch in range(2):
        writer.add_scalars("", {key: 0.5 + epoch, "loss": float(epoch)}, global_step=epoch)
        writer.save()
    os.remove(os.path.join(savefile, STATE_FILE))

    writer = NPYWriter(savefile)
    writer.resume_from_saved_state(2)
    writer.add_scalars("", {key: 0.25, "loss": 2.0}, global_step=2)
    writer.close()
    table = reconstruct_csv_from_npy_data(savefile)
    assert list(table[key]) == [0.5, 1.5, 0.25]
    assert list(table["loss"]) == [0.0, 1.0, 2.0]
    assert folder_name(key) not in table.columns


# ------------------------------------------------------------------ CSV state
@pytest.mark.parametrize(
    "content",
    [b"", bytes(range(256)) * 8, b",loss,train-saturation_zeta\n0,0.5,0.25\n1,0.4,0.5\n", b";loss\n0;high\n"],
    ids=["empty", "binary", "comma-separated", "text"],
)
def test_a_csv_that_cannot_be_resumed_is_an_error_naming_it_and_is_kept(tmp_path, content):
    savefile = str(tmp_path / "run")
    open(savefile + ".csv", "wb").write(content)
    with pytest.raises(ValueError, match=r"cannot resume from .*run\.csv.*initial_epoch=0"):
        CheckLayerSat(savefile, ["npy", "csv"], make_model(), initial_epoch=2)
    assert open(savefile + ".csv", "rb").read() == content
    assert os.listdir(tmp_path) == ["run.csv"]  # nothing else was written either


# ------------------------------------------------------------- temporary files
def test_the_next_run_removes_only_its_own_leftover_temporary_files(tmp_path):
    savefile = str(tmp_path / "run")
    model, _ = first_run(savefile, epochs=1, save_to=["csv", "npy", "plot"],
                         writer_args={"zip": True, "figsize": (2, 2)})
    key = "train-covariance-matrix_zeta"
    # What a save killed between writing and renaming leaves: ".{target}.{8 random}.delve-tmp{ext}".
    leftovers = [
        tmp_path / ".run.csv.k1ll3d_0.delve-tmp.csv",
        tmp_path / ".run.zip.k1ll3d_0.delve-tmp.zip",
        tmp_path / ".run_lsat_train_epoch_3.png.k1ll3d_0.delve-tmp.png",
        tmp_path / "run" / f".{STATE_FILE}.k1ll3d_0.delve-tmp.json",
        tmp_path / "run" / key / f".{key}_epoch1.npy.k1ll3d_0.delve-tmp.npy",
    ]
    others = [
        tmp_path / ".other.csv.k1ll3d_0.delve-tmp.csv",  # another run's, in the same folder
        tmp_path / ".run.csv.k1ll3d_0.tmp",  # not this library's name
        tmp_path / ".tmp-k1ll3d_0.csv",
        tmp_path / "run.csv.k1ll3d_0.delve-tmp.csv",  # not hidden
        tmp_path / "elsewhere" / ".run.csv.k1ll3d_0.delve-tmp.csv",  # another folder
    ]
    for path in leftovers + others:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    tracker = CheckLayerSat(savefile, ["csv", "npy", "plot"], model, stats=STATS,
                            writer_args={"zip": True, "figsize": (2, 2)}, initial_epoch=1)
    run_epochs(tracker, model, epochs=1, first_epoch=1, train_batches=1)
    tracker.close()
    assert not [path for path in leftovers if path.exists()]
    assert all(path.read_bytes() == b"half" for path in others)


# -------------------------------------------------------------------- symlinks
@pytest.mark.parametrize("initial_epoch", [0, 2])
def test_a_symlinked_key_folder_is_never_written_to_nor_deleted_from(tmp_path, caplog, initial_epoch):
    savefile = str(tmp_path / "run")
    model, rows = first_run(savefile, epochs=3)
    key = "train-covariance-matrix_zeta"
    outside = tmp_path / "outside"
    os.rename(os.path.join(savefile, key), outside)  # the first run's files, now outside the run folder
    os.symlink(outside, os.path.join(savefile, key), target_is_directory=True)
    before = tree(outside)
    assert sorted(before) == [f"{key}_epoch{e}.npy" for e in range(3)]

    caplog.set_level(logging.WARNING, logger="delve")
    tracker = CheckLayerSat(savefile, "npy", model, stats=STATS, initial_epoch=initial_epoch)
    new = run_epochs(tracker, model, epochs=2, seed=1, first_epoch=initial_epoch, train_batches=1)
    tracker.close()

    assert tree(outside) == before  # nothing replaced, added or deleted through the link
    assert os.path.islink(os.path.join(savefile, key))
    assert any(os.path.join(savefile, key) in r.getMessage() and "symbolic link" in r.getMessage()
               for r in caplog.records)
    # every other key is written as usual
    other = "train-covariance-matrix_alpha"
    for epoch, epoch_rows in new.items():
        stored = np.load(os.path.join(savefile, other, f"{other}_epoch{epoch}.npy"), allow_pickle=False)
        assert rel_err(stored, np_stats(epoch_rows[("alpha", "train")])["cov"]) <= 1e-6
    assert key not in {k for k, _, _ in load_index(savefile)}


# ------------------------------------------------------------------------- zip
def test_zip_grows_by_appending_each_save(tmp_path):
    savefile = str(tmp_path / "run")
    model = make_model()
    tracker = CheckLayerSat(savefile, "npy", model, stats=STATS, writer_args={"zip": True})
    previous = None
    for epoch in range(4):
        run_epochs(tracker, model, epochs=1, first_epoch=epoch, train_batches=1)
        data = open(savefile + ".zip", "rb").read()
        with zipfile.ZipFile(savefile + ".zip") as archive:
            members = archive.infolist()
            names = [m.filename for m in members]
            # the folder's content, each file once, the index last
            assert sorted(names) == sorted(f"run/{name}".replace(os.sep, "/") for name in tree(savefile))
            assert len(set(names)) == len(names) and names[-1] == f"run/{STATE_FILE}"
            for name in names:
                assert archive.read(name) == open(os.path.join(tmp_path, name), "rb").read()
        if previous is not None:
            # every byte before the old index is kept in place: the save only added to the archive
            assert data[: previous[1]] == previous[0][: previous[1]]
        previous = (data, members[-1].header_offset)
    tracker.close()


def test_a_damaged_zip_is_written_anew_by_the_next_run(tmp_path):
    savefile = str(tmp_path / "run")
    model, rows = first_run(savefile, epochs=3, writer_args={"zip": True})
    data = open(savefile + ".zip", "rb").read()
    open(savefile + ".zip", "wb").write(data[: len(data) // 2])  # what a kill in the middle of adding leaves

    tracker = CheckLayerSat(savefile, "npy", model, stats=STATS, writer_args={"zip": True}, initial_epoch=3)
    rows.update(run_epochs(tracker, model, epochs=2, seed=1, first_epoch=3, train_batches=1))
    tracker.close()
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(savefile + ".zip") as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert len(set(names)) == len(names)
        archive.extractall(extracted)
    table = reconstruct_csv_from_npy_data(str(extracted / "run"))
    pd.testing.assert_frame_equal(table, reconstruct_csv_from_npy_data(savefile))
    check_rows(table, rows, range(5), seed=1)
