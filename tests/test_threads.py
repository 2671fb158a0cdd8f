"""Hooks firing from several threads at once (as nn.DataParallel replicas do)."""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from delve import CheckLayerSat
from tests.reference import np_cov, rel_err

THREADS = 4
BATCHES = 6


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batch(thread: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * thread + step)
    return torch.randn(32, 8, generator=gen) * 2.0 + 3.0


def _run_threads(model: nn.Module) -> None:
    barrier = threading.Barrier(THREADS)
    errors = []

    def work(thread: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for step in range(BATCHES):
                    model(_batch(thread, step))
        except Exception as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_concurrent_forwards_give_the_covariance_of_all_samples(tmp_path):
    model = _model()
    captured = {"0": [], "2": []}
    lock = threading.Lock()

    def capture(name):
        def hook(module, inputs, output):
            with lock:
                captured[name].append(output.detach().double().numpy().copy())

        return hook

    for name in captured:
        model[int(name)].register_forward_hook(capture(name))
    tracker = CheckLayerSat(str(tmp_path / "threads"), "csv", model, stats=["cov", "trc"])

    for _ in range(2):  # two epochs, each its own reference
        _run_threads(model)
        values = tracker.add_saturations()
        for name, outputs in captured.items():
            rows = np.concatenate(outputs)
            assert rows.shape[0] == THREADS * BATCHES * 32
            expected = np_cov(rows)
            got = values[f"train-covariance-matrix_{name}"]
            assert rel_err(got, expected) < 1e-6
            assert np.isclose(values[f"train-covariance-trace_{name}"], np.trace(expected), rtol=1e-6)
            outputs.clear()
    tracker.close()


def test_concurrent_counters_respect_log_interval_and_max_samples():
    model = _model()
    every_other = CheckLayerSat("unused", "csv", model, stats=["cov"], log_interval=2, nosave=True)
    capped = CheckLayerSat("unused", "csv", model, stats=["cov"], max_samples=100, nosave=True)
    _run_threads(model)
    calls = THREADS * BATCHES
    for name in ("0", "2"):
        # Every second call of 24 is recorded: 12 batches of 32 rows, none lost or doubled.
        assert every_other.accumulator(name).count == calls // 2 * 32
        # The budget is shared by all threads: exactly 100 rows, the last batch cut.
        assert capped.accumulator(name).count == 100
    every_other.close()
    capped.close()
