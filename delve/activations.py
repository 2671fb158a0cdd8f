"""Turn a layer's output into a data matrix: one row per sample, one column per feature."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from delve.layers import CONV_TYPES, RECURRENT_TYPES

CONV_METHODS = ("channelwise", "mean", "max", "median", "flatten")
TIMESERIES_METHODS = ("last_timestep", "timestepwise")
INTERPOLATION_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")
_LINEAR_BY_RANK = {1: "linear", 2: "bilinear", 3: "trilinear"}


def to_data_matrix(
    module: nn.Module,
    output,
    conv_method: str = "channelwise",
    timeseries_method: str = "last_timestep",
    interpolation_strategy: Optional[str] = None,
    interpolation_downsampling: int = 32,
    limit: Optional[int] = None,
) -> Tuple[torch.Tensor, int]:
    """Reshape a layer output into a ``(rows, features)`` matrix (SPEC §3).

    Parameters
    ----------
    module : nn.Module
        The layer that produced ``output``; its type picks the rule.
    output : torch.Tensor or tuple
        What the layer's forward returned.
    conv_method, timeseries_method, interpolation_strategy, interpolation_downsampling
        As for :class:`delve.CheckLayerSat`.
    limit : int, optional
        Keep at most this many samples of the batch dimension (``max_samples``).

    Returns
    -------
    (torch.Tensor, int)
        The data matrix (a view wherever the layout allows) and the number of samples
        of the batch dimension it covers.

    """
    rows, batch = to_data_rows(
        module, output, conv_method, timeseries_method, interpolation_strategy, interpolation_downsampling, limit
    )
    return rows.reshape(-1, rows.shape[-1]), batch


def to_data_rows(
    module: nn.Module,
    output,
    conv_method: str = "channelwise",
    timeseries_method: str = "last_timestep",
    interpolation_strategy: Optional[str] = None,
    interpolation_downsampling: int = 32,
    limit: Optional[int] = None,
) -> Tuple[torch.Tensor, int]:
    """Return the rows of a layer's data matrix as a ``(..., features)`` tensor, without copying.

    The same rows as :func:`to_data_matrix`, but the leading dimensions are not
    flattened: the channelwise rows of a ``(B, C, H, W)`` map are ``(B, H, W, C)``,
    a view, where a flat matrix would cost a transposing copy of the whole output.
    :meth:`delve.TorchCovarianceMatrix.update_rows` takes such a tensor.

    Parameters
    ----------
    module, output, conv_method, timeseries_method, interpolation_strategy, interpolation_downsampling, limit
        As for :func:`to_data_matrix`.

    Returns
    -------
    (torch.Tensor, int)
        The rows (at least two dimensions) and the number of samples of the batch
        dimension they cover.

    """
    if isinstance(module, RECURRENT_TYPES):
        sequence = output[0] if isinstance(output, tuple) else output
        return _recurrent(sequence, module.batch_first, timeseries_method, limit)
    if isinstance(module, CONV_TYPES):
        return _convolution_rows(
            output, conv_method, interpolation_strategy, interpolation_downsampling, limit, len(module.kernel_size)
        )
    return _dense(output, timeseries_method, limit)


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
    """Apply the convolution rule of :func:`to_data_matrix` to a feature map, without a layer.

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
