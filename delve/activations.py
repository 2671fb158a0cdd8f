"""The rules that turn a layer's output into rows of a data matrix (SPEC §3), one per kind of layer.

A rule receives the layer, what its forward returned, the tracker's :class:`RowOptions`
and an optional ``limit`` on the samples of the batch dimension, and returns the rows as
a ``(..., features)`` tensor (every index of the leading dimensions is a row; a view
wherever the layout allows) together with the number of samples they cover. Which rule
a layer type gets is declared in :mod:`delve.layers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = [
    "CONV_METHODS",
    "INTERPOLATION_MODES",
    "TIMESERIES_METHODS",
    "RowOptions",
    "conv_data_matrix",
    "conv_rows",
    "dense_rows",
    "first_rows",
    "recurrent_rows",
]

CONV_METHODS = ("channelwise", "mean", "max", "median", "flatten")
TIMESERIES_METHODS = ("last_timestep", "timestepwise")
INTERPOLATION_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")
_LINEAR_BY_RANK = {1: "linear", 2: "bilinear", 3: "trilinear"}
Rows = Tuple[torch.Tensor, int]


@dataclass(frozen=True)
class RowOptions:
    """How outputs become rows: the tracker's ``conv_method``, ``timeseries_method`` and interpolation."""

    conv_method: str = "channelwise"
    timeseries_method: str = "last_timestep"
    interpolation_strategy: Optional[str] = None
    interpolation_downsampling: Optional[int] = 32


def dense_rows(module: nn.Module, output: Any, options: RowOptions, limit: Optional[int] = None) -> Rows:
    """Rows of a dense layer: ``(B, F)`` as is, ``(B, T, F)`` by ``timeseries_method``, more dims flattened."""
    return _dense(output, options.timeseries_method, limit)


def conv_rows(module: nn.Module, output: Any, options: RowOptions, limit: Optional[int] = None) -> Rows:
    """Rows of a convolution's feature map by ``conv_method``, after the optional interpolation."""
    return _convolution_rows(
        output,
        options.conv_method,
        options.interpolation_strategy,
        options.interpolation_downsampling,
        limit,
        len(module.kernel_size),
    )


def recurrent_rows(module: nn.Module, output: Any, options: RowOptions, limit: Optional[int] = None) -> Rows:
    """Rows of a recurrent layer's output sequence (``batch_first`` and ``PackedSequence`` honoured)."""
    sequence = output[0] if isinstance(output, tuple) else output
    return _recurrent(sequence, module.batch_first, options.timeseries_method, limit)



def _dense(x: torch.Tensor, timeseries_method: str, limit: Optional[int]):
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if limit is not None:
        x = x[:limit]
    batch = x.shape[0]
    if x.dim() == 3 and timeseries_method == "last_timestep":
        return x[:, -1], batch
    return x, batch


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


def _recurrent(out, batch_first: bool, method: str, limit: Optional[int]):
    if isinstance(out, PackedSequence):
        sequences = int(out.batch_sizes[0])  # batch_sizes lives on the host: no device sync
        if method == "timestepwise" and (limit is None or limit >= sequences):
            # The packed data already holds exactly the valid steps, one per row; row
            # order does not change a covariance.
            return out.data, sequences
        padded, lengths = pad_packed_sequence(out, batch_first=True)
        if limit is not None:
            padded, lengths = padded[:limit], lengths[:limit]
        batch, steps, _ = padded.shape
        # lengths comes back on the host; an asynchronous copy lets a GPU keep running.
        lengths = lengths.to(padded.device, non_blocking=True)
        if method == "last_timestep":
            return padded[torch.arange(batch, device=padded.device), lengths - 1], batch
        valid = torch.arange(steps, device=padded.device).unsqueeze(0) < lengths.unsqueeze(1)
        return padded[valid], batch
    if out.dim() == 2:  # unbatched input: (T, F) is one sequence
        out, batch_first = out.unsqueeze(0), True
    batch_dim = 0 if batch_first else 1
    if limit is not None:
        out = out.narrow(batch_dim, 0, min(limit, out.shape[batch_dim]))
    batch = out.shape[batch_dim]
    if method == "last_timestep":
        return out.select(1 - batch_dim, -1), batch
    # Row order does not change a covariance, so time-major output needs no transpose.
    return out, batch


def first_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """Return a float32 copy of the first ``count`` rows of a ``(..., features)`` tensor as a matrix.

    Only the leading samples are copied, never the whole output.
    """
    features = rows.shape[-1]
    if rows.dim() > 2:
        per_sample = max(1, rows[0].numel() // max(features, 1))
        rows = rows[: -(-count // per_sample)]
    return rows.reshape(-1, features)[:count].detach().to(torch.float32, copy=True)
