"""The command line, run as its users run it: ``python -m delve ...`` in a subprocess.

Runs are made by the tests themselves (a tracker in this process, or the ``demo``
command); expected values come from the test's own forward hooks and numpy.
"""

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import CheckLayerSat
from delve.cli import main, summarize
from tests.reference import OutputCapture, conv_rows, np_cov, np_effective_rank, np_stats, recording_tracker

REPO = Path(__file__).resolve().parent.parent


def delve(*args, check_rc=None):
    """Run ``python -m delve ARGS`` from the repository root."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "delve", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check_rc is not None:
        assert done.returncode == check_rc, done.stderr
    return done


def assert_one_line_error(done, *fragments):
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(autouse=True)
def _restore_logging():
    # main() sets the level of the 'delve' logger, as an application does; undo it
    # so that in-process calls leave no trace on other tests.
    logger = logging.getLogger("delve")
    level = logger.level
    yield
    logger.setLevel(level)


# ----------------------------------------------------------------- a run of our own
class Widths(nn.Module):
    """Layers whose saturation is known in advance: rank 1 of 20, rank 4 of 10, full 6."""

    def __init__(self):
        super().__init__()
        self.low = nn.Linear(1, 20)
        self.mid = nn.Linear(4, 10)
        self.full = nn.Linear(6, 6)
        nn.init.eye_(self.full.weight)  # white input stays white: every direction counts
        self.aux = nn.Linear(6, 3)  # used in the first epoch only

    def forward(self, x, use_aux=False):
        out = self.low(x[:, :1]).sum(1, keepdim=True) + self.mid(x[:, :4]).sum(1, keepdim=True) + self.full(x)
        return self.aux(out) if use_aux else out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 3-epoch CSV run, the rows of the epoch the summary must show per (layer, mode), all rows per epoch."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run")
    model = Widths()
    tracker = CheckLayerSat(
        str(folder / "run"), "csv", model, stats=["lsat", "idim", "trc", "erank"], average_sat=True
    )
    capture = OutputCapture(dict(tracker.layers))
    gen = torch.Generator().manual_seed(1)
    last_rows, epoch_rows = {}, {}
    for epoch in range(3):
        model.train()
        for _ in range(3):
            model(torch.randn(32, 6, generator=gen))
        model.eval()
        with torch.no_grad():
            model(torch.randn(40, 6, generator=gen), use_aux=epoch == 0)
        for name in tracker.layers:
            for mode in ("train", "eval"):
                outputs = capture.take(name, mode)
                if outputs:
                    last_rows[(name, mode)] = (epoch, np.concatenate(outputs))
                    epoch_rows[(epoch, name, mode)] = last_rows[(name, mode)][1]
        tracker.add_scalar("test-loss", 1.0 / (epoch + 1))
        tracker.add_saturations()
    tracker.close()
    capture.remove()
    return folder / "run.csv", last_rows, epoch_rows


def test_summary_csv_matches_numpy(tracked_run):
    path, last_rows, _ = tracked_run
    done = delve("summary", path, "--format", "csv", check_rc=0)
    table = pd.read_csv(io.StringIO(done.stdout), sep=";", keep_default_na=False, na_values=[""])
    assert list(table.columns) == ["layer", "mode", "epoch", "lsat", "idim", "trc", "erank", "flag"]
    # Train layers first, then eval, tracking order within; aux never ran in train mode.
    assert list(zip(table["layer"], table["mode"])) == [
        ("low", "train"), ("mid", "train"), ("full", "train"),
        ("low", "eval"), ("mid", "eval"), ("full", "eval"), ("aux", "eval"),
    ]  # fmt: skip
    for row in table.itertuples():
        epoch, rows = last_rows[(row.layer, row.mode)]
        ref = np_stats(rows)
        assert row.epoch == epoch
        assert row.idim == ref["idim"]
        assert row.lsat == pytest.approx(ref["lsat"])
        assert row.trc == pytest.approx(ref["trc"], rel=1e-6)
        # Float32 products leave ~1e-7 of the trace on the zero eigenvalues of the
        # low-rank layers, and p·log p is steep at 0: a looser bound than for trc.
        assert row.erank == pytest.approx(np_effective_rank(np_cov(rows)), rel=1e-5)
        expected_flag = "low" if ref["lsat"] < 0.1 else "high" if ref["lsat"] > 0.9 else ""
        assert (row.flag if isinstance(row.flag, str) else "") == expected_flag
    # The summary shows aux at the last epoch it ran in, 0, not the last row of the file.
    assert table.set_index(["layer", "mode"]).loc[("aux", "eval"), "epoch"] == 0
    flags = dict(zip(table["layer"] + "/" + table["mode"], table["flag"].fillna("")))
    assert flags["low/train"] == "low" and flags["mid/train"] == "" and flags["full/train"] == "high"


def test_summary_text_and_thresholds(tracked_run, capsys):
    path, last_rows, _ = tracked_run
    assert main(["summary", str(path), "--low", "0.02", "--high", "0.95", "--mode", "train"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: 3 epoch(s), 3 layer(s)"
    # User scalars and averages of the last epoch head the table.
    assert lines[1].startswith("epoch 2: test-loss=0.3333, average-train-sat=")
    assert lines[2].split() == ["layer", "mode", "epoch", "lsat", "idim", "trc", "erank", "flag"]
    body = {line.split()[0]: line.split() for line in lines[3:6]}
    assert set(body) == {"low", "mid", "full"}
    # low has saturation 1/20 = 0.05: above --low 0.02, so no longer flagged.
    assert body["low"][3:5] == ["0.050", "1"] and len(body["low"]) == 7
    assert body["mid"][3:5] == [f"{np_stats(last_rows[('mid', 'train')][1])['lsat']:.3f}", "4"]
    assert body["full"][-1] == "high"
    assert lines[6] == "1 of 3 flagged: saturation below 0.02 (low) or above 0.95 (high)"


def test_summarize_at_a_given_epoch(tracked_run):
    # lsat and idim of low / mid / full are the same every epoch (their ranks are fixed):
    # trc and erank, which move, show that the values come from the epoch asked for.
    path, _, epoch_rows = tracked_run
    table = pd.read_csv(path, sep=";", index_col=0)
    for epoch in (0, 1):
        summary = summarize(table, epoch=epoch)
        assert set(summary["epoch"]) == {epoch}
        # Every layer and mode of the file is listed, also aux/eval at epoch 1, when it did not run.
        assert len(summary) == 7
        for row in summary.itertuples():
            rows = epoch_rows.get((epoch, row.layer, row.mode))
            if rows is None:
                assert (row.layer, row.mode, epoch) == ("aux", "eval", 1)
                assert pd.isna(row.lsat) and pd.isna(row.idim) and pd.isna(row.trc) and pd.isna(row.erank)
                continue
            ref = np_stats(rows)
            assert row.idim == ref["idim"]
            assert row.lsat == pytest.approx(ref["lsat"])
            assert row.trc == pytest.approx(ref["trc"], rel=1e-6)
            assert row.erank == pytest.approx(np_effective_rank(ref["cov"]), rel=1e-5)
        trc = summary.set_index(["layer", "mode"]).loc[("full", "train"), "trc"]
        other = np_stats(epoch_rows[(2, "full", "train")])["trc"]
        assert abs(trc - other) > 1e-3 * other, "the epochs must differ for this test to mean something"


# ------------------------------------------------------------------------------ demo
def test_demo_writes_a_run_the_summary_reads(tmp_path):
    savefile = tmp_path / "demo"
    # csv only: the pictures of the default 'plot' writer are the plot command's business.
    done = delve("demo", savefile, "--epochs", "2", "--batches", "1", "--save-to", "csv", check_rc=0)
    assert done.stdout.strip() == f"wrote {savefile}.csv"
    table = pd.read_csv(f"{savefile}.csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1]
    widths = {"features-0": 8, "features-3": 16, "classifier-1": 32, "classifier-3": 4}
    assert list(table.columns[:2]) == ["train-loss", "test-accuracy"]
    for mode in ("train", "eval"):
        for layer, width in widths.items():
            idim = table[f"{mode}-intrinsic-dimensionality_{layer}"]
            np.testing.assert_allclose(table[f"{mode}-saturation_{layer}"], idim / width)
            assert ((idim >= 1) & (idim <= width)).all()
        layers = [f"{mode}-saturation_{layer}" for layer in widths]
        np.testing.assert_allclose(table[f"average-{mode}-sat"], table[layers].mean(axis=1))
    assert ((table["test-accuracy"] >= 0) & (table["test-accuracy"] <= 1)).all()


def test_demo_values_match_numpy(tmp_path, monkeypatch, capsys):
    """The demo's CSV against our own hooks on its model and the data it drew, in this process."""
    import delve.demo

    epochs, draws = [], []  # per epoch: (layer, mode) -> raw outputs; every (images, labels) drawn

    def recorded_images(*args, **kwargs):
        draws.append(real_images(*args, **kwargs))
        return draws[-1]

    real_images = delve.demo.synthetic_images
    monkeypatch.setattr(delve.demo, "CheckLayerSat", recording_tracker(CheckLayerSat, epochs))
    monkeypatch.setattr(delve.demo, "synthetic_images", recorded_images)
    savefile = tmp_path / "demo"
    batches = 2
    assert main(["demo", str(savefile), "--epochs", "2", "--batches", str(batches), "--save-to", "csv"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {savefile}.csv"
    table = pd.read_csv(f"{savefile}.csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1] and len(epochs) == 2
    assert len(draws) == 1 + 2 * batches  # the test set, then the training batches
    test_labels = draws[0][1].numpy()
    widths = {"features-0": 8, "features-3": 16, "classifier-1": 32, "classifier-3": 4}
    for epoch, outputs in enumerate(epochs):
        for mode in ("train", "eval"):
            saturations = []
            for layer, width in widths.items():
                raws = outputs[(layer, mode)]
                rows = np.concatenate([conv_rows(raw, "channelwise") if raw.ndim == 4 else raw for raw in raws])
                assert rows.shape[1] == width
                ref = np_stats(rows)
                ratios = np.cumsum(ref["eig"]) / ref["eig"].sum()
                assert np.min(np.abs(ratios - 0.99)) > 1e-6  # not on the edge of a step
                assert table.loc[epoch, f"{mode}-intrinsic-dimensionality_{layer}"] == ref["idim"]
                assert table.loc[epoch, f"{mode}-saturation_{layer}"] == pytest.approx(ref["lsat"], rel=1e-12)
                saturations.append(ref["lsat"])
            assert table.loc[epoch, f"average-{mode}-sat"] == pytest.approx(np.mean(saturations), rel=1e-12)
        # The user scalars: accuracy of the eval logits on the test labels, loss of the last batch.
        (logits,) = outputs[("classifier-3", "eval")]
        assert table.loc[epoch, "test-accuracy"] == pytest.approx(np.mean(logits.argmax(1) == test_labels))
        logits, labels = outputs[("classifier-3", "train")][-1], draws[(epoch + 1) * batches][1].numpy()
        shifted = logits - logits.max(1, keepdims=True)
        loss = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(labels)), labels])
        assert table.loc[epoch, "train-loss"] == pytest.approx(loss, rel=1e-5)
    assert 0 < table.loc[1, "test-accuracy"] < 1


