"""torch.distributed support: which rank writes, and the epoch-end merge of every rank's accumulators.

Under data parallelism each rank sees its own shard of every batch. The statistics a
tracker reports must describe all samples, so at each epoch end :func:`synchronize`
combines every rank's accumulators exactly, every rank computes the same statistics,
and only rank 0 writes files.

The merge is a reduction, so what it costs does not grow with the number of ranks,
and it is packed, so the number of collective calls does not grow with the number of
layers. For ``K`` accumulators of widths ``d_k`` it makes three kinds of
``all_reduce``:

1. **widths**, ``MAX`` over 3 int64 per accumulator: the width of the lowest rank
   with rows (the one every rank merges) and the largest and smallest width seen, so
   that ranks that disagree are noticed without a collective of their own;
2. **counts and sums**, ``SUM`` over ``2 + d_k`` float64 per accumulator (``n``, the
   skipped batches, ``Σx``): every rank then has the same shift ``c``, the mean of the
   union of the rows, computed in float64;
3. **moments**, ``SUM`` of ``t = Σ(x - c)`` and the lower triangle of
   ``S = Σ(x - c)(x - c)ᵀ``: each rank re-expresses its own rows' moments about ``c``
   from its count, mean ``m`` and scatter matrix ``M`` by the exact rank-two correction
   ``S = M + n δδᵀ``, ``t = n δ`` with ``δ = m - c``, and the ``d_k + d_k(d_k + 1)/2``
   values of all accumulators are packed into flat float64 buckets of at most
   ``bucket_bytes``, one ``all_reduce`` each.

The sums are the count and moments of the union of all ranks' rows about ``c``;
``S - t tᵀ/n`` re-centres them exactly on the union's mean, so ``c`` only has to be
close to it (a float64 mean is, to 1e-16 of the data's magnitude). A rank that saw
no rows for an accumulator contributes zeros.
"""

from __future__ import annotations

import logging
import weakref
from typing import Dict, Hashable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from delve.covariance import TorchCovarianceMatrix

__all__ = ["BUCKET_BYTES", "is_distributed", "is_writer", "synchronize"]

logger = logging.getLogger(__name__)

#: Default size of the flat messages the moments are summed in (DDP's gradient
#: buckets are of the same order): large enough that a call moves far more bytes than
#: its latency costs, small enough that the extra host or device memory stays modest.
BUCKET_BYTES = 32 * 2**20

# The width vote packs the lowest rank with rows above the width (widths < 2**32).
_WIDTH_BITS = 32
# Below every -width: the smallest-width slot of a rank without rows.
_NO_WIDTH = -(2**62)

# Local accumulators whose rows a width disagreement left out, already logged once.
_reported: weakref.WeakSet[TorchCovarianceMatrix] = weakref.WeakSet()


def is_distributed(group=None) -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return not is_distributed() or dist.get_rank() == 0


