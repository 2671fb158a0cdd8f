"""Gloo ranks on CPU: statistics of the union of the shards, written by rank 0, at a cost that does not grow.

Every rank saves the rows it fed (or the layer outputs its own hooks captured) and what
the library returned; the test process compares them with numpy on the union. Starting
ranks is the expensive part, so one spawn per world size serves many checks.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from delve import CheckLayerSat, TorchCovarianceMatrix
from delve import distributed as delve_dist
from tests.reference import OutputCapture, conv_rows, np_cov, np_stats, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
STEPS = 3
LAYERS = ("fc1", "fc2")
STATS = ["lsat", "idim", "trc", "dtrc", "cov"]
TOL = 1e-6  # SPEC §4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _mlp(widths) -> nn.Sequential:
    layers, previous = [], 8
    for width in widths:
        layers += [nn.Linear(previous, width), nn.Tanh()]
        previous = width
    return nn.Sequential(*layers)


SMALL_MODEL = (256, 128, 64)
LARGE_MODEL = (64, 128, 256, 256, 128, 64, 32, 64, 128, 64, 32, 16)


def _shard(epoch: int, step: int, rank: int) -> torch.Tensor:
    """This rank's share of a global batch; the ranks get different sizes on purpose."""
    gen = torch.Generator().manual_seed(1000 * epoch + 10 * step + rank)
    rows = 5 + 3 * rank
    return torch.randn(rows, 6, generator=gen) * torch.linspace(0.5, 3.0, 6) + 4.0


def _save(out: str, name: str, array) -> None:
    np.save(os.path.join(out, name + ".npy"), np.asarray(array))


def _load(out: str, name: str):
    path = os.path.join(out, name + ".npy")
    return np.load(path) if os.path.exists(path) else None


