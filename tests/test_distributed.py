"""Two gloo ranks on CPU: statistics of the union of the shards, written by rank 0 only."""

from __future__ import annotations

import gc
import os
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
from tests.reference import OutputCapture, np_cov, np_stats, rel_err

WORLD = 2
EPOCHS = 3
STEPS = 3
LAYERS = ("fc1", "fc2")
STATS = ["lsat", "idim", "trc", "dtrc", "cov"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _shard(epoch: int, step: int, rank: int) -> torch.Tensor:
    """This rank's share of a global batch; the ranks get different sizes on purpose."""
    gen = torch.Generator().manual_seed(1000 * epoch + 10 * step + rank)
    rows = 5 + 3 * rank
    return torch.randn(rows, 6, generator=gen) * torch.linspace(0.5, 3.0, 6) + 4.0


def _synced_accumulator_checks(rank: int, out: str) -> None:
    # Data on rank 0 only: rank 1 still joins both collectives and gets rank 0's rows.
    acc = TorchCovarianceMatrix()
    rows = torch.arange(12, dtype=torch.float64).reshape(4, 3) ** 1.5
    if rank == 0:
        acc.update(rows)
    merged = delve_dist.synced(acc)
    assert acc.count == (4 if rank == 0 else 0)  # the local accumulator is untouched
    np.save(os.path.join(out, f"one_sided_rank{rank}.npy"), merged.fix().numpy())

    # No rank has data: an empty result, no hang.
    assert delve_dist.synced(TorchCovarianceMatrix()).dim is None

    # Ranks that disagree on the width all raise, none is left waiting.
    odd = TorchCovarianceMatrix()
    odd.update(torch.ones(2, 3 + rank, dtype=torch.float64))
    try:
        delve_dist.synced(odd)
    except ValueError as err:
        assert "disagree" in str(err)
    else:
        raise AssertionError("a dimension mismatch between ranks was not detected")


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
                key = f"{mode}-covariance-matrix_{name}"
                np.save(os.path.join(out, f"cov_{rank}_{epoch}_{mode}_{name}.npy"), values[key])
        for name in LAYERS:
            key = f"train-covariance-matrix_{name}"
            np.save(os.path.join(out, f"kept_{rank}_{epoch}_{name}.npy"), kept[key])
            for mode in ("train", "eval"):
                arrays = capture.take(name, mode)
                if arrays:
                    np.save(os.path.join(out, f"rows_{rank}_{epoch}_{mode}_{name}.npy"), np.concatenate(arrays))
    tracker.close()
    keeper.close()
    capture.remove()


def _worker(rank: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous: picking a "free" TCP port and binding it later races with
    # whatever else runs on the machine (parallel test workers included).
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        _train_and_record(rank, out)
        _synced_accumulator_checks(rank, out)
        # DDP holds the process group through reference cycles; left to interpreter
        # shutdown, gloo's threads are torn down in an order that can abort the process.
        gc.collect()
        dist.barrier()  # both ranks leave together
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is on disk; skip finalizers of C++ thread pools


def _spawn(out: str) -> None:
    rendezvous = os.path.join(out, "rendezvous")
    context = mp.start_processes(_worker, args=(rendezvous, out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the distributed workers did not finish (a collective is waiting forever)")


def _rows(out, epoch, mode, name, ranks=range(WORLD)):
    parts = [
        np.load(os.path.join(out, f"rows_{r}_{epoch}_{mode}_{name}.npy"))
        for r in ranks
        if os.path.exists(os.path.join(out, f"rows_{r}_{epoch}_{mode}_{name}.npy"))
    ]
    return np.concatenate(parts)


def _check_rank0_csv_holds_statistics_of_all_samples(run):
    table = pd.read_csv(os.path.join(run, "rank0", "stats.csv"), sep=";", index_col=0)
    assert list(table.index) == list(range(EPOCHS))
    for epoch in range(EPOCHS):
        for mode in ("train", "eval"):
            for name in LAYERS:
                rows = _rows(run, epoch, mode, name)
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
                    assert got == pytest.approx(expected[stat], rel=1e-6), (epoch, mode, name, stat)


def _check_every_rank_gets_the_union_covariance(run):
    for epoch in range(EPOCHS):
        for mode in ("train", "eval"):
            for name in LAYERS:
                expected = np_cov(_rows(run, epoch, mode, name))
                covs = [np.load(os.path.join(run, f"cov_{r}_{epoch}_{mode}_{name}.npy")) for r in range(WORLD)]
                assert rel_err(covs[0], expected) < 1e-6
                # Same messages merged in the same rank order: bit-identical on every rank.
                np.testing.assert_array_equal(covs[0], covs[1])
                # Not merely rank 0's own shard.
                own = np_cov(_rows(run, epoch, mode, name, ranks=[0]))
                if mode == "train":
                    assert rel_err(own, expected) > 1e-3


def _check_kept_covariance_is_not_double_counted(run):
    for epoch in range(EPOCHS):
        for name in LAYERS:
            rows = np.concatenate([_rows(run, e, "train", name) for e in range(epoch + 1)])
            expected = np_cov(rows)
            for rank in range(WORLD):
                got = np.load(os.path.join(run, f"kept_{rank}_{epoch}_{name}.npy"))
                assert rel_err(got, expected) < 1e-6, (epoch, name, rank)


def _check_only_rank0_writes(run):
    assert os.path.isfile(os.path.join(run, "rank0", "stats.csv"))
    assert sorted(os.listdir(os.path.join(run, "rank0"))) == ["stats.csv"]
    assert not os.path.exists(os.path.join(run, "rank1"))


def _check_synced_accumulator_collectives(run):
    rows = (np.arange(12, dtype=np.float64).reshape(4, 3)) ** 1.5
    expected = np_cov(rows)
    for rank in range(WORLD):
        got = np.load(os.path.join(run, f"one_sided_rank{rank}.npy"))
        assert rel_err(got, expected) < 1e-12


def test_two_gloo_ranks_with_ddp(tmp_path):
    # One spawn serves every check: starting two interpreters is the expensive part.
    run = str(tmp_path)
    _spawn(run)
    _check_rank0_csv_holds_statistics_of_all_samples(run)
    _check_every_rank_gets_the_union_covariance(run)
    _check_kept_covariance_is_not_double_counted(run)
    _check_only_rank0_writes(run)
    _check_synced_accumulator_collectives(run)


def test_without_a_process_group_nothing_changes():
    assert not delve_dist.is_distributed()
    assert delve_dist.is_writer()
    acc = TorchCovarianceMatrix()
    data = torch.randn(7, 3, dtype=torch.float64)
    acc.update(data)
    copy = delve_dist.synced(acc)
    assert copy is not acc and copy.count == 7
    np.testing.assert_allclose(copy.fix().numpy(), np_cov(data.numpy()), rtol=1e-12, atol=1e-14)
    copy.update(data)  # the copy is independent of the original
    assert acc.count == 7


def test_unwrap_names_layers_as_in_the_plain_model(tmp_path):
    model = Net()
    wrapped = nn.DataParallel(model)  # on CPU it just calls the module
    tracker = CheckLayerSat(str(tmp_path / "s"), "csv", wrapped, nosave=True)
    assert list(tracker.layers) == list(LAYERS)
    assert tracker.layers["fc1"] is model.fc1
    tracker.close()
