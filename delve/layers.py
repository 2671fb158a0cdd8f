"""Which modules the tracker watches, and the names their statistics are reported under."""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

from torch import nn

logger = logging.getLogger(__name__)

CONV_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
RECURRENT_TYPES = (nn.LSTM, nn.GRU, nn.RNN)
LINEAR_TYPES = (nn.Linear,)

Modules = Union[nn.Module, Sequence[nn.Module]]
# Wrappers whose ``.module`` is the model the user wrote; hooks go on its layers.
_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def is_trackable(module: nn.Module, include_conv: bool = True) -> bool:
    """Return whether the tracker knows how to turn this module's output into a data matrix."""
    kinds = LINEAR_TYPES + RECURRENT_TYPES + (CONV_TYPES if include_conv else ())
    return isinstance(module, kinds)


# Attributes under which wrappers keep the module they wrap (torch.compile, activation
# checkpointing, FSDP): not part of the model's own structure, so not of layer names.
_WRAPPER_ATTRIBUTES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def _trackable_children(container: nn.Module, include_conv: bool):
    for path, module in container.named_modules():
        if path and is_trackable(module, include_conv):
            yield "-".join(part for part in path.split(".") if part not in _WRAPPER_ATTRIBUTES), module


def unwrap(modules: Modules) -> Union[nn.Module, List[nn.Module]]:
    """Return the model inside ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers.

    Layers are then named by their path in the user's model (``fc1``, not
    ``module-fc1`` or ``_orig_mod-fc1``), so a run's columns are the same with and
    without the wrapper.
    Lists are unwrapped element by element; anything else is returned unchanged.
    """
    if isinstance(modules, (list, tuple)):
        return [unwrap(module) for module in modules]
    # A compiled model exists only once torch._dynamo is imported; importing it here
    # for the check would cost every user a second.
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    while isinstance(modules, _WRAPPERS) or isinstance(modules, compiled):
        modules = modules.module if isinstance(modules, _WRAPPERS) else modules._orig_mod
    return modules


def discover_layers(
    modules: Modules,
    include_conv: bool = True,
    ignore_layer_names: Iterable[str] = (),
    layer_filter: Optional[Callable[[Dict[str, nn.Module]], Dict[str, nn.Module]]] = None,
) -> OrderedDict[str, nn.Module]:
    """Find the layers to track and name them, in forward-definition order.

    Parameters
    ----------
    modules : nn.Module or sequence of nn.Module
        A model (its layers are named by their path, ``.`` replaced by ``-``), a single
        layer, or a list of layers and containers. In a list, a layer at position ``i``
        is named ``Module-{i}-{ClassName}`` and a container contributes its layers by
        their path inside it.
    include_conv : bool
        Whether convolutions are tracked.
    ignore_layer_names : iterable of str
        Names to leave out.
    layer_filter : callable, optional
        Receives the ``name -> module`` dict and returns the one to keep.

    Returns
    -------
    OrderedDict
        ``name -> module``; names are unique and every module appears once.

    """
    if isinstance(modules, (list, tuple)):
        found = _from_list(list(modules), include_conv)
    elif isinstance(modules, nn.Module):
        if is_trackable(modules, include_conv):
            found = _from_list([modules], include_conv)
        else:
            found = OrderedDict(_trackable_children(modules, include_conv))
    else:
        raise TypeError(
            f"modules must be a torch.nn.Module or a list of modules, got {type(modules).__name__}"
        )

    ignored = set(ignore_layer_names)
    unknown = ignored - set(found)
    if unknown:
        logger.warning(
            "ignore_layer_names %s match no tracked layer; tracked layers are %s",
            sorted(unknown),
            list(found),
        )
    found = OrderedDict((k, v) for k, v in found.items() if k not in ignored)
    if layer_filter is not None:
        kept = layer_filter(OrderedDict(found))
        if not isinstance(kept, dict):
            raise TypeError(f"layer_filter must return a dict name -> module, got {type(kept).__name__}")
        found = OrderedDict((k, v) for k, v in kept.items())
    return found


def _from_list(entries: list, include_conv: bool) -> OrderedDict[str, nn.Module]:
    found: OrderedDict[str, nn.Module] = OrderedDict()
    seen = set()

    def add(name: str, module: nn.Module, position: int) -> None:
        if id(module) in seen:
            return
        if name in found:  # the same path inside two containers
            name = f"Module-{position}-{name}"
        seen.add(id(module))
        found[name] = module

    for i, entry in enumerate(entries):
        if not isinstance(entry, nn.Module):
            raise TypeError(f"modules[{i}] is a {type(entry).__name__}, not a torch.nn.Module")
        if is_trackable(entry, include_conv):
            add(f"Module-{i}-{type(entry).__name__}", entry, i)
        else:
            for name, module in _trackable_children(entry, include_conv):
                add(name, module, i)
    return found
