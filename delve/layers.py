"""The layer types delve can track, declared once each: how an output becomes rows, and its width.

Each supported type is a :class:`LayerType`: the rule of :mod:`delve.activations` that
turns its output into rows of a data matrix, and how its feature width follows from its
definition (so that the memory guard can refuse an accumulator too big before training
starts). A subclass of a declared type is tracked by its base's declaration; a type
nobody declared is never tracked, and asking for its rows is an error, not a guess.

Add a type of your own with :func:`register_layer`::

    from delve.activations import dense_rows
    from delve.layers import register_layer

    register_layer(MyProjection, rows=dense_rows, features=lambda layer, options: layer.out_dim)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from delve.activations import RowOptions, conv_rows, dense_rows, recurrent_rows

__all__ = [
    "LayerType",
    "feature_width",
    "layer_type",
    "register_layer",
    "registered_layers",
    "to_data_matrix",
    "to_data_rows",
    "unregister_layer",
]

RowsRule = Callable[[nn.Module, Any, RowOptions, Optional[int]], Tuple[torch.Tensor, int]]
WidthRule = Callable[[nn.Module, RowOptions], Optional[int]]


@dataclass(frozen=True)
class LayerType:
    """The declaration of one trackable layer type.

    Attributes
    ----------
    cls : type
        The ``nn.Module`` subclass (its subclasses are covered too).
    rows : callable
        ``(layer, output, options, limit) -> (rows, samples)``: the output as a
        ``(..., features)`` tensor and the number of samples of the batch dimension it
        covers, keeping at most ``limit`` of them (see :mod:`delve.activations`).
    features : callable or None
        ``(layer, options) -> int or None``: the width of the rows, when the layer's
        definition tells (``None``: only its first output does).
    convolution : bool
        Left out by ``include_conv=False``.

    """

    cls: type
    rows: RowsRule
    features: Optional[WidthRule] = None
    convolution: bool = False


_REGISTRY: Dict[type, LayerType] = {}
_LOCK = threading.Lock()


def register_layer(
    cls: type, rows: RowsRule, features: Optional[WidthRule] = None, convolution: bool = False
) -> LayerType:
    """Declare a layer type delve tracks (and, through it, its subclasses).

    Parameters
    ----------
    cls : type
        A subclass of ``torch.nn.Module``.
    rows : callable
        ``(layer, output, options, limit) -> (rows, samples)``; the rules of
        :mod:`delve.activations` (``dense_rows``, ``conv_rows``, ``recurrent_rows``)
        fit most layers.
    features : callable, optional
        ``(layer, options) -> int or None``, the width of the rows when the layer's
        definition tells it.
    convolution : bool, default False
        Whether ``include_conv=False`` leaves the type out.

    Returns
    -------
    LayerType

    Raises
    ------
    TypeError
        For a class that is not a module type, or rules that are not callable.
    ValueError
        For a type declared already.

    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_layer needs a torch.nn.Module subclass, got {cls!r}")
    if not callable(rows):
        raise TypeError(f"rows must be a callable (layer, output, options, limit) -> (rows, samples), got {rows!r}")
    if features is not None and not callable(features):
        raise TypeError(f"features must be a callable (layer, options) -> int or None, got {features!r}")
    declared = LayerType(cls, rows, features, bool(convolution))
    with _LOCK:
        if cls in _REGISTRY:
            raise ValueError(f"{cls.__qualname__} is declared already; unregister_layer it first to replace it")
        _REGISTRY[cls] = declared
    return declared


def unregister_layer(cls: type) -> None:
    """Remove a declaration made with :func:`register_layer`."""
    with _LOCK:
        if _REGISTRY.pop(cls, None) is None:
            raise KeyError(f"{getattr(cls, '__qualname__', cls)!r} is not a declared layer type")


def registered_layers() -> Tuple[LayerType, ...]:
    """Return every declared layer type, in declaration order."""
    return tuple(_REGISTRY.values())