def synchronize(
    accumulators: Mapping[Hashable, TorchCovarianceMatrix], group=None, bucket_bytes: int = BUCKET_BYTES
) -> Dict[Hashable, TorchCovarianceMatrix]:
    """Return accumulators that each describe the rows every rank gave the accumulator of the same key.

    Without a process group of more than one rank these are the given accumulators
    themselves. With one, they are new accumulators (see the module docstring for
    how they are computed); the given ones are not modified, so an epoch that keeps
    its covariance (``reset_covariance=False``) never counts another rank's rows twice.

    Ranks whose rows for a key have different widths (``conv_method='flatten'`` on
    feature maps of different sizes) are handled like batches of another width in a
    single process: the width of the lowest rank with rows wins on every rank, the
    other ranks' rows for that key are left out, one error is logged per local
    accumulator, and the other keys are merged as usual.

    This is a collective call: every rank of ``group`` must make it at the same point,
    with the same keys in the same order. :meth:`delve.CheckLayerSat.add_saturations`
    does so on every rank.

    Parameters
    ----------
    accumulators : Mapping
        ``key -> TorchCovarianceMatrix``; accumulators that saw no rows take part too.
    group : torch.distributed.ProcessGroup, optional
        The group to combine over; ``None`` is the default group. With NCCL the
        messages are CUDA tensors on the current device, with other backends host
        tensors.
    bucket_bytes : int, default :data:`BUCKET_BYTES`
        The largest message the moments are sent in.

    Returns
    -------
    dict
        ``key -> TorchCovarianceMatrix``, in the order of ``accumulators``. A key for
        which no rank saw a batch maps to an accumulator without a dimension.

    Raises
    ------
    RuntimeError
        If a collective fails, typically because a rank did not make the call: the
        message says that every rank has to call ``add_saturations()``.

    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 8:
        raise ValueError(f"bucket_bytes must be an integer >= 8 (one float64), got {bucket_bytes!r}")
    if not is_distributed(group) or not accumulators:
        return dict(accumulators)
    keys = list(accumulators)
    accs = [accumulators[key] for key in keys]
    # NCCL moves only CUDA tensors; every other backend is given host tensors.
    nccl = dist.get_backend(group) == "nccl"
    comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    widths = _agree_on_widths(keys, accs, comm, group)
    shifts, counts, skipped = _union_means(accs, widths, comm, group)
    sums = _sum_moments(accs, widths, shifts, comm, group, bucket_bytes // 8)
    merged = {}
    for key, acc, width, shift, n, bad, total in zip(keys, accs, widths, shifts, counts, skipped, sums):
        if width is None:
            merged[key] = TorchCovarianceMatrix(device=acc.device, float64_products=acc.float64_products)
            continue
        home = acc.n.device if acc.n is not None else acc.device if acc.device is not None else comm
        state = _union_state(width, shift.to(home), n.to(home), total.to(home))
        state["skipped"] = bad.to(home)
        merged[key] = TorchCovarianceMatrix.from_state(state, device=acc.device, float64_products=acc.float64_products)
    return merged


def _union_state(width: int, shift: torch.Tensor, n: torch.Tensor, total: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Return the union's count, mean and scatter from its moments ``[t, lower triangle of S]`` about ``shift``."""
    lower = _lower(width, total.device)
    second = torch.empty(width, width, dtype=torch.float64, device=total.device)
    second.masked_scatter_(lower, total[width:])
    # The transpose's lower triangle in row-major order is the upper triangle column by
    # column: the same values, mirrored. Every entry is written by one of the two.
    second.T.masked_scatter_(lower, total[width:])
    first = total[:width]
    # M = S - t tᵀ/n re-centres exactly on the union's mean: t/n is the small distance
    # from the shift to it, so nothing cancels. u uᵀ is symmetric to the last bit.
    u = first / n.clamp_min(1.0).sqrt()
    return {"n": n, "mean": shift + first / n.clamp_min(1.0), "scatter": second.addr_(u, u, alpha=-1.0)}


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    """``dist.all_reduce``, with an error that says what a failure almost always means here."""
    try:
        dist.all_reduce(tensor, op=op, group=group)
    except RuntimeError as err:  # the backends' errors (DistBackendError, gloo timeouts) are RuntimeErrors
        raise RuntimeError(
            "exchanging the layer statistics between ranks failed. Every rank has to call add_saturations() "
            "(and compute_statistics()) at the same point of the training loop: a rank that does not, or that "
            "has stopped, leaves the others waiting until the process group's timeout. "
            f"The backend said: {err}"
        ) from err


def _agree_on_widths(
    keys: Sequence[Hashable], accs: Sequence[TorchCovarianceMatrix], comm: torch.device, group
) -> List[Optional[int]]:
    """Return, per accumulator, the width every rank merges, or ``None`` where no rank has rows."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dims = torch.tensor([acc.dim or 0 for acc in accs], dtype=torch.int64, device=comm)
    # Counts stay on their device until the one read below: a GPU is not stalled per layer.
    seen = torch.stack([_rows_or_skipped(acc, comm) for acc in accs]) > 0
    vote = torch.stack(
        [
            torch.where(seen, ((world - rank) << _WIDTH_BITS) + dims, 0),  # MAX: the lowest rank with rows
            torch.where(seen, dims, 0),
            torch.where(seen, -dims, _NO_WIDTH),
        ],
        dim=1,
    )
    _all_reduce(vote, dist.ReduceOp.MAX, group)
    widths = []
    for key, acc, (code, widest, narrowest) in zip(keys, accs, vote.tolist()):
        width = code & ((1 << _WIDTH_BITS) - 1) if code else None
        if width is not None and widest != -narrowest:
            _report_disagreement(key, acc, width, -narrowest, widest)
        widths.append(width)
    return widths


def _rows_or_skipped(acc: TorchCovarianceMatrix, comm: torch.device) -> torch.Tensor:
    if acc.n is None:
        return torch.zeros((), dtype=torch.float64, device=comm)
    return (acc.n + acc.skipped).to(comm, torch.float64)


def _report_disagreement(key: Hashable, acc: TorchCovarianceMatrix, width: int, narrowest: int, widest: int) -> None:
    """Log, once per local accumulator, that ranks' rows of another width are left out."""
    if acc in _reported:
        return
    _reported.add(acc)
    own = acc.dim if acc.dim != width and (acc.count or acc.skipped_batches) else None
    logger.error(
        "%r: ranks saw rows of %d to %d features (conv_method='flatten' on feature maps of different sizes?). "
        "Only rows of %d features, the width of the lowest rank with rows, are merged; %s. Make every rank "
        "see the same width (conv_method='channelwise', or an interpolation_strategy).",
        key,
        narrowest,
        widest,
        width,
        "the other ranks' rows are left out" if own is None else f"this rank's rows ({own} features) are left out",
    )


