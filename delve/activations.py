"""The rules that turn a layer's output into rows of a data matrix (SPEC §3), one per kind of layer.

A rule receives the layer, what its forward returned, the tracker's :class:`RowOptions`,
an optional ``limit`` on the samples of the batch dimension and an optional row ``mask``,
and returns :class:`Rows`: a ``(..., features)`` tensor (every index of the leading
dimensions is a row; a view wherever the layout allows), the number of samples it
covers and, under a mask, which of its rows are real. Which rule a layer type gets is
declared in :mod:`delve.layers`.

The row mask
    A ``(batch, time)`` boolean tensor saying which positions of a batch of sequences are
    real (a tokenizer's ``attention_mask``). It applies to every sequence output whose
    leading dimensions are ``(batch, time)`` in the layer's layout (``(time, batch)`` for
    time-major recurrent and attention layers); other outputs ignore it. Under
    ``timestepwise`` the real positions are the rows; under ``last_timestep`` each
    sequence's row is its last real position, wherever the padding is (left or right),
    and a sequence without any real position gives none. Padded rows are not removed from
    the tensor, which would need the host to learn their number from the device: they
    are marked in :attr:`Rows.valid` and the accumulator gives them no weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = [
    "CONV_METHODS",
    "INTERPOLATION_MODES",
    "TIMESERIES_METHODS",
    "RowOptions",
    "Rows",
    "attention_rows",
    "conv_data_matrix",
    "conv_rows",
    "dense_rows",
    "draw_rows",
    "first_rows",
    "recurrent_rows",
]

CONV_METHODS = ("channelwise", "mean", "max", "median", "flatten")
TIMESERIES_METHODS = ("last_timestep", "timestepwise")
INTERPOLATION_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")
_LINEAR_BY_RANK = {1: "linear", 2: "bilinear", 3: "trilinear"}
#: A ``(batch, time)`` boolean tensor of the real positions, or ``None``.
Mask = Optional[torch.Tensor]


class Rows(NamedTuple):
    """What a rule makes of one output.

    Parameters
    ----------
    data : torch.Tensor
        ``(..., features)``: every index of the leading dimensions is a row.
    samples : int
        The number of samples of the batch dimension the rows cover (``max_samples``
        counts these).
    valid : torch.Tensor or None
        Boolean, of shape ``data.shape[:-1]``: which rows are real under a row mask
        (``None``: all of them). It stays on the device.

    """

    data: torch.Tensor
    samples: int
    valid: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class RowOptions:
    """How outputs become rows: the tracker's ``conv_method``, ``timeseries_method`` and interpolation."""

    conv_method: str = "channelwise"
    timeseries_method: str = "last_timestep"
    interpolation_strategy: Optional[str] = None
    interpolation_downsampling: Optional[int] = 32


def dense_rows(
    module: nn.Module, output: Any, options: RowOptions, limit: Optional[int] = None, mask: Mask = None
) -> Rows:
    """Rows of a dense layer: ``(B, F)`` as is, ``(B, T, F)`` by ``timeseries_method``, more dims flattened.

    A row mask applies to outputs whose leading dimensions are ``(B, T)``.
    """
    return _dense(output, options.timeseries_method, limit, mask)


def conv_rows(
    module: nn.Module, output: Any, options: RowOptions, limit: Optional[int] = None, mask: Mask = None
) -> Rows:
    """Rows of a convolution's feature map by ``conv_method``, after the optional interpolation (no row mask)."""
    rows, batch = _convolution_rows(
        output,
        options.conv_method,
        options.interpolation_strategy,
        options.interpolation_downsampling,
        limit,
        len(module.kernel_size),
    )
    return Rows(rows, batch)


def recurrent_rows(
    module: nn.Module, output: Any, options: RowOptions, limit: Optional[int] = None, mask: Mask = None
) -> Rows:
    """Rows of a recurrent layer's output sequence (``batch_first`` and ``PackedSequence`` honoured).

    A ``PackedSequence`` holds its valid steps only and needs no row mask.
    """
    sequence = output[0] if isinstance(output, tuple) else output
    if isinstance(sequence, PackedSequence):
        return _packed(sequence, options.timeseries_method, limit)
    return _sequence(sequence, module.batch_first, options.timeseries_method, limit, mask)


def attention_rows(
    module: nn.Module, output: Any, options: RowOptions, limit: Optional[int] = None, mask: Mask = None
) -> Rows:
    """Rows of an attention layer's output, the first element of its result, by ``timeseries_method``.

    The output is ``(B, T, E)`` with ``batch_first``, else ``(T, B, E)``; a nested tensor
    (what ``nn.TransformerEncoder`` passes its layers in evaluation when it drops the
    padding itself) holds the real positions only.
    """
    attended = output[0] if isinstance(output, tuple) else output
    return _sequence(attended, getattr(module, "batch_first", True), options.timeseries_method, limit, mask)


