"""Which modules of a model the tracker watches, and the names their statistics are reported under."""

from __future__ import annotations

import logging
import sys
from collections import Counter, OrderedDict
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from torch import nn

from delve.layers import claimed_submodule, layer_type, supported_names

logger = logging.getLogger(__name__)

__all__ = ["discover_layers", "untracked_modules", "unwrap"]

Modules = Union[nn.Module, Sequence[nn.Module]]
LayerFilter = Callable[[Dict[str, nn.Module]], Dict[str, nn.Module]]
# Wrappers whose ``.module`` is the model the user wrote; hooks go on its layers.
_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)
# Attributes under which wrappers keep the module they wrap (torch.compile, activation
# checkpointing, FSDP): not part of the model's own structure, so not of layer names.
# FSDP2's fully_shard wraps nothing: it swaps the classes of the modules in place (an
# FSDPLinear is still an nn.Linear), so its layers keep their paths as they are.
_WRAPPER_ATTRIBUTES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def unwrap(modules: Modules) -> Union[nn.Module, List[nn.Module]]:
    """Return the model inside ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers.

    Layers are then named by their path in the user's model (``fc1``, not
    ``module-fc1`` or ``_orig_mod-fc1``), so a run's columns are the same with and
    without the wrapper. Lists are unwrapped element by element; anything else is
    returned unchanged.
    """
    if isinstance(modules, (list, tuple)):
        return [unwrap(module) for module in modules]
    # A compiled model exists only once torch._dynamo is imported; importing it here
    # for the check would cost every user a second.
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    while isinstance(modules, _WRAPPERS) or isinstance(modules, compiled):
        modules = modules.module if isinstance(modules, _WRAPPERS) else modules._orig_mod
    return modules


def _own_name(module: nn.Module) -> Optional[str]:
    # The last public release named a layer by its `name` attribute, and its examples
    # set one (`lstm.name = 'lstm2'`); code written for it still does.
    name = getattr(module, "name", None)
    return name if isinstance(name, str) and name else None


def _trackable_children(container: nn.Module, include_conv: bool) -> Iterator[Tuple[str, nn.Module]]:
    claimed = set()
    for path, module in container.named_modules():
        declared = layer_type(module, include_conv)
        if not path or declared is None or id(module) in claimed:
            continue
        parts = [part for part in path.split(".") if part not in _WRAPPER_ATTRIBUTES]
        child = claimed_submodule(module)
        if child is not None:  # reported under the submodule's path, which is not tracked itself
            claimed.add(id(child))
            parts.append(declared.named_after)
        yield _own_name(module) or "-".join(parts), module


def _candidates(modules: Modules, include_conv: bool) -> List[Tuple[str, nn.Module]]:
    """Every trackable module once, with the name it asks for (duplicates possible)."""
    if isinstance(modules, nn.Module):
        if layer_type(modules, include_conv) is not None:
            return [(_own_name(modules) or f"Module-0-{type(modules).__name__}", modules)]
        return list(_trackable_children(modules, include_conv))
    if not isinstance(modules, (list, tuple)):
        raise TypeError(f"modules must be a torch.nn.Module or a list of modules, got {type(modules).__name__}")
    found: List[Tuple[str, nn.Module]] = []
    taken = set()
    for i, entry in enumerate(modules):
        if not isinstance(entry, nn.Module):
            raise TypeError(f"modules[{i}] is a {type(entry).__name__}, not a torch.nn.Module")
        if layer_type(entry, include_conv) is not None:
            children = [(_own_name(entry) or f"Module-{i}-{type(entry).__name__}", entry)]
        else:
            children = list(_trackable_children(entry, include_conv))
        for name, module in children:
            # The same path inside two containers of the list: the later one says where it is.
            found.append((f"Module-{i}-{name}" if name in taken else name, module))
            taken.add(name)
    return found


def _unique(candidates: List[Tuple[str, nn.Module]]) -> OrderedDict[str, nn.Module]:
    """Keep each module once and give every one a distinct name (``name``, then ``name-2`` …)."""
    asked = {name for name, _ in candidates}
    found: OrderedDict[str, nn.Module] = OrderedDict()
    seen = set()
    for name, module in candidates:
        if id(module) in seen:
            continue
        seen.add(id(module))
        unique, count = name, 1
        while unique in found or (unique != name and unique in asked):
            count += 1
            unique = f"{name}-{count}"
        if unique != name:
            logger.warning(
                "two tracked layers are both named %r (paths map '.' to '-', or a `name` attribute repeats); "
                "the later one is tracked as %r",
                name,
                unique,
            )
        found[unique] = module
    return found


