"""The npy writer: file layout, stored arrays against numpy references, zip, JSON state, safe names."""

import json
import os
import re
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from delve import CheckLayerSat, reconstruct_csv_from_npy_data
from delve.writers import NPYWriter
from delve.writers.npy_writer import STATE_FILE, folder_name
from tests.reference import np_cov, np_stats, rel_err
from tests.writer_runs import LAYERS, MODES, aligned, loss_value, make_model, np_embedding, run_epochs


def load(path):
    return np.load(path, allow_pickle=False)


def npy(savefile, key, epoch):
    return os.path.join(savefile, key, f"{key}_epoch{epoch}.npy")


def test_npy_files_hold_the_reference_covariance_spectrum_embedding_and_scalars(tmp_path):
    model = make_model()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "npy", model, stats=["cov", "lsat", "idim", "spectrum", "embed"], spectrum_k=4)
    rows = run_epochs(tracker, model, epochs=3)
    tracker.close()

    for epoch in range(3):
        assert load(npy(savefile, "loss", epoch)) == loss_value(0, epoch)
        for layer in LAYERS:
            for mode in MODES:
                data = rows[epoch][(layer, mode)]
                ref = np_stats(data)
                cov = load(npy(savefile, f"{mode}-covariance-matrix_{layer}", epoch))
                assert cov.dtype == np.float64 and cov.shape == ref["cov"].shape
                assert rel_err(cov, ref["cov"]) <= 1e-6
                lsat = load(npy(savefile, f"{mode}-saturation_{layer}", epoch))
                idim = load(npy(savefile, f"{mode}-intrinsic-dimensionality_{layer}", epoch))
                assert lsat.shape == () and lsat == pytest.approx(ref["lsat"]) and idim == ref["idim"]
                spectrum = load(npy(savefile, f"{mode}-spectrum_{layer}", epoch))
                top = np.concatenate([ref["eig"], np.zeros(4)])[:4]
                np.testing.assert_allclose(spectrum, top, rtol=1e-6, atol=1e-9 * ref["eig"][0])
                embedding = load(npy(savefile, f"{mode}-embedded-sample_{layer}", epoch))
                expected = np_embedding(data)
                assert embedding.shape == (len(data), 2)
                np.testing.assert_allclose(aligned(embedding, expected), expected, atol=1e-5)

    # nothing else, and no key folder with a stray leading "_"
    keys = {f"{m}-{s}_{layer}" for m in MODES for layer in LAYERS for s in
            ("covariance-matrix", "saturation", "intrinsic-dimensionality", "spectrum", "embedded-sample")}
    assert set(os.listdir(savefile)) == keys | {"loss", STATE_FILE}
    for key in keys | {"loss"}:
        assert sorted(os.listdir(os.path.join(savefile, key))) == [f"{key}_epoch{e}.npy" for e in range(3)]

    state = json.load(open(os.path.join(savefile, STATE_FILE)))
    entries = {e["key"]: e for e in state["entries"]}
    assert set(entries) == keys | {"loss"}
    assert all(e["folder"] == e["key"] and e["epochs"] == [0, 1, 2] for e in entries.values())
    assert state["entries"][0]["key"] == "loss"  # first appearance order: the user scalar came first


def test_zip_archives_the_folder_after_every_save(tmp_path):
    model = make_model()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "npy", model, stats=["cov_train"], writer_args={"zip": True})
    run_epochs(tracker, model, epochs=1, train_batches=1)
    with zipfile.ZipFile(savefile + ".zip") as archive:
        assert len(archive.namelist()) == 1 + 1 + len(LAYERS)  # state, loss, one cov per layer
    run_epochs(tracker, model, epochs=1, first_epoch=1, train_batches=1)
    tracker.close()

    with zipfile.ZipFile(savefile + ".zip") as archive:
        names = set(archive.namelist())
        on_disk = {
            os.path.relpath(os.path.join(folder, name), tmp_path).replace(os.sep, "/")
            for folder, _, files in os.walk(savefile) for name in files
        }
        assert names == on_disk
        key = "train-covariance-matrix_zeta"
        member = f"run/{key}/{key}_epoch1.npy"
        assert archive.read(member) == open(npy(savefile, key, 1), "rb").read()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # no temporary file left


