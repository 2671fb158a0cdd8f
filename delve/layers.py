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

A type may also be declared by its qualified name (``"package.module.ClassName"``): the
declaration then covers that class, matched by name, without importing its package. That
is how Hugging Face's ``transformers.pytorch_utils.Conv1D`` (the projections of GPT-2 and
its family) is declared: ``import delve`` never imports ``transformers``, and a model that
holds a ``Conv1D`` has imported it already.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from delve.activations import RowOptions, Rows, attention_rows, conv_rows, dense_rows, recurrent_rows

__all__ = [
    "LayerType",
    "claimed_submodule",
    "feature_width",
    "layer_rows",
    "layer_type",
    "register_layer",
    "registered_layers",
    "to_data_matrix",
    "to_data_rows",
    "unregister_layer",
]

RowsRule = Callable[..., Rows]
WidthRule = Callable[[nn.Module, RowOptions], Optional[int]]
CallMask = Callable[[nn.Module, tuple, Dict[str, Any]], Optional[torch.Tensor]]
# A qualified class name: dotted identifiers, at least one dot.
_QUALIFIED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


@dataclass(frozen=True)
class LayerType:
    """The declaration of one trackable layer type.

    Attributes
    ----------
    cls : type or str
        The ``nn.Module`` subclass (its subclasses are covered too), or its qualified
        name (``"package.module.ClassName"``), matched against a module's class and its
        bases without importing anything.
    rows : callable
        ``(layer, output, options, limit=None, mask=None) -> Rows``: the output as a
        ``(..., features)`` tensor, the number of samples of the batch dimension it
        covers (at most ``limit``) and, under a row ``mask``, which rows are real (see
        :mod:`delve.activations`). A plain ``(rows, samples)`` pair is accepted too.
    features : callable or None
        ``(layer, options) -> int or None``: the width of the rows, when the layer's
        definition tells (``None``: only its first output does).
    convolution : bool
        Left out by ``include_conv=False``.
    named_after : str or None
        The attribute of a submodule whose path names the layer; that submodule is then
        not tracked on its own (``nn.MultiheadAttention`` is reported as its ``out_proj``,
        whose weights it uses without calling it).
    call_mask : callable or None
        ``(layer, args, kwargs) -> bool tensor or None``: the real positions of a call,
        ``(batch, time)``, read from the layer's own arguments (the key padding mask of a
        self-attention); combined with the tracker's row mask.

    """

    cls: Union[type, str]
    rows: RowsRule
    features: Optional[WidthRule] = None
    convolution: bool = False
    named_after: Optional[str] = None
    call_mask: Optional[CallMask] = None

    @property
    def name(self) -> str:
        """The class name, for messages."""
        return self.cls.rsplit(".", 1)[-1] if isinstance(self.cls, str) else self.cls.__name__


_REGISTRY: Dict[Union[type, str], LayerType] = {}
_LOCK = threading.Lock()


def _check_declared_class(cls: Any) -> None:
    if isinstance(cls, str):
        if not _QUALIFIED.fullmatch(cls):
            raise ValueError(
                f"register_layer needs a module class or its qualified name such as "
                f"'transformers.pytorch_utils.Conv1D', got {cls!r}"
            )
    elif not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_layer needs a torch.nn.Module subclass or its qualified name, got {cls!r}")


def register_layer(
    cls: Union[type, str],
    rows: RowsRule,
    features: Optional[WidthRule] = None,
    convolution: bool = False,
    named_after: Optional[str] = None,
    call_mask: Optional[CallMask] = None,
) -> LayerType:
    """Declare a layer type delve tracks (and, through it, its subclasses).

    Parameters
    ----------
    cls : type or str
        A subclass of ``torch.nn.Module``, or its qualified name
        (``"package.module.ClassName"``, as ``f"{cls.__module__}.{cls.__qualname__}"``
        gives), which declares it without importing its package.
    rows : callable
        ``(layer, output, options, limit=None, mask=None) -> Rows``; the rules of
        :mod:`delve.activations` (``dense_rows``, ``conv_rows``, ``recurrent_rows``,
        ``attention_rows``) fit most layers. ``mask`` is passed only while a row mask
        applies, so a rule that ignores masks may leave it out.
    features : callable, optional
        ``(layer, options) -> int or None``, the width of the rows when the layer's
        definition tells it.
    convolution : bool, default False
        Whether ``include_conv=False`` leaves the type out.
    named_after : str, optional
        A submodule attribute whose path names the layer, and which is not tracked on
        its own.
    call_mask : callable, optional
        ``(layer, args, kwargs) -> bool tensor or None``, the real ``(batch, time)``
        positions of a call according to its own arguments.

    Returns
    -------
    LayerType

    Raises
    ------
    TypeError
        For a class that is not a module type, or rules that are not callable.
    ValueError
        For a malformed qualified name, or a type declared already.

    """
    _check_declared_class(cls)
    if not callable(rows):
        raise TypeError(f"rows must be a callable (layer, output, options, limit, mask) -> Rows, got {rows!r}")
    for label, rule in (("features", features), ("call_mask", call_mask)):
        if rule is not None and not callable(rule):
            raise TypeError(f"{label} must be a callable or None, got {rule!r}")
    if named_after is not None and not (isinstance(named_after, str) and named_after.isidentifier()):
        raise TypeError(f"named_after must be the attribute name of a submodule, got {named_after!r}")
    declared = LayerType(cls, rows, features, bool(convolution), named_after, call_mask)
    with _LOCK:
        if cls in _REGISTRY:
            raise ValueError(f"{declared.name} is declared already; unregister_layer it first to replace it")
        _REGISTRY[cls] = declared
    return declared


