"""Kernels chosen by timing: the choice logic with injected timings, and every candidate against numpy.

No test here depends on how fast anything really is: the clock is scripted, so that
a machine where the full Gram product wins and one where the block triangle wins are
both exercised wherever the suite runs.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import delve.gram as gram
import delve.schedule as schedule
from delve import CheckLayerSat, TorchCovarianceMatrix
from delve.autotune import Autotuner
from tests.reference import OutputCapture, np_cov, np_stats, rel_err

TOL = 1e-6


class ScriptedClock:
    """A clock that advances only when a candidate runs, by the time scripted for it."""

    def __init__(self, costs):
        self.costs = dict(costs)
        self.now = 0.0
        self.runs = []

    def __call__(self) -> float:
        return self.now

    def run(self, name: str) -> str:
        self.runs.append(name)
        self.now += self.costs[name]
        return name


def _tuner(clock, trials=2) -> Autotuner:
    return Autotuner("test kernel", ("a", "b", "c"), env="DELVE_TEST_KERNEL", trials=trials, clock=clock)


# ------------------------------------------------------------------ the choice itself


def test_candidates_are_timed_in_turn_and_the_fastest_is_kept():
    clock = ScriptedClock({"a": 3.0, "b": 1.0, "c": 2.0})
    tuner = _tuner(clock)
    results = [tuner.run("sig", ("a", "b", "c"), clock.run) for _ in range(10)]
    # Round robin while tuning (each call's own result is returned), then only the fastest.
    assert clock.runs[:6] == ["a", "b", "c", "a", "b", "c"]
    assert results == clock.runs
    assert clock.runs[6:] == ["b"] * 4
    decision = tuner.decision("sig")
    assert decision.choice == "b" and decision.reason == "fastest"
    assert decision.seconds == {"a": 3.0, "b": 1.0, "c": 2.0}


def test_the_best_of_the_trials_counts_and_ties_go_to_the_first_candidate():
    timings = iter([5.0, 1.0, 1.0, 5.0])  # a: 5 then 1, b: 1 then 5: both best 1

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    clock = Clock()

    def call(name):
        clock.now += next(timings)
        return name

    tuner = Autotuner("test kernel", ("a", "b"), env="DELVE_TEST_KERNEL", trials=2, clock=clock)
    for _ in range(4):
        tuner.run("sig", ("a", "b"), call)
    assert tuner.decision("sig").choice == "a"


def test_each_signature_is_tuned_on_its_own():
    clock = ScriptedClock({"a": 1.0, "b": 2.0, "c": 3.0})
    tuner = _tuner(clock, trials=1)
    for _ in range(3):
        tuner.run("small", ("a", "b"), clock.run)
    clock.costs = {"a": 9.0, "b": 2.0, "c": 3.0}
    for _ in range(3):
        tuner.run("large", ("a", "b"), clock.run)
    assert tuner.decision("small").choice == "a"
    assert tuner.decision("large").choice == "b"
    assert set(tuner.decisions()) == {"small", "large"}


def test_a_single_candidate_is_not_timed():
    def clock():
        raise AssertionError("nothing to choose: the clock must not be read")

    tuner = _tuner(clock)
    synced = []
    assert tuner.run("sig", ("c",), lambda name: name, sync=lambda: synced.append(1)) == "c"
    assert tuner.decision("sig").reason == "only candidate"
    assert synced == []


def test_the_device_is_waited_for_only_while_tuning():
    clock = ScriptedClock({"a": 1.0, "b": 2.0, "c": 3.0})
    tuner = _tuner(clock, trials=1)
    synced = []
    for _ in range(5):
        tuner.run("sig", ("a", "b"), clock.run, sync=lambda: synced.append(1))
    assert len(synced) == 4  # before and after each of the two timed calls


def test_the_environment_forces_a_candidate_and_a_bad_value_names_the_valid_ones(monkeypatch):
    clock = ScriptedClock({"a": 1.0, "b": 2.0, "c": 3.0})
    tuner = _tuner(clock)
    monkeypatch.setenv("DELVE_TEST_KERNEL", "c")
    assert [tuner.run("sig", ("a", "b"), clock.run) for _ in range(3)] == ["c"] * 3
    assert tuner.decision("sig").reason == "forced by DELVE_TEST_KERNEL"
    monkeypatch.setenv("DELVE_TEST_KERNEL", "fastest")
    with pytest.raises(ValueError, match=r"DELVE_TEST_KERNEL='fastest'.*valid: a, b, c"):
        tuner.run("sig", ("a", "b"), clock.run)


def test_the_decision_is_logged_at_debug(caplog):
    clock = ScriptedClock({"a": 2e-3, "b": 1e-3, "c": 3.0})
    tuner = _tuner(clock, trials=1)
    with caplog.at_level(logging.DEBUG, logger="delve"):
        for _ in range(2):
            tuner.run(("rows", 64), ("a", "b"), clock.run)
    records = [r for r in caplog.records if r.levelno == logging.DEBUG and "test kernel" in r.getMessage()]
    assert len(records) == 1
    assert "b (fastest: a 2 ms, b 1 ms)" in records[0].getMessage()


# ------------------------------------------------------------------ the Gram products


@pytest.fixture
def fresh_products(monkeypatch):
    """The process's product choice, emptied before and after the test (later batches tune again)."""
    monkeypatch.delenv(gram.PRODUCTS.env, raising=False)
    gram.PRODUCTS.forget()
    yield gram.PRODUCTS
    gram.PRODUCTS.forget()