def test_a_new_run_removes_the_previous_runs_files(tmp_path):
    savefile = str(tmp_path / "run")
    model = make_model()
    tracker = CheckLayerSat(savefile, "npy", model, stats=["cov"])
    run_epochs(tracker, model, epochs=4, seed=0, train_batches=1)
    tracker.close()

    tracker = CheckLayerSat(savefile, "npy", model, stats=["cov_eval"])  # initial_epoch=0: a new run
    rows = run_epochs(tracker, model, epochs=2, seed=5, train_batches=1)
    tracker.close()

    state = json.load(open(os.path.join(savefile, STATE_FILE)))
    assert {e["key"]: e["epochs"] for e in state["entries"]} == {
        "loss": [0, 1], **{f"eval-covariance-matrix_{layer}": [0, 1] for layer in LAYERS}
    }
    assert set(os.listdir(savefile)) == {"loss", STATE_FILE} | {f"eval-covariance-matrix_{la}" for la in LAYERS}
    key = "eval-covariance-matrix_alpha"
    assert sorted(os.listdir(os.path.join(savefile, key))) == [f"{key}_epoch0.npy", f"{key}_epoch1.npy"]
    assert rel_err(load(npy(savefile, key, 1)), np_cov(rows[1][("alpha", "eval")])) <= 1e-6
    assert list(reconstruct_csv_from_npy_data(savefile).index) == [0, 1]


WEIRD = ["../x y", "a/b", "..", ".hidden", "ü ñ/..", "C:\\evil", "a" * 300, STATE_FILE, "a/b "]


def test_folder_names_are_safe_distinct_and_deterministic():
    names = [folder_name(key) for key in WEIRD + ["plain-name_0", "train-saturation_features-2-0"]]
    assert names[-2:] == ["plain-name_0", "train-saturation_features-2-0"]  # safe keys are kept as they are
    assert len(set(names)) == len(names)
    assert names == [folder_name(key) for key in WEIRD + ["plain-name_0", "train-saturation_features-2-0"]]
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name) and len(name) <= 150
        assert name not in (".", "..", STATE_FILE)


def test_weird_layer_names_never_escape_the_run_folder(tmp_path):
    run_dir = tmp_path / "runs"
    savefile = str(run_dir / "run")
    model = nn.Sequential(OrderedDict([("first", nn.Linear(4, 3)), ("second", nn.Linear(3, 2))]))
    model.add_module("odd/name y", nn.Linear(2, 2))
    renamed = ["../x y", "ü ñ/..", "/abs"]

    def rename(layers):
        return OrderedDict(zip(renamed, layers.values()))

    tracker = CheckLayerSat(savefile, ["npy", "csv", "plot", "tb"], model, stats=["lsat", "cov"],
                            layer_filter=rename, writer_args={"zip": True, "figsize": (2, 2)})
    assert list(tracker.layers) == renamed
    covs = {}
    for _ in range(2):
        x = torch.randn(12, 4)
        outputs = []
        for layer in model:
            x = layer(x)
            outputs.append(x.detach().double().numpy())
        covs = {name: np_cov(out) for name, out in zip(renamed, outputs)}
        tracker.add_saturations()
    tracker.close()

    # Everything is inside the folder of the run; the only neighbours are the run's own files.
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            path = os.path.realpath(os.path.join(folder, name))
            assert path.startswith(os.path.realpath(run_dir) + os.sep), path
    assert all(name == "run" or name.startswith("run.") or name.startswith("run_") for name in os.listdir(run_dir))

    state = json.load(open(os.path.join(savefile, STATE_FILE)))
    folders = {e["key"]: e["folder"] for e in state["entries"]}
    for layer in renamed:
        key = f"train-covariance-matrix_{layer}"
        assert folders[key] == folder_name(key) != key
        stored = load(os.path.join(savefile, folders[key], f"{folders[key]}_epoch1.npy"))
        assert rel_err(stored, covs[layer]) <= 1e-6
    table = reconstruct_csv_from_npy_data(savefile)  # the true keys come back
    assert list(table.columns) == [f"train-saturation_{layer}" for layer in renamed]


def test_the_writer_alone_skips_non_numeric_values_and_saves_on_close(tmp_path, caplog):
    savefile = str(tmp_path / "run")
    writer = NPYWriter(savefile)
    writer.add_scalar("note", "text", global_step=0)
    writer.add_scalar("note", "again", global_step=1)
    writer.add_scalars("", {"train-saturation_a": 0.5}, global_step=0, sample_value_dict={})
    writer.add_scalar("tensor", torch.tensor([1.0, 2.0]), global_step=0)
    writer.close()  # nothing saved before: close saves what is pending
    assert sum("'note' is not numeric" in r.getMessage() for r in caplog.records) == 1
    assert load(npy(savefile, "train-saturation_a", 0)) == 0.5
    np.testing.assert_array_equal(load(npy(savefile, "tensor", 0)), [1.0, 2.0])
    assert not os.path.exists(os.path.join(savefile, "note"))


def test_zip_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="zip must be True or False, got 'yes'"):
        CheckLayerSat(str(tmp_path / "run"), "npy", make_model(), writer_args={"zip": "yes"})
