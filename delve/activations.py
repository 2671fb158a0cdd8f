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
    if isinstance(module, RECURRENT_TYPES):
        sequence = output[0] if isinstance(output, tuple) else output
        return _recurrent(sequence, module.batch_first, timeseries_method, limit)
    if isinstance(module, CONV_TYPES):
        return _convolution(
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
    return x.reshape(-1, x.shape[-1]), batch


def _convolution(
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
        # (B, C, *S) -> (B·S, C): a view when the tensor is channels-last in memory.
        return x.movedim(1, -1).reshape(-1, channels), batch
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
        padded, lengths = pad_packed_sequence(out, batch_first=True)
        if limit is not None:
            padded, lengths = padded[:limit], lengths[:limit]
        batch, steps, _ = padded.shape
        lengths = lengths.to(padded.device)
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
    return out.reshape(-1, out.shape[-1]), batch
