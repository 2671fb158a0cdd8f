"""The interface every writer implements, and the one that fans out to several."""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from abc import ABC, abstractmethod
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)


def is_scalar(value: Any) -> bool:
    """Whether a value is one number (arrays such as ``cov`` are not)."""
    return np.ndim(value) == 0


class AbstractWriter(ABC):
    """Base class of every writer: subclass it to send the statistics anywhere.

    The tracker calls :meth:`add_scalar` for each user scalar and :meth:`add_scalars`
    once per epoch with every statistic, both with ``global_step=<epoch>``; then
    :meth:`save`. The statistics' keys are :class:`delve.keys.Key` strings, which also
    carry their mode, statistic and layer (:func:`delve.keys.parse_key` reads a key
    back from a file). Accept ``**kwargs`` in both add methods to receive every keyword
    (``sample_value_dict`` carries the ``embed`` arrays); a writer that names its
    keywords instead receives only those. A writer that raises does not stop the
    others, nor training (see :class:`CompositWriter`).
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

    def _check_savestate_ok(self, savepath: Union[str, os.PathLike]) -> bool:
        """Return whether an earlier run left state at ``savepath``; warn if not.

        For your own :meth:`resume_from_saved_state`: call it with the file or folder
        your writer resumes from, and start afresh when it returns ``False``.
        """
        if os.path.exists(savepath):
            return True
        warnings.warn(
            f"no saved state to resume at {os.fspath(savepath)!r}; {type(self).__name__} starts a new one",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


class CompositWriter(AbstractWriter):
    """Send every call to each of several writers, in order, so that one failing writer stops no other.

    A writer that raises in ``add_scalar``, ``add_scalars``, ``save`` or ``close`` is
    reported and skipped for that call; the others still receive and save the epoch, and
    training goes on. The report is a :class:`RuntimeWarning` the first time a writer
    fails in a method with an exception type (visible without any logging set up), and an
    error on the ``delve`` logger: with the traceback the first time, one line after that.
    ``resume_from_saved_state`` is not guarded: a saved state that cannot be resumed is
    an error when the tracker is built, before any epoch runs.

    Each writer's add methods receive only the keyword arguments they accept (their
    signature is inspected once), so a writer written without ``**kwargs`` works.

    Parameters
    ----------
    writers : iterable of AbstractWriter

    """

    def __init__(self, writers: Iterable[AbstractWriter]):
        self.writers: List[AbstractWriter] = list(writers)
        for writer in self.writers:
            if not isinstance(writer, AbstractWriter):
                raise TypeError(f"CompositWriter takes AbstractWriter instances, got {type(writer).__name__}")
        self._keywords: Dict[Tuple[int, str], Optional[Set[str]]] = {}
        self._reported: Set[Tuple[int, str, type]] = set()
        self._step: Any = None

    def add_scalar(self, name, value, **kwargs):
        self._fan_out("add_scalar", (name, value), kwargs)

    def add_scalars(self, prefix, value_dict, **kwargs):
        self._fan_out("add_scalars", (prefix, value_dict), kwargs)

    def save(self):
        self._fan_out("save", (), {})

    def close(self):
        self._fan_out("close", (), {})

    def resume_from_saved_state(self, initial_epoch):
        for writer in self.writers:
            writer.resume_from_saved_state(initial_epoch)

    def _fan_out(self, method: str, args: tuple, kwargs: Dict[str, Any]) -> None:
        self._step = kwargs.get("global_step", self._step)
        failures = []
        for index, writer in enumerate(self.writers):
            bound = getattr(writer, method)
            try:
                bound(*args, **self._accepted(index, method, bound, kwargs))
            except Exception as err:  # one writer (a full disk, a user's bug) must not cost the others the epoch
                failures.append((index, writer, err))
        # Reported once every writer had its call: warnings turned into errors must not skip any.
        for index, writer, err in failures:
            self._report(index, writer, method, err)

    def _accepted(self, index: int, method: str, bound, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if not kwargs:
            return kwargs
        if (index, method) not in self._keywords:
            self._keywords[(index, method)] = _keyword_names(bound)
        names = self._keywords[(index, method)]
        return kwargs if names is None else {k: v for k, v in kwargs.items() if k in names}

    def _report(self, index: int, writer: AbstractWriter, method: str, err: Exception) -> None:
        where = f"{_describe(writer)}.{method}()"
        when = "" if self._step is None else f" at epoch {self._step}"
        cause = (index, method, type(err))
        if cause in self._reported:
            logger.error("%s failed again%s: %s: %s", where, when, type(err).__name__, err)
            return
        self._reported.add(cause)
        logger.error("%s failed%s; the other writers and training go on", where, when, exc_info=err)
        warnings.warn(
            f"delve writer {where} failed{when} with {type(err).__name__}: {err}. The other writers and "
            "training go on; the traceback is logged on the 'delve' logger, and this warning is not "
            "repeated for the same failure.",
            RuntimeWarning,
            stacklevel=2,
        )


def _keyword_names(method) -> Optional[Set[str]]:
    """Return the keyword arguments a method takes, or ``None`` if it takes any (``**kwargs``)."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass everything, as to any writer
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in named}


def _describe(writer: AbstractWriter) -> str:
    path = getattr(writer, "savepath", None)
    return f"{type(writer).__name__}({path!r})" if isinstance(path, str) and path else type(writer).__name__
