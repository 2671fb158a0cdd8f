"""torch.distributed support: which rank writes, and merging every rank's accumulators.

Under data parallelism each rank sees its own shard of every batch. The statistics
a tracker reports must describe all samples, so at each epoch end every rank's
accumulators are combined exactly and every rank computes the same statistics; only
rank 0 writes files.
"""

from __future__ import annotations

from typing import Dict, Hashable, Mapping, Optional

import torch
import torch.distributed as dist

from delve.covariance import TorchCovarianceMatrix

__all__ = ["is_distributed", "is_writer", "synced", "synchronize"]


def is_distributed(group=None) -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return not is_distributed() or dist.get_rank() == 0


def _copy(acc: TorchCovarianceMatrix) -> TorchCovarianceMatrix:
    return TorchCovarianceMatrix(device=acc.device, float64_products=acc.float64_products).merge(acc)


def synced(acc: TorchCovarianceMatrix, group=None) -> TorchCovarianceMatrix:
    """Return a new accumulator holding the rows that every rank of a process group has seen.

    Every rank's count, mean and scatter are gathered and merged exactly, in rank
    order, with :meth:`~delve.TorchCovarianceMatrix.merge`, so each rank gets the same
    result: the statistics of the union of all ranks' rows. ``acc`` is left untouched,
    so syncing twice never counts a row twice.

    This is a collective call: every rank of ``group`` must make it, in the same order,
    including ranks whose accumulator has seen no data (they contribute nothing).
    Without an initialised process group of more than one rank it returns a copy.

    Raises
    ------
    ValueError
        If ranks disagree on the feature dimension (all ranks raise together).

    """
    if not is_distributed(group):
        return _copy(acc)
    world = dist.get_world_size(group)
    # NCCL moves only CUDA tensors; every other backend is given host tensors.
    nccl = dist.get_backend(group) == "nccl"
    comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    local_dim = torch.tensor([-1 if acc.dim is None else acc.dim], dtype=torch.int64, device=comm)
    dims = [torch.empty_like(local_dim) for _ in range(world)]
    dist.all_gather(dims, local_dim, group=group)
    dims = [int(d.item()) for d in dims]
    known = sorted({d for d in dims if d >= 0})
    merged = TorchCovarianceMatrix(device=acc.device, float64_products=acc.float64_products)
    if not known:
        return merged
    if len(known) > 1:
        raise ValueError(f"ranks disagree on the feature dimension: {dims} (rank order, -1 = no data)")
    dim = known[0]
    payload = torch.zeros(2 + dim + dim * dim, dtype=torch.float64, device=comm)
    state = acc.state_tensors()
    if state["mean"] is not None:
        payload[0] = state["n"].to(comm)
        payload[1] = state["skipped"].to(comm, torch.float64)
        payload[2 : 2 + dim] = state["mean"].to(comm)
        payload[2 + dim :] = state["scatter"].to(comm).reshape(-1)
    gathered = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(gathered, payload, group=group)
    target = state["mean"].device if state["mean"] is not None else (acc.device or comm)
    for rank, message in enumerate(gathered):
        if dims[rank] < 0:
            continue
        message = message.to(target)
        part = {
            "n": message[0],
            "skipped": message[1].to(torch.int64),
            "mean": message[2 : 2 + dim],
            "scatter": message[2 + dim :].reshape(dim, dim),
        }
        merged.merge(TorchCovarianceMatrix.from_state(part))
    return merged


def synchronize(
    accumulators: Mapping[Hashable, TorchCovarianceMatrix], group=None
) -> Dict[Hashable, Optional[TorchCovarianceMatrix]]:
    """Return accumulators that each describe the rows of all ranks.

    Without a process group of more than one rank these are the given accumulators
    themselves. With one, they are new accumulators: the local ones are not modified,
    so an epoch that keeps its covariance (``reset_covariance=False``) never counts
    another rank's rows twice.

    This is a collective call: every rank must make it at the same point with the same
    keys in the same order, which :meth:`delve.CheckLayerSat.add_saturations` does.

    Parameters
    ----------
    accumulators : mapping
        ``key -> accumulator``, in an order identical on every rank.
    group : torch.distributed.ProcessGroup, optional
        The group to combine over; ``None`` is the default group.

    Returns
    -------
    dict
        ``key -> merged accumulator``.

    """
    if not is_distributed(group):
        return dict(accumulators)
    return {key: synced(acc, group) for key, acc in accumulators.items()}
