"""How the tracker's own code runs inside a training step: outside compiled graphs, once per forward pass."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, TypeVar

import torch

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)


def run_eagerly(fn: F) -> F:
    """Return ``fn`` wrapped so that ``torch.compile`` runs it as plain Python, outside any graph.

    The tracker's hooks and the accumulator's update are locks, counters and float64
    state that changes every batch: compiled, they would only trigger recompilation
    after recompilation. Under ``torch.compile`` the wrapper calls ``fn`` through
    ``torch.compiler.disable``, which makes it a graph break that runs eagerly. Without
    it nothing changes: the compiler takes a second to import, so it is used only once
    something else in the process has imported it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        disabled = wrapper.__dict__.get("_disabled")
        if disabled is None:
            disabled = wrapper._disabled = _disable(fn)
        return disabled(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _disable(fn: Callable) -> Callable:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "disable"):
        return compiler.disable(fn)
    return sys.modules["torch._dynamo"].disable(fn)  # torch < 2.1 has only the private spelling


# The autograd graph task this thread is running, -1 outside a backward pass. Private,
# but the one way to tell a checkpoint's recomputation from a forward pass (the
# checkpoint module itself relies on it).
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_warned_missing = False


def in_backward() -> bool:
    """Return whether this thread is inside a backward pass.

    Gradient checkpointing runs a segment's forward again during backward to recompute
    its activations. Those are rows the forward pass has recorded already. On a torch
    without the probe, nothing is skipped and a warning says so once.
    """
    global _warned_missing
    if _graph_task_id is None:
        if not _warned_missing:
            _warned_missing = True
            logger.warning(
                "this torch cannot tell a backward pass from a forward pass (torch._C._current_graph_task_id "
                "is missing): activations that gradient checkpointing recomputes are counted twice"
            )
        return False
    return _graph_task_id() != -1