@pytest.mark.parametrize("faster", ["full", "triangle"])
def test_each_machine_kind_gets_its_faster_product_and_numpy_accuracy(monkeypatch, fresh_products, faster):
    # Where one large product runs at full speed (full wins) and where it does not (the
    # triangle's fewer multiply-adds win): scripted, so both happen on any machine.
    clock = ScriptedClock({faster: 1.0, ("triangle" if faster == "full" else "full"): 1.5})
    monkeypatch.setattr(fresh_products, "clock", clock)
    for name, real in (("full", gram._full), ("triangle", gram._triangle)):
        monkeypatch.setattr(gram, f"_{name}", lambda *args, name=name, real=real: (clock.run(name), real(*args))[1])
    rng = np.random.default_rng(0)
    std = rng.uniform(0.5, 2.0, 96)
    timed = 2 * fresh_products.trials  # each of the two candidates, `trials` times in turn
    parts = [(rng.standard_normal((1500, 96)) * std + 1e4 * std).astype(np.float32) for _ in range(timed + 4)]
    acc = TorchCovarianceMatrix()
    for part in parts:
        acc.update(torch.from_numpy(part))
    assert clock.runs[:timed] == ["full", "triangle"] * fresh_products.trials
    assert clock.runs[timed:] == [faster] * 4
    signature = gram.product_signature(torch.from_numpy(parts[0]), torch.float32)
    decision = gram.product_decision(signature)
    assert decision.choice == faster and decision.reason == "fastest"
    assert rel_err(acc.fix().numpy(), np_cov(np.concatenate(parts))) < TOL


def test_small_products_are_not_split_and_not_timed(fresh_products, monkeypatch):
    monkeypatch.setattr(fresh_products, "clock", lambda: pytest.fail("a product this small is not timed"))
    acc = TorchCovarianceMatrix()
    rows = torch.randn(100, 24)
    acc.update(rows)
    decision = gram.product_decision(gram.product_signature(rows, torch.float32))
    assert decision.choice == "full" and decision.reason == "only candidate"


def test_signatures_group_row_counts_by_powers_of_two():
    sig = gram.product_signature
    assert sig(torch.empty(300, 64), torch.float32) == sig(torch.empty(512, 64), torch.float32)
    assert sig(torch.empty(513, 64), torch.float32) != sig(torch.empty(512, 64), torch.float32)
    assert sig(torch.empty(8, 3, 64).movedim(1, -1), torch.float32)[2] == "features"
    assert sig(torch.empty(512, 64), torch.float32) != sig(torch.empty(512, 64), torch.float64)


def test_forcing_a_product_with_the_environment(fresh_products, monkeypatch):
    monkeypatch.setenv("DELVE_GRAM_PRODUCT", "triangle")
    monkeypatch.setattr(fresh_products, "clock", lambda: pytest.fail("a forced product is not timed"))
    rows = torch.randn(3000, 200)
    acc = TorchCovarianceMatrix()
    acc.update(rows)
    decision = gram.product_decision(gram.product_signature(rows, torch.float32))
    assert decision.choice == "triangle" and decision.reason == "forced by DELVE_GRAM_PRODUCT"
    assert rel_err(acc.fix().numpy(), np_cov(rows.double().numpy())) < TOL
    monkeypatch.setenv("DELVE_GRAM_PRODUCT", "blocked")
    with pytest.raises(ValueError, match="DELVE_GRAM_PRODUCT='blocked'.*valid: full, triangle"):
        acc.update(rows)


# ------------------------------------------------------------------ the epoch-end schedule


def _jobs(sizes, seed=1):
    rng = np.random.default_rng(seed)
    covs = {}
    for i, d in enumerate(sizes):
        a = rng.standard_normal((3 * d, d)) * rng.uniform(0.1, 3.0, d)
        covs[f"layer{i}"] = torch.from_numpy(np_cov(a))
    jobs = {name: (lambda cov=cov: torch.linalg.eigvalsh(cov)) for name, cov in covs.items()}
    return covs, jobs, {name: cov.shape[0] for name, cov in covs.items()}