def _union_means(accs, widths, comm: torch.device, group):
    """Return, per accumulator, the union's mean (float64), count and skipped batches: the same on every rank."""
    sizes = [2 + (width or 0) for width in widths]
    message = torch.zeros(sum(sizes), dtype=torch.float64, device=comm)
    for acc, width, part in zip(accs, widths, message.split(sizes)):
        if width is not None and acc.dim == width:  # other ranks, and other widths, add zeros
            part[0] = acc.n
            part[1] = acc.skipped
            part[2:] = acc.mean * acc.n
    _all_reduce(message, dist.ReduceOp.SUM, group)
    shifts, counts, skipped = [], [], []
    for part in message.split(sizes):
        counts.append(part[0].clone())  # not a view: it becomes an accumulator's state
        skipped.append(part[1].to(torch.int64))
        shifts.append(part[2:] / part[0].clamp_min(1.0))
    return shifts, counts, skipped


def _lower(width: int, device: torch.device) -> torch.Tensor:
    """Return the mask of a ``width × width`` matrix's lower triangle, diagonal included."""
    return torch.ones(width, width, dtype=torch.bool, device=device).tril_()


def _local_moments(acc: TorchCovarianceMatrix, width: int, shift: torch.Tensor) -> Optional[torch.Tensor]:
    """Return this rank's ``[t, lower triangle of S]`` about ``shift``, or ``None`` for zeros."""
    if acc.dim != width:
        return None
    state = acc.state_tensors()
    n, mean, scatter = state["n"], state["mean"], state["scatter"]
    # About the shift: S = M + n δδᵀ and t = n δ, with δ = mean - shift (exact algebra).
    delta = mean - shift.to(mean.device)
    root = delta * n.sqrt()
    second = torch.addr(scatter, root, root)
    return torch.cat([delta * n, second.masked_select(_lower(width, second.device))])


def _sum_moments(accs, widths, shifts, comm: torch.device, group, bucket: int) -> List[Optional[torch.Tensor]]:
    """Return, per accumulator, the sum over ranks of ``[t, lower triangle of S]`` about its shift.

    The segments of all accumulators are laid end to end and cut into buckets of at
    most ``bucket`` values, a segment spanning as many buckets as it needs: the number
    of calls depends on the total size, not on the number of accumulators.
    """
    sizes = [0 if width is None else width + width * (width + 1) // 2 for width in widths]
    totals = [None if size == 0 else torch.empty(size, dtype=torch.float64, device=comm) for size in sizes]
    if not any(sizes):
        return totals
    message = torch.empty(min(bucket, sum(sizes)), dtype=torch.float64, device=comm)
    filled = 0
    pending = []  # (where a piece of the message goes, its offset in the message)

    def flush() -> None:
        nonlocal filled
        _all_reduce(message[:filled], dist.ReduceOp.SUM, group)
        for target, offset in pending:
            target.copy_(message[offset : offset + target.numel()])
        pending.clear()
        filled = 0

    for acc, width, shift, total in zip(accs, widths, shifts, totals):
        if total is None:
            continue
        local = _local_moments(acc, width, shift)
        start = 0
        while start < total.numel():
            take = min(total.numel() - start, message.numel() - filled)
            piece = message[filled : filled + take]
            if local is None:
                piece.zero_()
            else:
                piece.copy_(local[start : start + take])
            pending.append((total[start : start + take], filled))
            filled += take
            start += take
            if filled == message.numel():
                flush()
    if filled:
        flush()
    return totals
