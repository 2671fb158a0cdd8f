"""The gallery example and the demo job write the CSV a user expects."""

import os
import subprocess
import sys

import matplotlib.image as plt_image
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_gallery_example_csv(tmp_path):
    result = run([os.path.join(ROOT, "examples", "extract_saturation.py"), "--steps", "6", "--out", "reg"], tmp_path)
    assert result.returncode == 0, result.stderr
    for hidden in (3, 32):
        table = pd.read_csv(tmp_path / "reg" / f"h{hidden}.csv", sep=";", index_col=0)
        assert list(table.index) == list(range(6))
        assert list(table.columns) == [
            "train-loss", "test-loss",
            "train-saturation_Module-0-Linear", "train-saturation_Module-1-Linear",
            "eval-saturation_Module-0-Linear", "eval-saturation_Module-1-Linear",
        ]
        saturation = table.filter(like="saturation")
        assert ((saturation > 0) & (saturation <= 1)).all().all()
        # The second layer sees only `hidden` directions of its 10 outputs.
        assert (table["train-saturation_Module-1-Linear"] <= min(hidden, 10) / 10).all()


def test_demo_job_writes_csv_and_plots(tmp_path):
    # What `make demo` promises: a CSV a person can open and pictures beside it.
    result = run(["-m", "delve", "demo", str(tmp_path / "demo"), "--epochs", "2", "--batches", "2"], ROOT)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "demo.csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1]
    assert {"train-loss", "test-accuracy", "average-train-sat", "eval-saturation_classifier-3"} <= set(table.columns)
    for name in ("demo_lsat_train_history.png", "demo_lsat_eval_epoch_1.png", "demo_idim_train_epoch_0.png"):
        image = plt_image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