@pytest.mark.parametrize("name", schedule.SCHEDULES.candidates)
def test_both_schedules_give_every_result_and_leave_the_thread_count_alone(monkeypatch, name):
    monkeypatch.setenv(schedule.SCHEDULES.env, name)
    # Two threads on any machine; the settings are recorded, not made, so the process keeps its own.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    threads = 2
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    covs, jobs, widths = _jobs([40, 7, 65, 40, 12])
    results = schedule.run_all(jobs, widths, on_cpu=True)
    assert set(results) == set(covs)
    for key, cov in covs.items():
        np.testing.assert_allclose(results[key].numpy(), np.linalg.eigvalsh(cov.numpy()), rtol=1e-10, atol=1e-12)
    # Side by side, the count is one for the phase and exactly the caller's afterwards.
    assert set_to == ([1, threads] if name == "parallel" else [])


@pytest.mark.parametrize("name", schedule.SCHEDULES.candidates)
def test_a_failing_job_is_raised_and_the_thread_count_restored(monkeypatch, name):
    monkeypatch.setenv(schedule.SCHEDULES.env, name)
    before = torch.get_num_threads()
    covs, jobs, widths = _jobs([20, 30, 25])

    def fails():
        raise RuntimeError("did not converge")

    jobs["layer1"] = fails
    with pytest.raises(RuntimeError, match="did not converge"):
        schedule.run_all(jobs, widths, on_cpu=True)
    assert torch.get_num_threads() == before


def test_the_faster_schedule_is_kept(monkeypatch):
    monkeypatch.delenv(schedule.SCHEDULES.env, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two schedules to choose from on any machine
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    clock = ScriptedClock({"sequential": 2.0, "parallel": 1.0})
    tuner = Autotuner("epoch-end schedule", schedule.SCHEDULES.candidates, env=schedule.SCHEDULES.env, trials=1,
                      clock=clock)
    real_run = tuner.run

    def run(signature, allowed, call, sync=lambda: None):
        # Each schedule "takes" its scripted time, then really runs.
        return real_run(signature, allowed, lambda name: (clock.run(name), call(name))[1], sync)

    monkeypatch.setattr(tuner, "run", run)
    monkeypatch.setattr(schedule, "SCHEDULES", tuner)
    covs, jobs, widths = _jobs([16, 24])
    for _ in range(4):
        assert set(schedule.run_all(jobs, widths, on_cpu=True)) == set(covs)
    assert clock.runs == ["sequential", "parallel", "parallel", "parallel"]
    assert tuner.decision(((16, 24), 2)).choice == "parallel"


def test_one_job_or_a_gpu_runs_in_order_without_timing(monkeypatch):
    monkeypatch.delenv(schedule.SCHEDULES.env, raising=False)
    tuner = Autotuner("epoch-end schedule", schedule.SCHEDULES.candidates, env=schedule.SCHEDULES.env,
                      clock=lambda: pytest.fail("nothing to choose: no timing"))
    monkeypatch.setattr(schedule, "SCHEDULES", tuner)
    covs, jobs, widths = _jobs([10, 20])
    assert set(schedule.run_all(jobs, widths, on_cpu=False)) == set(covs)
    assert set(schedule.run_all({"layer0": jobs["layer0"]}, {"layer0": 10}, on_cpu=True)) == {"layer0"}


@pytest.mark.parametrize("name", schedule.SCHEDULES.candidates)
def test_tracker_statistics_under_each_schedule_match_numpy(monkeypatch, name):
    monkeypatch.setenv(schedule.SCHEDULES.env, name)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 30), nn.Tanh(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 9))
    tracker = CheckLayerSat("unused", "csv", model, stats=["lsat", "idim", "det"], nosave=True)
    capture = OutputCapture(tracker.layers)
    with torch.no_grad():
        for _ in range(6):
            model(torch.randn(50, 12) * 3)
    values = tracker.add_saturations()
    for layer in tracker.layers:
        expected = np_stats(np.concatenate(capture.take(layer, "train")))
        assert values[f"train-intrinsic-dimensionality_{layer}"] == expected["idim"]
        assert values[f"train-saturation_{layer}"] == pytest.approx(expected["lsat"])
        assert values[f"train-covariance-determinant_{layer}"] == pytest.approx(expected["det"], rel=1e-6)
    capture.remove()
    tracker.close()


@pytest.mark.parametrize("variable", [gram.PRODUCTS.env, schedule.SCHEDULES.env])
def test_a_mistyped_variable_fails_at_construction(monkeypatch, variable):
    # Read at every batch, it would otherwise fail every batch of the run.
    monkeypatch.setenv(variable, "fastest")
    with pytest.raises(ValueError, match=rf"{variable}='fastest' is not .*; valid: "):
        CheckLayerSat("unused", "csv", nn.Linear(3, 4), nosave=True)
