"""The interface every writer implements, and the one that fans out to several."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Iterable, List

import numpy as np


def is_scalar(value: Any) -> bool:
    """Whether a value is one number (arrays such as ``cov`` are not)."""
    return np.ndim(value) == 0


class AbstractWriter(ABC):
    """Base class of every writer: subclass it to send the statistics anywhere.

    The tracker calls :meth:`add_scalar` for each user scalar and :meth:`add_scalars`
    once per epoch with every statistic, both with ``global_step=<epoch>``; then
    :meth:`save`. The statistics' keys are :class:`delve.keys.Key` strings, which also
    carry their mode, statistic and layer (:func:`delve.keys.parse_key` reads a key
    back from a file). A subclass must accept ``**kwargs`` in both add methods so that
    keywords added later (``sample_value_dict`` for ``embed`` today) do not break it.
    """

    @abstractmethod
    def add_scalar(self, name: str, value: Any, **kwargs) -> None:
        """Record one value (``kwargs`` carries ``global_step``)."""

    @abstractmethod
    def add_scalars(self, prefix: str, value_dict: Dict[str, Any], **kwargs) -> None:
        """Record several values; keys are ``prefix + key`` (``kwargs``: ``global_step``, ``sample_value_dict``)."""

    def save(self) -> None:
        """Persist what was recorded so far (called after every epoch)."""

    def close(self) -> None:
        """Release files and handles (called once at the end)."""

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Load the state of an earlier run, keeping epochs below ``initial_epoch``."""


class CompositWriter(AbstractWriter):
    """Send every call to each of several writers, in order.

    Parameters
    ----------
    writers : iterable of AbstractWriter

    """

    def __init__(self, writers: Iterable[AbstractWriter]):
        self.writers: List[AbstractWriter] = list(writers)

    def add_scalar(self, name, value, **kwargs):
        for writer in self.writers:
            writer.add_scalar(name, value, **kwargs)

    def add_scalars(self, prefix, value_dict, **kwargs):
        for writer in self.writers:
            writer.add_scalars(prefix, value_dict, **kwargs)

    def save(self):
        for writer in self.writers:
            writer.save()

    def close(self):
        for writer in self.writers:
            writer.close()

    def resume_from_saved_state(self, initial_epoch):
        for writer in self.writers:
            writer.resume_from_saved_state(initial_epoch)