# -------------------------------------------------------------------------- errors
@pytest.fixture
def malformed(tmp_path):
    files = {
        "other.csv": "epoch,loss\n0,1.5\n1,1.2\n",
        "empty.csv": "",
        "words.csv": ";train-saturation_fc\nfirst;0.5\n",
        "text.csv": ";train-saturation_fc\n0;high\n",
        "twice.csv": ";train-saturation_fc\n0;0.5\n0;0.6\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    return tmp_path


def test_malformed_csv_is_a_one_line_error(malformed):
    done = delve("summary", malformed / "other.csv")
    assert_one_line_error(done, "other.csv", "not a CSV written by delve's csv writer")
    assert done.returncode == 1 and done.stdout == ""


def test_missing_npy_folder_is_a_one_line_error(tmp_path):
    done = delve("recompute", tmp_path / "no-such-run", "--thresh", "0.9", "-o", tmp_path / "out.csv")
    assert_one_line_error(done, "no-such-run", "does not exist")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["summary", "{d}/missing.csv"], "no such file"),
        (["summary", "{d}"], "is a folder"),
        (["summary", "{d}/empty.csv"], "empty.csv is not a CSV written by delve"),
        (["summary", "{d}/binary.csv"], "binary.csv"),
        (["summary", "{d}/words.csv"], "epoch numbers"),
        (["summary", "{d}/text.csv"], "not numbers"),
        (["summary", "{d}/twice.csv"], "appear twice"),
        (["summary", "{d}/other.csv", "--low", "1.5"], "--low must lie in [0, 1]"),
        (["summary", "{d}/other.csv", "--low", "0.5", "--high", "0.4"], "must be below --high"),
        (["recompute", "{d}/other.csv"], "is a file, not a folder"),
        (["plot", "{d}/missing.csv"], "no such file"),
        (["demo", "{d}/run", "--save-to", "bogus"], "unknown writer 'bogus'"),
        (["demo", "{d}/run", "--epochs", "0"], "at least 1"),
    ],
)
def test_bad_input_in_process(malformed, capsys, argv, fragment):
    # The same code path as the subprocess tests, without paying for a Python start each.
    status = main([a.format(d=malformed) for a in argv])
    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert err.startswith(f"delve {argv[0]}: error: ")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["summary"], "required: csv"),
        (["summary", "x.csv", "--low", "abc"], "invalid float value: 'abc'"),
        (["plot", "x.csv", "--epochs", "1", "--last"], "not allowed with argument"),
    ],
)
def test_malformed_command_lines_exit_2_with_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize("command", [None, "demo", "summary", "plot", "recompute"])
def test_help_for_every_command(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: delve")
    expected = {
        None: ["demo", "summary", "plot", "recompute", "--debug"],
        "demo": ["--epochs", "--batches", "--save-to", "savefile"],
        "summary": ["--low", "--high", "--epoch", "--mode", "--format"],
        "plot": ["--output", "--epochs", "--last", "--primary-metric", "history"],
        "recompute": ["--thresh", "--output", "--stats", "npydir"],
    }[command]
    for word in expected:
        assert word in out


def test_debug_shows_the_traceback(malformed):
    with pytest.raises(Exception, match="not a CSV written by delve's csv writer"):
        main(["--debug", "summary", str(malformed / "other.csv")])


# ------------------------------------------------------------------------------ plot
def decode_heatmap(path, n_rows, n_cols, vmin=0.0, vmax=1.0):
    """Read back the values of a viridis heatmap PNG: a (rows, cols) array, NaN for blank cells.

    The heatmap is the widest run of image columns full of colormap colours (the colour
    bar is the narrow one); each cell's colour is mapped back through the colormap.
    """
    from matplotlib import colormaps
    from matplotlib.image import imread

    rgb = imread(path)[:, :, :3].astype(np.float64)
    lut = colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    # Nearest colormap entry of each distinct colour (a PNG has few), then of each pixel.
    colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    gaps = np.linalg.norm(colours[:, None, :] - lut[None], axis=-1)
    index = gaps.argmin(1)[inverse.ravel()].reshape(rgb.shape[:2])
    heat = (gaps.min(1)[inverse.ravel()] < 0.01).reshape(rgb.shape[:2])
    columns = heat.sum(0) > 0.2 * heat.shape[0]
    runs, start = [], None
    for x, on in enumerate(np.append(columns, False)):
        if on and start is None:
            start = x
        elif not on and start is not None:
            runs.append((start, x))
            start = None
    left, right = max(runs, key=lambda run: run[1] - run[0])
    rows = np.flatnonzero(heat[:, left:right].sum(1) > 0)
    top, bottom = rows[0], rows[-1] + 1
    cell_h, cell_w = (bottom - top) / n_rows, (right - left) / n_cols
    values = np.full((n_rows, n_cols), np.nan)
    for r in range(n_rows):
        for c in range(n_cols):
            # A point a quarter into the cell: away from its edges and its centred label.
            y, x = int(top + (r + 0.25) * cell_h), int(left + (c + 0.25) * cell_w)
            if heat[y, x]:
                values[r, c] = vmin + (vmax - vmin) * index[y, x] / 255
    return values


def test_plot_draws_epochs_and_decodable_heatmaps(tracked_run, tmp_path):
    path, _, _ = tracked_run
    prefix = tmp_path / "pictures" / "run"
    prefix.parent.mkdir()
    done = delve("plot", path, "-o", prefix, "--epochs", "0", "2", check_rc=0)
    written = done.stdout.split()
    stats, modes = ["lsat", "idim", "trc", "erank"], ["train", "eval"]
    expected = {f"{prefix}_{s}_{m}_epoch_{e}.png" for s in stats for m in modes for e in (0, 2)}
    expected |= {f"{prefix}_{s}_{m}_history.png" for s in stats for m in modes}
    assert set(written) == expected and len(written) == len(expected)
    assert all(os.path.getsize(p) > 0 for p in written)

    table = pd.read_csv(path, sep=";", index_col=0)
    layers = ["low", "mid", "full", "aux"]
    truth = table[[f"eval-saturation_{layer}" for layer in layers]].to_numpy().T  # layers x epochs
    # aux ran in the first epoch only: its later cells are blank.
    assert np.isfinite(truth[3, 0]) and np.isnan(truth[3, 1:]).all()
    decoded = decode_heatmap(f"{prefix}_lsat_eval_history.png", len(layers), 3)
    np.testing.assert_array_equal(np.isnan(decoded), np.isnan(truth))
    np.testing.assert_allclose(decoded[np.isfinite(truth)], truth[np.isfinite(truth)], atol=1.5 / 255)


def test_plot_last_epoch_only_and_bad_output_folder(tmp_path, capsys):
    model = nn.Linear(3, 4)
    savefile = str(tmp_path / "small")
    with CheckLayerSat(savefile, "csv", model, stats=["lsat_train"]) as tracker:
        for _ in range(3):
            model(torch.randn(10, 3))
            tracker.add_saturations()
    assert main(["plot", f"{savefile}.csv", "--last"]) == 0
    written = capsys.readouterr().out.split()
    assert written == [
        f"{savefile}_lsat_train_epoch_2.png",
        f"{savefile}_lsat_train_history.png",
    ]
    assert all(os.path.getsize(p) > 0 for p in written)
    assert not any(os.path.exists(f"{savefile}_lsat_train_epoch_{e}.png") for e in (0, 1))
    assert main(["plot", f"{savefile}.csv", "--epochs", "0", "7"]) == 1
    assert "epochs [7] are not in" in capsys.readouterr().err
    assert main(["plot", f"{savefile}.csv", "-o", str(tmp_path / "nowhere" / "x")]) == 1
    assert "output folder" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------- recompute
@pytest.fixture(scope="module")
def npy_run(tmp_path_factory):
    """A 2-epoch run saved by the npy writer with covariances, and the rows our hook saw."""
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("npy")
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
    mix = torch.randn(5, 5) * torch.linspace(2, 0.2, 5)
    tracker = CheckLayerSat(str(folder / "run"), "npy", model, stats=["cov", "lsat", "idim"])
    capture = OutputCapture(dict(tracker.layers))
    rows = {}
    for epoch in range(2):
        for mode, batches in (("train", 3), ("eval", 2)):
            model.train(mode == "train")
            with torch.no_grad():
                for _ in range(batches):
                    model(torch.randn(20, 5) @ mix)
        for name in tracker.layers:
            for mode in ("train", "eval"):
                rows[(epoch, name, mode)] = np.concatenate(capture.take(name, mode))
        tracker.add_saturations()
    tracker.close()
    return folder / "run", list(tracker.layers), rows


def check_table(table, layers, rows, thresh):
    assert list(table.index) == [0, 1]
    for (epoch, name, mode), layer_rows in rows.items():
        ref = np_stats(layer_rows, thresh)
        ratios = np.cumsum(ref["eig"]) / ref["eig"].sum()
        assert np.min(np.abs(ratios - thresh)) > 1e-6  # not on the edge of a step
        assert table.loc[epoch, f"{mode}-intrinsic-dimensionality_{name}"] == ref["idim"]
        assert table.loc[epoch, f"{mode}-saturation_{name}"] == pytest.approx(ref["lsat"])
    assert {c.split("_")[0] for c in table.columns} == {
        "train-saturation", "train-intrinsic-dimensionality", "eval-saturation", "eval-intrinsic-dimensionality",
    }  # fmt: skip


def test_recompute_at_a_new_threshold(npy_run, tmp_path):
    npydir, layers, rows = npy_run
    out = tmp_path / "at80.csv"
    done = delve("recompute", npydir, "--thresh", "0.8", "-o", out, check_rc=0)
    assert done.stdout.strip() == f"wrote {out} (2 epoch(s), 8 column(s))"
    assert os.listdir(tmp_path) == ["at80.csv"]  # exactly the file named, nothing beside it
    check_table(pd.read_csv(out, sep=";", index_col=0), layers, rows, 0.8)


def test_recompute_without_threshold_prints_the_stored_values(npy_run, capsys):
    npydir, layers, rows = npy_run
    assert main(["recompute", str(npydir)]) == 0
    check_table(pd.read_csv(io.StringIO(capsys.readouterr().out), sep=";", index_col=0), layers, rows, 0.99)


def test_recompute_needs_stored_covariances(tmp_path, capsys):
    model = nn.Linear(3, 2)
    with CheckLayerSat(str(tmp_path / "nocov"), "npy", model, stats=["lsat"]) as tracker:
        model(torch.randn(5, 3))
        tracker.add_saturations()
    assert main(["recompute", str(tmp_path / "nocov"), "--thresh", "0.9", "-o", str(tmp_path / "o.csv")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds no covariance matrix" in err
    assert not (tmp_path / "o.csv").exists()
    assert main(["recompute", str(tmp_path / "nocov"), "--thresh", "1.5"]) == 1
    assert "--thresh must lie in (0, 1]" in capsys.readouterr().err