def _dense(x: torch.Tensor, timeseries_method: str, limit: Optional[int], mask: Mask) -> Rows:
    if x.is_nested or x.dim() == 3:
        return _sequence(x, True, timeseries_method, limit, mask)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    applies = mask is not None and x.dim() > 3 and tuple(x.shape[:2]) == tuple(mask.shape)
    if limit is not None:
        x = x[:limit]
    if not applies:
        return Rows(x, x.shape[0])
    # Outputs of more dimensions are flattened whatever the method: every real position's rows count.
    valid = mask[: x.shape[0]].to(x.device, torch.bool)
    valid = valid.view(*valid.shape, *([1] * (x.dim() - 3))).expand(x.shape[:-1])
    return Rows(x, x.shape[0], valid)


def _sequence(
    x: torch.Tensor, batch_first: bool, method: str, limit: Optional[int], mask: Mask
) -> Rows:
    """Rows of a ``(B, T, F)`` (``batch_first``) or ``(T, B, F)`` sequence output, under an optional row mask."""
    if x.is_nested:
        return _nested(x, method, limit)
    if x.dim() == 2:  # unbatched input: (T, F) is one sequence
        x, batch_first = x.unsqueeze(0), True
    batch_dim = 0 if batch_first else 1
    lead = tuple(x.shape[:2]) if batch_first else (x.shape[1], x.shape[0])
    if mask is not None and tuple(mask.shape) != lead:
        mask = None  # another shape: the mask is about other sequences
    if limit is not None:
        x = x.narrow(batch_dim, 0, min(limit, x.shape[batch_dim]))
    batch = x.shape[batch_dim]
    if mask is None:
        if method == "last_timestep":
            return Rows(x.select(1 - batch_dim, -1), batch)
        # Row order does not change a covariance, so time-major output needs no transpose.
        return Rows(x, batch)
    mask = mask[:batch].to(x.device, torch.bool)
    if method == "timestepwise":
        return Rows(x, batch, mask if batch_first else mask.T)
    # The last real position of each sequence, found on the device: -1 where there is none.
    steps = torch.arange(mask.shape[1], device=x.device)
    last = torch.where(mask, steps, -1).amax(1)
    samples = torch.arange(batch, device=x.device)
    position = last.clamp_min(0)
    rows = x[samples, position] if batch_first else x[position, samples]
    return Rows(rows, batch, last >= 0)


def _nested(x: torch.Tensor, method: str, limit: Optional[int]) -> Rows:
    # A nested tensor's sizes live on the host: its sequences come apart without a sync.
    sequences = x.unbind()[:limit]
    steps = torch.cat(sequences)
    if method == "last_timestep":
        ends = [s[-1:] for s in sequences if s.shape[0]]
        return Rows(torch.cat(ends) if ends else steps[:0], len(sequences))
    return Rows(steps, len(sequences))


def conv_data_matrix(
    x: torch.Tensor,
    method: str,
    strategy: Optional[str],
    size: int,
    limit: Optional[int],
    spatial_rank: Optional[int] = None,
) -> Tuple[torch.Tensor, int]:
    """Apply the convolution rule to a feature map without a layer, as a ``(rows, features)`` matrix.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, *spatial)``, or ``(C, *spatial)`` for one sample when ``spatial_rank`` says so.
    method : str
        One of ``CONV_METHODS``.
    strategy : str or None
        Interpolation mode for maps larger than ``size``, or ``None`` to keep them.
    size : int
        Target side length of the interpolation.
    limit : int or None
        Keep at most this many samples of the batch dimension.
    spatial_rank : int, optional
        The number of spatial dimensions (2 for a Conv2d); guessed from ``x`` if omitted.

    Returns
    -------
    (torch.Tensor, int)
        The ``(rows, features)`` matrix and the number of samples it covers.

    """
    rows, batch = _convolution_rows(x, method, strategy, size, limit, spatial_rank)
    return rows.reshape(-1, rows.shape[-1]), batch


