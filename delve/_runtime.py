"""How the tracker's own code runs inside a training step: outside compiled graphs, once per forward pass."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def run_eagerly(fn: F) -> F:
    """Return ``fn`` wrapped so that ``torch.compile`` runs it as plain Python, outside any graph.

    The tracker's hooks and the accumulator's update are locks, counters and float64
    state that changes every batch: compiled, they would only trigger recompilation
    after recompilation. Under ``torch.compile`` the wrapper calls ``fn`` through
    ``torch._dynamo.disable``, which makes it a graph break that runs eagerly. Without
    it nothing changes: ``torch._dynamo`` takes a second to import, so it is used only
    once something else in the process has imported it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:
            return fn(*args, **kwargs)
        disabled = wrapper.__dict__.get("_disabled")
        if disabled is None:
            disabled = wrapper._disabled = dynamo.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# The autograd graph task this thread is running, -1 outside a backward pass. Private,
# but the one way to tell a checkpoint's recomputation from a forward pass (the
# checkpoint module itself relies on it); where it is missing nothing is skipped.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def in_backward() -> bool:
    """Return whether this thread is inside a backward pass.

    Gradient checkpointing runs a segment's forward again during backward to recompute
    its activations. Those are rows the forward pass has recorded already.
    """
    return _graph_task_id() != -1
