"""The overhead benchmark, run as its users run it, on the smallest settings.

Timing is never asserted (machines are noisy); what is checked is that the script
reports what its README promises, for the models it builds.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _report(script: str, *arguments: str) -> dict:
    """Run a benchmark script with ``--json`` as a user would; return what it printed."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *arguments, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_overhead_json_reports_every_quantity_for_the_lstm():
    report = _report(
        "overhead.py", "--cases", "lstm", "--rounds", "2", "--block", "1", "--warmup", "1", "--epoch-repeats", "1",
        "--threads", "1",
    )
    assert report["machine"]["device"] == "cpu"
    assert report["machine"]["torch_threads"] == 1
    (case,) = report["results"]
    # Two LSTMs and the read-out Linear; each kind stepped once per round.
    assert case["case"] == "lstm" and case["layers"] == 3
    assert case["steps_per_kind"] == 2
    for key in ("untracked_s", "tracked_s", "gram_s", "hooks_s", "epoch_end_s", "two_eigh_s"):
        assert math.isfinite(case[key]) and case[key] > 0, key
    for part in ("forward", "rest"):
        assert 0 < case[f"{part}_untracked_s"] < case["untracked_s"] * 2
    assert math.isclose(case["ratio"], case["tracked_s"] / case["untracked_s"])
    assert math.isclose(case["extra_over_gram"], case["extra_s"] / case["gram_s"])
    # Which product each layer's batches use, and why: 50 × 64 rows of the LSTMs' 256
    # features (4096 rows, rounded to a power of two), 64 rows of the read-out's 10.
    assert set(case["products"]) == {"lstm1", "lstm2", "fc"}
    assert case["products"]["lstm1"].startswith("4096 rows x 256, rows-major: ")
    assert case["products"]["fc"] == "64 rows x 10, rows-major: full (only candidate)"
    for product in case["products"].values():
        assert any(name in product for name in ("full", "triangle", "streamed", "still being timed"))
    assert case["epoch_schedule"].split()[0] in ("sequential", "parallel")
    # The float64 state of the three layers (256, 256 and 10 features) is the bulk of it;
    # the per-batch figure is one float64 Gram matrix of the widest layer.
    state = sum(8 * (d * d + 2 * d) for d in (256, 256, 10))
    assert state <= case["accumulator_bytes"] <= 1.1 * state
    assert case["transient_bytes"] == 8 * 256 * 256


def test_plots_json_times_every_writer_against_the_bar_charts_alone():
    report = _report("plots.py", "--epochs", "2", "--layers", "2", "--every", "none,1")
    assert report["machine"]["cpu"] and report["machine"]["cores"] >= 1
    writers = [case["writer"] for case in report["results"]]
    assert writers == ["bars only", "plot writer, history_every=None", "plot writer, history_every=1"]
    # Two modes (lsat is the default stat) over two epochs: four bar charts each; the plot
    # writers add a heatmap per mode, drawn at close (None) or at every epoch (1).
    assert [case["pictures"] for case in report["results"]] == [4, 6, 6]
    baseline = report["results"][0]
    for case in report["results"]:
        assert case["layers"] == 2 and case["epochs"] == 2
        for key in ("epoch_wall_s", "epoch_cpu_s", "median_epoch_wall_s", "run_wall_per_epoch_s"):
            assert math.isfinite(case[key]) and case[key] > 0, key
        assert math.isclose(case["ratio_cpu"], case["epoch_cpu_s"] / baseline["epoch_cpu_s"])


def test_sampling_epoch_reports_every_setting_against_the_exact_run():
    # Through overhead.py's --sampling, as the benchmark README runs it, on a tiny block.
    report = _report(
        "overhead.py", "--sampling", "--width", "32", "--hidden", "64", "--heads", "4", "--batch", "2", "--steps",
        "16", "--batches", "8", "--warmup", "1", "--threads", "1",
    )
    assert report["machine"]["cpu"] and report["machine"]["torch_threads"] == 1
    assert report["settings"]["rows_per_batch_of_data"] == 32  # B·T rows: timestepwise
    assert report["settings"]["timed_rounds"] == 7
    assert report["identical_weights"]  # tracking changes no weight: the runs differ only in what they record
    names = [run["name"] for run in report["runs"]]
    assert names == ["untracked", "exact", "rows_per_batch=8 (rows/4)", "rows_per_batch=2 (rows/16)",
                     "log_interval=4", "log_interval=16"]
    untracked, exact, *others = report["runs"]
    assert "layers" not in untracked and untracked["step_s"] > 0
    layers = ["q", "k", "v", "out", "ffn1", "ffn2"]
    widths = dict(q=32, k=32, v=32, out=32, ffn1=64, ffn2=32)
    # Rows per layer over the 8 batches: all 32, 8 or 2 drawn of each, every 4th or 16th batch whole.
    assert [run["rows_recorded"] for run in [exact] + others] == [256, 64, 16, 64, 0]
    for run in [exact] + others[:3]:
        assert list(run["layers"]) == layers
        for layer, values in run["layers"].items():
            assert values["lsat"] == values["idim"] / widths[layer]
            for stat in ("lsat", "idim"):
                assert run[f"delta_{stat}"][layer] == abs(values[stat] - exact["layers"][layer][stat])
        assert run["epoch_end_s"] > 0 and math.isfinite(run["overhead"]) and run["hooks_s"] > 0
    assert all(d == 0 for stat in ("lsat", "idim") for d in exact[f"delta_{stat}"].values())
    # log_interval=16 recorded none of the 8 batches: no value, no difference (null in JSON).
    assert all(v == {"lsat": None, "idim": None} for v in others[3]["layers"].values())
    assert all(d is None for d in others[3]["delta_lsat"].values())