def _convolution_rows(
    x: torch.Tensor,
    method: str,
    strategy: Optional[str],
    size: int,
    limit: Optional[int],
    spatial_rank: Optional[int] = None,
):
    # The layer's own rank tells an unbatched (C, *spatial) output from a batch: a
    # Conv2d output of dim 3 is one image, not a batch of C maps. Without it, a batch
    # is assumed unless there is no spatial dimension at all.
    if spatial_rank is None:
        spatial_rank = max(x.dim() - 2, 1)
    if x.dim() == spatial_rank + 1:
        x = x.unsqueeze(0)
    if limit is not None:
        x = x[:limit]
    batch, channels = x.shape[0], x.shape[1]
    if strategy is not None and any(s > size for s in x.shape[2:]):
        mode = strategy
        if mode in ("linear", "bilinear", "trilinear") or (mode == "bicubic" and spatial_rank != 2):
            mode = _LINEAR_BY_RANK.get(spatial_rank, "nearest")
        x = F.interpolate(x, size=(size,) * spatial_rank, mode=mode)
    if method == "channelwise":
        # (B, C, *S) -> rows (B, *S, C): always a view; flat only if channels-last in memory.
        return x.movedim(1, -1), batch
    if method == "flatten":
        return x.reshape(batch, -1), batch
    pooled = x.reshape(batch, channels, -1)
    if method == "mean":
        return pooled.mean(-1), batch
    if method == "max":
        return pooled.amax(-1), batch
    if method == "median":
        return pooled.median(-1).values, batch
    raise ValueError(f"unknown conv_method {method!r}; valid methods are {list(CONV_METHODS)}")


def _packed(out: PackedSequence, method: str, limit: Optional[int]) -> Rows:
    sequences = int(out.batch_sizes[0])  # batch_sizes lives on the host: no device sync
    if method == "timestepwise" and (limit is None or limit >= sequences):
        # The packed data already holds exactly the valid steps, one per row; row
        # order does not change a covariance.
        return Rows(out.data, sequences)
    padded, lengths = pad_packed_sequence(out, batch_first=True)
    if limit is not None:
        padded, lengths = padded[:limit], lengths[:limit]
    batch, steps, _ = padded.shape
    # lengths comes back on the host; an asynchronous copy lets a GPU keep running.
    lengths = lengths.to(padded.device, non_blocking=True)
    if method == "last_timestep":
        return Rows(padded[torch.arange(batch, device=padded.device), lengths - 1], batch)
    valid = torch.arange(steps, device=padded.device).unsqueeze(0) < lengths.unsqueeze(1)
    return Rows(padded, batch, valid)


def first_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """Return a float32 copy of the first ``count`` rows of a ``(..., features)`` tensor as a matrix.

    Only the leading samples are copied, never the whole output.
    """
    features = rows.shape[-1]
    if rows.dim() > 2:
        per_sample = max(1, rows[0].numel() // max(features, 1))
        rows = rows[: -(-count // per_sample)]
    return rows.reshape(-1, features)[:count].detach().to(torch.float32, copy=True)


def draw_rows(rows: Rows, count: int, generator: torch.Generator) -> Rows:
    """Keep ``count`` rows drawn uniformly without replacement, on the rows' device, without waiting for it.

    Every row gets a random key and the ``count`` smallest keys win: a uniform draw of
    a ``count``-subset. Under a row mask the padding's keys are pushed to infinity, so
    the draw is among the real rows; when fewer real rows than ``count`` exist, all of
    them are drawn, and the padding drawn with them stays marked in :attr:`Rows.valid`.
    Nothing is counted on the host, so a GPU never waits.

    Parameters
    ----------
    rows : Rows
        What a rule made of one output; ``rows.data`` is ``(..., features)``.
    count : int
        The most rows to keep (``rows_per_batch``). Rows that are at most this many
        are returned as they are, without a copy.
    generator : torch.Generator
        On ``rows.data``'s device (or on the CPU, whose keys are then copied there):
        the draw never touches the global random stream.

    Returns
    -------
    Rows
        ``data`` of shape ``(count, features)``, the same ``samples``, and the drawn
        rows' ``valid`` flags under a mask.

    """
    data = rows.data
    leading = tuple(data.shape[:-1])
    if math.prod(leading) <= count:
        return rows
    # float64 keys: float32 has 2**24 values, and ties at the boundary would favour low indices.
    key_type = torch.float32 if data.device.type == "mps" else torch.float64
    keys = torch.rand(math.prod(leading), generator=generator, device=generator.device, dtype=key_type)
    keys = keys.to(data.device, non_blocking=True)
    if rows.valid is not None:
        keys = keys.masked_fill(~rows.valid.reshape(-1), math.inf)
    drawn = torch.topk(keys, count, largest=False, sorted=False).indices
    # Index the leading dimensions directly: flattening a view such as a channels-first
    # map's (B, H, W, C) rows would copy the whole output.
    index = _unravel(drawn, leading)
    valid = None if rows.valid is None else rows.valid[index]
    return Rows(data[index], rows.samples, valid)


def _unravel(flat: torch.Tensor, shape: Tuple[int, ...]) -> Tuple[torch.Tensor, ...]:
    """Return the index along each dimension of ``shape`` of flat (row-major) positions (torch < 2.2 has no unravel)."""
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat = flat // size
    return tuple(reversed(index))