# ----------------------------------------------------------------- rank side
@contextlib.contextmanager
def _counting_collectives(calls: list):
    """Wrap torch.distributed's collectives while inside: each call appends (name, bytes received).

    The first argument of each of them is what the caller receives into (the tensor of
    ``all_reduce``/``broadcast``, the output list or tensor of the gathers).
    """
    names = (
        "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
        "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter",
        "barrier", "all_gather_object", "broadcast_object_list",
    )
    originals = {name: getattr(dist, name) for name in names}

    def counting(name, original):
        def counted(*args, **kwargs):
            first = args[0] if args else None
            tensors = first if isinstance(first, (list, tuple)) else [first]
            calls.append((name, sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))))
            return original(*args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# Per key: the rows each rank feeds (None: no rows), built from (seed, rank) alone.
def _union_case(key: str, rank: int, world: int):
    gen = np.random.default_rng([rank, len(key), world])
    rows = 40 + 9 * rank
    if key == "near":
        return (gen.standard_normal((rows, 7)) * np.linspace(0.5, 2, 7) + 0.5).astype(np.float32)
    if key == "far":  # |mean| = 1e4·std on every rank
        return (gen.standard_normal((rows, 6)) + 1e4).astype(np.float32)
    if key == "mixed":  # |mean| = 1e4·std on some ranks, 0 on the others
        return (gen.standard_normal((rows, 5)) + (1e4 if rank % 2 == 0 else 0.0)).astype(np.float32)
    if key == "far64":  # float64 rows with |mean| = 1e7·std: raw moments would keep two digits
        return gen.standard_normal((rows, 4)) * np.array([1.0, 2.0, 0.5, 1.0]) + 1e7
    if key == "last-only":
        return gen.standard_normal((rows, 3)).astype(np.float32) if rank == world - 1 else None
    if key == "nobody":
        return None
    if key == "wide":  # spans many small buckets; rank 0 contributes zeros
        return None if rank == 0 else (gen.standard_normal((rows, 48)) * 3 - 1).astype(np.float32)
    if key == "widths":  # rank 0 none at world 4, then widths 4, 6, 4: the lowest rank with rows has 4
        if world == 4 and rank == 0:
            return None
        width = 4 if (rank % 2 == 0) == (world == 2) else 6
        return (gen.standard_normal((rows, width)) + 2).astype(np.float32)
    raise KeyError(key)


UNION_KEYS = ("near", "far", "mixed", "far64", "last-only", "nobody", "wide", "widths")


def _merge_union(rank: int, world: int, out: str) -> None:
    accs = {}
    for key in UNION_KEYS:
        rows = _union_case(key, rank, world)
        accs[key] = TorchCovarianceMatrix()
        if rows is not None:
            _save(out, f"union_rows_{key}_{rank}", rows)
            for part in np.array_split(rows, 3):  # several batches, so the shift moves
                accs[key].update(torch.from_numpy(part))
            if key == "near" and rank == 1:  # a skipped batch is counted on every rank
                accs[key].update(torch.full((2, rows.shape[1]), float("nan")))
    errors = _Errors()
    logging.getLogger("delve").addHandler(errors)
    for label, bucket in (("default", delve_dist.BUCKET_BYTES), ("small", 8 * 100)):
        calls = []
        with _counting_collectives(calls):
            merged = delve_dist.synchronize(accs, bucket_bytes=bucket)
        with open(os.path.join(out, f"union_calls_{label}_{rank}.json"), "w") as f:
            json.dump(calls, f)
        assert list(merged) == list(UNION_KEYS)
        for key, acc in merged.items():
            if acc.dim is None:
                _save(out, f"union_empty_{label}_{key}_{rank}", [])
                continue
            _save(out, f"union_cov_{label}_{key}_{rank}", acc.fix().numpy())
            _save(out, f"union_mean_{label}_{key}_{rank}", acc.mean.numpy())
            _save(out, f"union_count_{label}_{key}_{rank}", acc.count)
            _save(out, f"union_skipped_{label}_{key}_{rank}", acc.skipped_batches)
    logging.getLogger("delve").removeHandler(errors)
    with open(os.path.join(out, f"union_errors_{rank}.json"), "w") as f:
        json.dump(errors.messages, f)
    # The local accumulators are untouched.
    for key, acc in accs.items():
        rows = _union_case(key, rank, world)
        assert acc.count == (0 if rows is None else rows.shape[0])


def _merge_costs(rank: int, world: int, out: str) -> None:
    """Collective calls and bytes received during add_saturations(), for a 3- and a 12-layer model."""
    costs = {}
    for label, widths in (("small", SMALL_MODEL), ("large", LARGE_MODEL)):
        torch.manual_seed(0)
        model = _mlp(widths)
        tracker = CheckLayerSat("unused", "csv", model, stats=["lsat"], nosave=True)
        gen = torch.Generator().manual_seed(rank)
        model(torch.randn(64 + rank, 8, generator=gen))
        model.eval()
        model(torch.randn(16, 8, generator=gen))
        calls = []
        with _counting_collectives(calls):
            tracker.add_saturations()
        tracker.close()
        costs[label] = {"calls": len(calls), "bytes": sum(b for _, b in calls), "layers": len(tracker.layers)}
    with open(os.path.join(out, f"costs_{world}_{rank}.json"), "w") as f:
        json.dump(costs, f)


def _train_and_record(rank: int, out: str) -> None:
    """Train the DDP model for a few epochs and save what the test checks afterwards."""
    torch.manual_seed(0)
    model = Net()
    ddp = DistributedDataParallel(model)

    # The test's own record of every output, independent of the library.
    capture = OutputCapture({name: getattr(model, name) for name in LAYERS})

    savefile = os.path.join(out, f"rank{rank}", "stats")
    tracker = CheckLayerSat(savefile, "csv", ddp, stats=STATS)
    # Keeps its covariance across epochs: must not count the other rank's rows twice.
    keeper = CheckLayerSat("unused", "csv", ddp, stats=["cov_train"], reset_covariance=False, nosave=True)
    assert list(tracker.layers) == list(LAYERS)
    assert (tracker.writer is None) == (rank != 0)

    for epoch in range(EPOCHS):
        model.train()
        for step in range(STEPS):
            ddp.zero_grad()
            ddp(_shard(epoch, step, rank)).pow(2).mean().backward()
            with torch.no_grad():  # plain SGD; torch.optim's first step imports for seconds
                for param in ddp.parameters():
                    param -= 0.05 * param.grad
        if rank == 0:  # eval data on one rank only: rank 1 has none for that mode
            model.eval()
            with torch.no_grad():
                model(_shard(epoch, 99, rank) * 0.5)
            model.train()
        values = tracker.add_saturations()
        kept = keeper.add_saturations()
        for mode in ("train", "eval"):
            for name in LAYERS:
                _save(out, f"cov_{rank}_{epoch}_{mode}_{name}", values[f"{mode}-covariance-matrix_{name}"])
        for name in LAYERS:
            _save(out, f"kept_{rank}_{epoch}_{name}", kept[f"train-covariance-matrix_{name}"])
            for mode in ("train", "eval"):
                arrays = capture.take(name, mode)
                if arrays:
                    _save(out, f"rows_{rank}_{epoch}_{mode}_{name}", np.concatenate(arrays))
    tracker.close()
    keeper.close()
    capture.remove()


def _flatten_widths(rank: int, out: str) -> None:
    """conv_method='flatten' on maps of 4×4 (rank 0) and 5×5 (rank 1): two epochs, then the next works."""
    torch.manual_seed(0)
    model = ConvNet()
    capture = OutputCapture({"conv": model.conv, "fc": model.fc})
    tracker = CheckLayerSat("unused", "csv", model, stats=["cov_train"], conv_method="flatten", nosave=True)
    errors = _Errors()
    logging.getLogger("delve").addHandler(errors)
    side = 4 + rank
    for epoch in range(2):
        for step in range(2):
            gen = torch.Generator().manual_seed(100 * epoch + 10 * step + rank)
            model(torch.randn(6 - rank, 2, side, side, generator=gen))
        values = tracker.add_saturations()
        for name in ("conv", "fc"):
            _save(out, f"flat_cov_{rank}_{epoch}_{name}", values[f"train-covariance-matrix_{name}"])
            rows = [conv_rows(o, "flatten") if name == "conv" else o for o in capture.take(name, "train")]
            _save(out, f"flat_rows_{rank}_{epoch}_{name}", np.concatenate(rows))
    logging.getLogger("delve").removeHandler(errors)
    tracker.close()
    capture.remove()
    with open(os.path.join(out, f"flat_errors_{rank}.json"), "w") as f:
        json.dump(errors.messages, f)


def _fsdp2(rank: int, out: str) -> None:
    """A model sharded with FSDP2's fully_shard, tracked like a DDP model."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    for layer in (model.fc1, model.fc2, model):
        fully_shard(layer)
    capture = OutputCapture({name: getattr(model, name) for name in LAYERS})
    tracker = CheckLayerSat("unused", "csv", model, stats=["cov"], nosave=True)
    with open(os.path.join(out, f"fsdp_layers_{rank}.json"), "w") as f:
        json.dump(list(tracker.layers), f)
    for step in range(2):
        model(_shard(7, step, rank)).pow(2).mean().backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= 0.05 * param.grad
        model.zero_grad()
    model.eval()
    with torch.no_grad():
        model(_shard(7, 99, rank))
    values = tracker.add_saturations()
    for mode in ("train", "eval"):
        for name in LAYERS:
            _save(out, f"fsdp_cov_{rank}_{mode}_{name}", values[f"{mode}-covariance-matrix_{name}"])
            _save(out, f"fsdp_rows_{rank}_{mode}_{name}", np.concatenate(capture.take(name, mode)))
    tracker.close()
    capture.remove()


def _init(rank: int, world: int, out: str, timeout: float) -> None:
    # A file rendezvous: picking a "free" TCP port and binding it later races with
    # whatever else runs on the machine (parallel test workers included).
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out, 'rendezvous')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )


def _worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    _init(rank, world, out, timeout=60)
    try:
        _merge_union(rank, world, out)
        _merge_costs(rank, world, out)
        if world == 2:
            _train_and_record(rank, out)
            _flatten_widths(rank, out)
            _fsdp2(rank, out)
        # DDP holds the process group through reference cycles; left to interpreter
        # shutdown, gloo's threads are torn down in an order that can abort the process.
        gc.collect()
        dist.barrier()  # the ranks leave together
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is on disk; skip finalizers of C++ thread pools


def _skipping_worker(rank: int, world: int, out: str) -> None:
    """Rank 0 closes an epoch, rank 1 never does: it waits (no collective) until rank 0 has an answer."""
    torch.set_num_threads(1)
    # Meet before the group exists, so that its short timeout is not spent on imports.
    open(os.path.join(out, f"ready_{rank}"), "w").close()
    _wait_for(out, [f"ready_{r}" for r in range(world)])
    _init(rank, world, out, timeout=3)
    model = Net()
    tracker = CheckLayerSat("unused", "csv", model, nosave=True)
    model(_shard(0, 0, rank))
    if rank == 0:
        try:
            tracker.add_saturations()
            answer = "no error"
        except RuntimeError as err:
            answer = str(err)
        with open(os.path.join(out, "answer.tmp"), "w") as f:
            f.write(answer)
        os.replace(os.path.join(out, "answer.tmp"), os.path.join(out, "answer"))
    else:
        _wait_for(out, ["answer"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the group is broken: no teardown


def _wait_for(out: str, names, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not all(os.path.exists(os.path.join(out, name)) for name in names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{names} did not appear in {limit} s")
        time.sleep(0.05)


# ---------------------------------------------------------------- test side
def _spawn(worker, world: int, out: str, limit: float = 240) -> None:
    """Run ``worker(rank, world, out)`` on ``world`` processes; fail (killing them) after ``limit`` seconds."""
    context = mp.start_processes(worker, args=(world, out), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} distributed workers did not finish in {limit} s (a collective waits forever)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _union_reference(out: str, key: str, world: int, ranks=None):
    parts = [_load(out, f"union_rows_{key}_{r}") for r in (range(world) if ranks is None else ranks)]
    parts = [p for p in parts if p is not None]
    return np.concatenate(parts).astype(np.float64) if parts else None


def _check_union_is_exact(out: str, world: int) -> None:
    for label in ("default", "small"):
        for key in UNION_KEYS:
            if key == "widths":  # only the ranks whose width is that of the lowest rank with rows
                first = next(r for r in range(world) if _load(out, f"union_rows_{key}_{r}") is not None)
                width = _load(out, f"union_rows_{key}_{first}").shape[1]
                ranks = [r for r in range(world) if _width(out, key, r) == width]
                assert any(_width(out, key, r) not in (None, width) for r in range(world))  # some are left out
                rows = _union_reference(out, key, world, ranks)
            else:
                rows = _union_reference(out, key, world)
            if rows is None:
                for rank in range(world):
                    assert _load(out, f"union_empty_{label}_{key}_{rank}") is not None, (label, key)
                continue
            covs = [_load(out, f"union_cov_{label}_{key}_{r}") for r in range(world)]
            assert rel_err(covs[0], np_cov(rows)) < TOL, (label, key)
            # float32 rows are summed in float32 once centred: the mean is exact to a fraction of the std.
            mean = _load(out, f"union_mean_{label}_{key}_0")
            assert np.abs(mean - rows.mean(0)).max() < TOL * rows.std(0).min(), (label, key)
            assert int(_load(out, f"union_count_{label}_{key}_0")) == rows.shape[0]
            skipped = int(_load(out, f"union_skipped_{label}_{key}_0"))
            assert skipped == (1 if key == "near" else 0)
            for rank in range(1, world):  # the same sums, the same arithmetic: bit-identical
                np.testing.assert_array_equal(covs[rank], covs[0])


def _width(out, key, rank):
    rows = _load(out, f"union_rows_{key}_{rank}")
    return None if rows is None else rows.shape[1]


def _check_buckets(out: str, world: int) -> None:
    for rank in range(world):
        with open(os.path.join(out, f"union_calls_default_{rank}.json")) as f:
            default = json.load(f)
        with open(os.path.join(out, f"union_calls_small_{rank}.json")) as f:
            small = json.load(f)
        assert [name for name, _ in default] == ["all_reduce"] * 3
        # Buckets of 100 float64: the 48-wide accumulator alone spans 13 of them.
        assert all(received <= 800 for _, received in small[2:])
        assert len(small) > 15
        assert sum(b for _, b in small[2:]) == sum(b for _, b in default[2:])


def _check_width_disagreement_is_logged_once(out: str, world: int) -> None:
    for rank in range(world):
        with open(os.path.join(out, f"union_errors_{rank}.json")) as f:
            (message,) = json.load(f)
        assert "'widths'" in message and "4 to 6 features" in message
        if _width(out, "widths", rank) == 6:
            assert "this rank's rows (6 features) are left out" in message


def _check_costs_do_not_grow(runs: dict) -> None:
    costs = {}
    for world, out in runs.items():
        for rank in range(world):
            with open(os.path.join(out, f"costs_{world}_{rank}.json")) as f:
                costs[world, rank] = json.load(f)
    for (world, rank), cost in costs.items():
        assert cost["small"]["layers"] == 3 and cost["large"]["layers"] == 12
        # Four times the layers: no more than two more collective calls.
        assert cost["large"]["calls"] <= cost["small"]["calls"] + 2, (world, rank, cost)
        # Twice the ranks: each rank receives (about) what it received with two.
        for label in ("small", "large"):
            assert cost[label]["bytes"] <= 1.25 * costs[2, 0][label]["bytes"], (world, rank, label, cost)


def _rows(out, epoch, mode, name, ranks=(0, 1)):
    parts = [_load(out, f"rows_{r}_{epoch}_{mode}_{name}") for r in ranks]
    return np.concatenate([p for p in parts if p is not None])


def _check_rank0_csv_holds_statistics_of_all_samples(out):
    table = pd.read_csv(os.path.join(out, "rank0", "stats.csv"), sep=";", index_col=0)
    assert list(table.index) == list(range(EPOCHS))
    for epoch in range(EPOCHS):
        for mode in ("train", "eval"):
            for name in LAYERS:
                rows = _rows(out, epoch, mode, name)
                # Shards really differ in size, so an average of covariances would be wrong.
                assert rows.shape[0] == (STEPS * (5 + 8) if mode == "train" else 5)
                expected = np_stats(rows)
                for stat, column in (
                    ("idim", "intrinsic-dimensionality"),
                    ("lsat", "saturation"),
                    ("trc", "covariance-trace"),
                    ("dtrc", "diagonal-trace"),
                ):
                    got = table.loc[epoch, f"{mode}-{column}_{name}"]
                    assert got == pytest.approx(expected[stat], rel=TOL), (epoch, mode, name, stat)


def _check_every_rank_gets_the_union_covariance(out):
    for epoch in range(EPOCHS):
        for mode in ("train", "eval"):
            for name in LAYERS:
                expected = np_cov(_rows(out, epoch, mode, name))
                covs = [_load(out, f"cov_{r}_{epoch}_{mode}_{name}") for r in range(2)]
                assert rel_err(covs[0], expected) < TOL
                np.testing.assert_array_equal(covs[0], covs[1])
                # Not merely rank 0's own shard.
                own = np_cov(_rows(out, epoch, mode, name, ranks=[0]))
                if mode == "train":
                    assert rel_err(own, expected) > 1e-3


def _check_kept_covariance_is_not_double_counted(out):
    for epoch in range(EPOCHS):
        for name in LAYERS:
            rows = np.concatenate([_rows(out, e, "train", name) for e in range(epoch + 1)])
            for rank in range(2):
                got = _load(out, f"kept_{rank}_{epoch}_{name}")
                assert rel_err(got, np_cov(rows)) < TOL, (epoch, name, rank)


def _check_only_rank0_writes(out):
    assert sorted(os.listdir(os.path.join(out, "rank0"))) == ["stats.csv"]
    assert not os.path.exists(os.path.join(out, "rank1"))


def _check_flatten_widths(out):
    for epoch in range(2):
        for rank in range(2):
            # The convolution: rank 0's width (4×4 maps, 48 features) wins; rank 1's rows are left out.
            conv = _load(out, f"flat_cov_{rank}_{epoch}_conv")
            assert conv.shape == (48, 48)
            assert rel_err(conv, np_cov(_load(out, f"flat_rows_0_{epoch}_conv"))) < TOL
            # The linear layer after it: every rank's rows, in every epoch.
            union = np.concatenate([_load(out, f"flat_rows_{r}_{epoch}_fc") for r in range(2)])
            assert rel_err(_load(out, f"flat_cov_{rank}_{epoch}_fc"), np_cov(union)) < TOL
    for rank in range(2):
        with open(os.path.join(out, f"flat_errors_{rank}.json")) as f:
            (message,) = json.load(f)  # one error over two epochs
        assert "('conv', 'train')" in message and "48 to 75 features" in message
        if rank == 1:
            assert "this rank's rows (75 features) are left out" in message


def _check_fsdp2(out):
    for rank in range(2):
        with open(os.path.join(out, f"fsdp_layers_{rank}.json")) as f:
            assert json.load(f) == list(LAYERS)
    for mode in ("train", "eval"):
        for name in LAYERS:
            union = np.concatenate([_load(out, f"fsdp_rows_{r}_{mode}_{name}") for r in range(2)])
            covs = [_load(out, f"fsdp_cov_{r}_{mode}_{name}") for r in range(2)]
            assert rel_err(covs[0], np_cov(union)) < TOL, (mode, name)
            np.testing.assert_array_equal(covs[0], covs[1])


def test_two_and_four_gloo_ranks(tmp_path):
    runs = {world: str(tmp_path / f"world{world}") for world in (2, 4)}
    for world, out in runs.items():
        os.makedirs(out)
        _spawn(_worker, world, out)
    for world, out in runs.items():
        _check_union_is_exact(out, world)
        _check_buckets(out, world)
        _check_width_disagreement_is_logged_once(out, world)
    _check_costs_do_not_grow(runs)
    out = runs[2]
    _check_rank0_csv_holds_statistics_of_all_samples(out)
    _check_every_rank_gets_the_union_covariance(out)
    _check_kept_covariance_is_not_double_counted(out)
    _check_only_rank0_writes(out)
    _check_flatten_widths(out)
    _check_fsdp2(out)


def test_a_rank_that_skips_add_saturations_gets_an_error_saying_so(tmp_path):
    _spawn(_skipping_worker, 2, str(tmp_path), limit=120)
    with open(tmp_path / "answer") as f:
        answer = f.read()
    assert "every rank has to call add_saturations()" in answer.lower()
    assert "timed out" in answer.lower()  # gloo's own words, kept in the message


def test_torchrun_runs_the_example_on_two_cpu_processes(tmp_path):
    # As a user runs it (torchrun --nproc_per_node 2 examples/distributed.py --synthetic), with
    # hooks of the test's own on the tracker's layers in each process.
    savefile = str(tmp_path / "run")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(ROOT, "tests", "record_example.py"), str(tmp_path),
        os.path.join(ROOT, "examples", "distributed.py"),
        "--synthetic", "--epochs", "2", "--samples", "128", "--batch-size", "32", "--savefile", savefile,
    ]
    # Its own session, so that a hung run is killed with every process it started.
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("torchrun did not finish in 240 s")
    assert process.returncode == 0, output
    assert f"wrote {savefile}.csv" in output

    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    recorded = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(2)]
    assert list(table.index) == [0, 1]
    for epoch in range(2):
        for mode in ("train", "eval"):
            for layer, width in (("conv1", 16), ("conv2", 32), ("fc1", 64), ("fc2", 10)):
                outputs = [r[f"{epoch}/{layer}/{mode}"] for r in recorded]
                to_rows = (lambda o: conv_rows(o, "channelwise")) if layer.startswith("conv") else (lambda o: o)
                rows = np.concatenate([to_rows(o) for o in outputs])
                # Each process saw its half: 64 training images, 16 test images.
                assert [o.shape[0] for o in outputs] == ([64, 64] if mode == "train" else [16, 16])
                expected = np_stats(rows)
                ratios = np.cumsum(expected["eig"]) / expected["eig"].sum()
                assert np.min(np.abs(ratios - 0.99)) > 1e-6  # not on the edge of a step
                assert table.loc[epoch, f"{mode}-intrinsic-dimensionality_{layer}"] == expected["idim"]
                assert table.loc[epoch, f"{mode}-saturation_{layer}"] == pytest.approx(expected["idim"] / width)


def test_without_a_process_group_nothing_changes():
    assert not delve_dist.is_distributed()
    assert delve_dist.is_writer()
    acc = TorchCovarianceMatrix()
    data = torch.randn(7, 3, dtype=torch.float64)
    acc.update(data)
    merged = delve_dist.synchronize({"a": acc, "b": TorchCovarianceMatrix()})
    assert merged["a"] is acc and merged["b"].dim is None
    np.testing.assert_allclose(merged["a"].fix().numpy(), np_cov(data.numpy()), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="bucket_bytes"):
        delve_dist.synchronize({"a": acc}, bucket_bytes=4)


def test_unwrap_names_layers_as_in_the_plain_model(tmp_path):
    model = Net()
    wrapped = nn.DataParallel(model)  # on CPU it just calls the module
    tracker = CheckLayerSat(str(tmp_path / "s"), "csv", wrapped, nosave=True)
    assert list(tracker.layers) == list(LAYERS)
    assert tracker.layers["fc1"] is model.fc1
    tracker.close()