def layer_type(module: nn.Module, include_conv: bool = True) -> Optional[LayerType]:
    """Return the declaration that covers ``module`` (its own class or the nearest base), if any."""
    for cls in type(module).__mro__:
        declared = _REGISTRY.get(cls)
        if declared is not None:
            return None if declared.convolution and not include_conv else declared
    return None


def supported_names() -> str:
    """Name the declared types, for messages (``Linear, Conv1d, …``)."""
    return ", ".join(t.cls.__name__ for t in _REGISTRY.values())


def _declared(module: nn.Module) -> LayerType:
    declared = layer_type(module)
    if declared is None:
        raise TypeError(
            f"delve has no rule for {type(module).__qualname__} layers (declared: {supported_names()}); "
            "declare one with delve.layers.register_layer"
        )
    return declared


def feature_width(module: nn.Module, options: RowOptions) -> Optional[int]:
    """Return the number of columns of a layer's rows, if its definition tells (else ``None``)."""
    declared = _declared(module)
    return None if declared.features is None else declared.features(module, options)


def to_data_rows(
    module: nn.Module,
    output: Any,
    conv_method: str = "channelwise",
    timeseries_method: str = "last_timestep",
    interpolation_strategy: Optional[str] = None,
    interpolation_downsampling: Optional[int] = 32,
    limit: Optional[int] = None,
) -> Tuple[torch.Tensor, int]:
    """Return the rows of a layer's data matrix (SPEC §3) as a ``(..., features)`` tensor, without copying.

    The leading dimensions are not flattened: the channelwise rows of a ``(B, C, H, W)``
    map are ``(B, H, W, C)``, a view, where a flat matrix would cost a transposing copy
    of the whole output. :meth:`delve.TorchCovarianceMatrix.update_rows` takes such a
    tensor.

    Parameters
    ----------
    module : nn.Module
        The layer that produced ``output``; its declared type picks the rule.
    output : torch.Tensor or tuple
        What the layer's forward returned.
    conv_method, timeseries_method, interpolation_strategy, interpolation_downsampling
        As for :class:`delve.CheckLayerSat`.
    limit : int, optional
        Keep at most this many samples of the batch dimension (``max_samples``).

    Returns
    -------
    (torch.Tensor, int)
        The rows (at least two dimensions) and the number of samples of the batch
        dimension they cover.

    Raises
    ------
    TypeError
        For a layer type no declaration covers.

    """
    options = RowOptions(conv_method, timeseries_method, interpolation_strategy, interpolation_downsampling)
    return _declared(module).rows(module, output, options, limit)


def to_data_matrix(module: nn.Module, output: Any, *args: Any, **kwargs: Any) -> Tuple[torch.Tensor, int]:
    """Return a layer's output as a ``(rows, features)`` matrix; arguments as :func:`to_data_rows`."""
    rows, batch = to_data_rows(module, output, *args, **kwargs)
    return rows.reshape(-1, rows.shape[-1]), batch


# --------------------------------------------------------------- the built-in declarations
def _linear_width(layer: nn.Linear, options: RowOptions) -> int:
    return layer.out_features


def _conv_width(layer: nn.Module, options: RowOptions) -> Optional[int]:
    # Flattened maps are as wide as the map is large, which only the first output tells.
    return None if options.conv_method == "flatten" else layer.out_channels


def _recurrent_width(layer: nn.Module, options: RowOptions) -> int:
    size = layer.proj_size if getattr(layer, "proj_size", 0) else layer.hidden_size
    return size * (2 if layer.bidirectional else 1)


register_layer(nn.Linear, dense_rows, _linear_width)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_conv, conv_rows, _conv_width, convolution=True)
for _recurrent in (nn.LSTM, nn.GRU, nn.RNN):
    register_layer(_recurrent, recurrent_rows, _recurrent_width)