def unregister_layer(cls: Union[type, str]) -> None:
    """Remove a declaration made with :func:`register_layer` (by the class or the name it was declared with)."""
    with _LOCK:
        if _REGISTRY.pop(cls, None) is None:
            raise KeyError(f"{getattr(cls, '__qualname__', cls)!r} is not a declared layer type")


def registered_layers() -> Tuple[LayerType, ...]:
    """Return every declared layer type, in declaration order."""
    return tuple(_REGISTRY.values())


def layer_type(module: nn.Module, include_conv: bool = True) -> Optional[LayerType]:
    """Return the declaration that covers ``module`` (its own class or the nearest base), if any."""
    for cls in type(module).__mro__:
        declared = _REGISTRY.get(cls) or _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if declared is not None:
            return None if declared.convolution and not include_conv else declared
    return None


def claimed_submodule(module: nn.Module) -> Optional[nn.Module]:
    """Return the submodule a tracked layer is named after (and which is not tracked on its own), if any."""
    declared = layer_type(module)
    if declared is None or declared.named_after is None:
        return None
    claimed = getattr(module, declared.named_after, None)
    return claimed if isinstance(claimed, nn.Module) else None


def supported_names() -> str:
    """Name the declared types, for messages (``Linear, Conv1d, …``)."""
    return ", ".join(t.name for t in _REGISTRY.values())


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


def layer_rows(
    declared: LayerType,
    module: nn.Module,
    output: Any,
    options: RowOptions,
    limit: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
) -> Rows:
    """Apply a declaration's rows rule, as :class:`~delve.activations.Rows` whatever the rule returned."""
    if mask is None:
        return Rows(*declared.rows(module, output, options, limit))
    return Rows(*declared.rows(module, output, options, limit, mask))


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
    tensor. No row mask applies here (see :func:`layer_rows` for that).

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
    rows = layer_rows(_declared(module), module, output, options, limit)
    if rows.valid is not None:  # a packed sequence cut by `limit`: its padding goes here
        return rows.data[rows.valid], rows.samples
    return rows.data, rows.samples


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


def _transposed_linear_width(layer: nn.Module, options: RowOptions) -> int:
    # transformers' Conv1D keeps its weight as (in, out): a Linear with the weight transposed.
    return layer.weight.shape[1]


def _attention_width(layer: nn.MultiheadAttention, options: RowOptions) -> int:
    return layer.embed_dim


def _self_attention_mask(layer: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """Return the real query positions of a self-attention call: those its key padding mask keeps.

    Only for self-attention (the query is the key): otherwise the mask is about the keys,
    not the positions of the output. A boolean mask marks padding with True; a float
    mask, added to the attention scores, with -inf.
    """
    query = args[0] if args else kwargs.get("query")
    key = args[1] if len(args) > 1 else kwargs.get("key")
    padding = args[3] if len(args) > 3 else kwargs.get("key_padding_mask")
    if padding is None or query is not key or not torch.is_tensor(padding):
        return None
    padding = padding if padding.dim() == 2 else padding.unsqueeze(0)  # an unbatched call
    return ~padding if padding.dtype == torch.bool else ~torch.isneginf(padding)


register_layer(nn.Linear, dense_rows, _linear_width)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_conv, conv_rows, _conv_width, convolution=True)
for _recurrent in (nn.LSTM, nn.GRU, nn.RNN):
    register_layer(_recurrent, recurrent_rows, _recurrent_width)
register_layer(
    nn.MultiheadAttention, attention_rows, _attention_width, named_after="out_proj", call_mask=_self_attention_mask
)
register_layer("transformers.pytorch_utils.Conv1D", dense_rows, _transposed_linear_width)
