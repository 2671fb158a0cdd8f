"""torch.distributed support: which rank writes, and merging every rank's accumulators.

Under data parallelism each rank sees its own shard of every batch. The statistics
a tracker reports must describe all samples, so at each epoch end every rank's
accumulators are combined exactly (see :meth:`delve.TorchCovarianceMatrix.synced`)
and every rank computes the same statistics; only rank 0 writes files.
"""

from __future__ import annotations

from typing import Dict, Hashable

import torch.distributed as dist

from delve.covariance import TorchCovarianceMatrix

__all__ = ["is_distributed", "is_writer", "synchronize"]


def is_distributed(group=None) -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return not is_distributed() or dist.get_rank() == 0


def synchronize(tracker, group=None) -> Dict[Hashable, TorchCovarianceMatrix]:
    """Return the tracker's accumulators, each describing the samples of all ranks.

    Without a process group of more than one rank these are the tracker's own
    accumulators. With one, they are new accumulators from
    :meth:`~delve.TorchCovarianceMatrix.synced`: the local ones are not modified,
    so an epoch that keeps its covariance (``reset_covariance=False``) never counts
    another rank's samples twice.

    This is a collective call: every rank must make it at the same point, which
    :meth:`delve.CheckLayerSat.add_saturations` does on every rank.

    Parameters
    ----------
    tracker : delve.CheckLayerSat
        The tracker whose ``(layer, mode)`` accumulators are combined, in its
        tracking order (identical on every rank of the same model).
    group : torch.distributed.ProcessGroup, optional
        The group to combine over; ``None`` is the default group.

    Returns
    -------
    dict
        ``(layer, mode) -> TorchCovarianceMatrix``.

    """
    local = {key: state.cov for key, state in tracker._state.items()}
    if not is_distributed(group):
        return local
    return {key: cov.synced(group) for key, cov in local.items()}
