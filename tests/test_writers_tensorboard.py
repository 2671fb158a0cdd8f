"""The TensorBoard writer: event files read back with TensorBoard's own reader."""

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from delve import CheckLayerSat
from delve.writers import WRITERS, TensorBoardWriter
from tests.reference import np_stats
from tests.writer_runs import LAYERS, MODES, loss_value, make_model, run_epochs


def read_events(logdir):
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return events


def series(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.parametrize("key", ["tensorboard", "tb"])
def test_keys(key):
    assert WRITERS[key] is TensorBoardWriter


def test_scalars_and_spectrum_ranks_are_tags_at_step_epoch(tmp_path):
    model = make_model()
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "tb", model, stats=["lsat", "trc", "spectrum", "cov", "embed"],
                            spectrum_k=3, average_sat=True)
    rows = run_epochs(tracker, model, epochs=1)
    assert series(read_events(savefile), "loss") == [(0, pytest.approx(loss_value(0, 0)))]  # flushed at save
    rows.update(run_epochs(tracker, model, epochs=2, first_epoch=1))
    tracker.close()

    events = read_events(savefile)
    per_layer = [f"{m}-{s}_{layer}" for m in MODES for layer in LAYERS for s in ("saturation", "covariance-trace")]
    ranks = [f"{m}-spectrum_{layer}/rank-{i}" for m in MODES for layer in LAYERS for i in (1, 2, 3)]
    assert sorted(events.Tags()["scalars"]) == sorted(
        per_layer + ranks + ["loss", "average-train-sat", "average-eval-sat"]
    )  # cov and embed are arrays: not TensorBoard scalars
    assert series(events, "loss") == [(e, pytest.approx(loss_value(0, e))) for e in range(3)]
    for mode in MODES:
        lsats = {e: [] for e in range(3)}
        for layer in LAYERS:
            refs = [np_stats(rows[e][(layer, mode)]) for e in range(3)]
            for e in range(3):
                lsats[e].append(refs[e]["lsat"])
            got = series(events, f"{mode}-saturation_{layer}")
            assert got == [(e, pytest.approx(refs[e]["lsat"], rel=1e-6)) for e in range(3)]
            got = series(events, f"{mode}-covariance-trace_{layer}")
            assert got == [(e, pytest.approx(refs[e]["trc"], rel=1e-5)) for e in range(3)]
            for rank in (1, 2, 3):
                got = series(events, f"{mode}-spectrum_{layer}/rank-{rank}")
                expected = [(e, pytest.approx(refs[e]["eig"][rank - 1], rel=1e-5, abs=1e-9)) for e in range(3)]
                assert got == expected
        assert series(events, f"average-{mode}-sat") == [(e, pytest.approx(np.mean(lsats[e]))) for e in range(3)]


def test_flush_secs_is_checked(tmp_path):
    with pytest.raises(ValueError, match="flush_secs must be a positive integer, got 0"):
        CheckLayerSat(str(tmp_path / "run"), "tb", make_model(), writer_args={"flush_secs": 0})
