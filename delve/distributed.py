"""torch.distributed support: which rank writes, and merging every rank's accumulators."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return not is_distributed() or dist.get_rank() == 0


def synchronize(tracker) -> None:
    """Make every rank's accumulators describe the samples of all ranks (no-op without a group)."""
    if not is_distributed():
        return