def discover_layers(
    modules: Modules,
    include_conv: bool = True,
    ignore_layer_names: Iterable[str] = (),
    layer_filter: Optional[LayerFilter] = None,
) -> OrderedDict[str, nn.Module]:
    """Find the layers to track and name them, in forward-definition order.

    Parameters
    ----------
    modules : nn.Module or sequence of nn.Module
        A model (its layers are named by their path, ``.`` replaced by ``-``), a single
        layer, or a list of layers and containers. In a list, a layer at position ``i``
        is named ``Module-{i}-{ClassName}`` and a container contributes its layers by
        their path inside it. A layer with a string attribute ``name`` is named by it.
    include_conv : bool
        Whether convolutions are tracked.
    ignore_layer_names : iterable of str
        Names to leave out.
    layer_filter : callable, optional
        Receives the ``name -> module`` dict and returns the one to keep.

    Returns
    -------
    OrderedDict
        ``name -> module``; names are unique (a repeated name gets ``-2``, ``-3`` … with a
        warning) and every module appears once.

    Raises
    ------
    TypeError
        For ``modules`` that are not modules, or a ``layer_filter`` result that is not a
        ``dict`` of modules.
    ValueError
        When no layer is left to track.

    """
    found = _unique(_candidates(unwrap(modules), include_conv))
    ignored = set(ignore_layer_names)
    unknown = ignored - set(found)
    if unknown:
        logger.warning(
            "ignore_layer_names %s match no tracked layer; tracked layers are %s", sorted(unknown), list(found)
        )
    found = OrderedDict((k, v) for k, v in found.items() if k not in ignored)
    if layer_filter is not None:
        found = _filtered(found, layer_filter)
    if not found:
        raise ValueError(
            f"no trackable layer found: delve tracks {supported_names()} layers"
            + ("" if include_conv else " (convolutions are excluded by include_conv=False)")
            + "; declare other types with delve.layers.register_layer"
        )
    left_out = untracked_modules(unwrap(modules), found.values())
    logger.info(
        "tracking %d layer(s); %s",
        len(found),
        "modules with weights left out: " + ", ".join(f"{name} ×{count}" for name, count in left_out.items())
        if left_out
        else "no module with weights of its own is left out",
    )
    return found


def untracked_modules(modules: Modules, tracked: Iterable[nn.Module]) -> Dict[str, int]:
    """Count, by type, the modules holding weights of their own that are not tracked.

    A module counts when it has parameters of its own (``nn.Embedding``, ``nn.LayerNorm``,
    a projection of a type nobody declared …) and is neither tracked nor the submodule a
    layer type is named after (``nn.MultiheadAttention.out_proj``, part of its attention).
    Types of ``torch.nn`` are written ``nn.Name``.

    Returns
    -------
    dict
        ``type name -> count``, most frequent first.

    """
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    every: Dict[int, nn.Module] = {}  # a module shared by two roots counts once
    for root in roots:
        every.update((id(module), module) for module in root.modules())
    covered = {id(layer) for layer in tracked}
    for module in every.values():
        child = claimed_submodule(module)
        if child is not None:
            covered.add(id(child))
    counts: Counter = Counter(
        _type_label(type(module))
        for key, module in every.items()
        if key not in covered and next(module.parameters(recurse=False), None) is not None
    )
    return dict(counts.most_common())


def _type_label(cls: type) -> str:
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn.") else cls.__name__


def _filtered(found: OrderedDict[str, nn.Module], layer_filter: LayerFilter) -> OrderedDict[str, nn.Module]:
    kept = layer_filter(OrderedDict(found))
    if not isinstance(kept, dict):
        raise TypeError(f"layer_filter must return a dict name -> module, got {type(kept).__name__}")
    for name, module in kept.items():
        if not isinstance(name, str) or not isinstance(module, nn.Module) or layer_type(module) is None:
            raise TypeError(
                f"layer_filter returned {name!r}: {type(module).__name__}; it must map layer names (str) to "
                f"trackable layers ({supported_names()}), such as those it was given"
            )
    return OrderedDict(kept)
