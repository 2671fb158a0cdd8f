"""Writers: where the tracker's statistics go, and the registry of ``save_to`` keys."""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Union

from delve.metrics import STATMAP
from delve.writers.base import AbstractWriter, CompositWriter
from delve.writers.csv_writer import CSVWriter
from delve.writers.npy_writer import NPYWriter
from delve.writers.plot_writer import CSVandPlottingWriter
from delve.writers.print_writer import PrintWriter
from delve.writers.tensorboard_writer import TensorBoardWriter

__all__ = [
    "AbstractWriter",
    "CSVWriter",
    "CSVandPlottingWriter",
    "CompositWriter",
    "NPYWriter",
    "PrintWriter",
    "STATMAP",
    "TensorBoardWriter",
    "WRITERS",
    "build_writer",
    "check_save_to",
]

#: ``save_to`` key -> writer class.
WRITERS: Dict[str, type] = {
    "csv": CSVWriter,
    "print": PrintWriter,
    "console": PrintWriter,
    "npy": NPYWriter,
    "tensorboard": TensorBoardWriter,
    "tb": TensorBoardWriter,
    "plot": CSVandPlottingWriter,
    "csvplot": CSVandPlottingWriter,
    "plotcsv": CSVandPlottingWriter,
    "csvplotting": CSVandPlottingWriter,
}

WriterSpec = Union[str, AbstractWriter, Sequence[Union[str, AbstractWriter]]]


def _check_entry(entry) -> None:
    if isinstance(entry, str):
        if entry not in WRITERS:
            raise ValueError(f"unknown writer {entry!r}; valid keys are {sorted(WRITERS)}")
    elif not isinstance(entry, AbstractWriter):
        raise TypeError(
            f"save_to entries must be a key of {sorted(WRITERS)} or an AbstractWriter, "
            f"got {type(entry).__name__}"
        )


def check_save_to(save_to: WriterSpec, writer_args: Optional[Dict[str, Any]] = None) -> List:
    """Check a ``save_to`` spec and the ``writer_args`` for the writers it makes; return its entries.

    Every argument of ``writer_args`` must be accepted by at least one of the writers
    made from keys.

    Raises
    ------
    ValueError
        For an empty spec, an unknown key, or an argument no writer takes.
    TypeError
        For an entry that is neither a key nor an :class:`AbstractWriter`.

    """
    entries: List = list(save_to) if isinstance(save_to, (list, tuple)) else [save_to]
    if not entries:
        raise ValueError(f"save_to is empty; give at least one of {sorted(WRITERS)} or an AbstractWriter")
    for entry in entries:
        _check_entry(entry)
    accepted = _accepted_arguments(entries)
    unused = set(writer_args or {}) - set().union(*accepted.values())
    if unused:
        valid = sorted(set().union(*accepted.values()) - {"savepath"})
        raise ValueError(f"writer_args {sorted(unused)} are accepted by none of the writers; valid: {valid}")
    return entries


def _accepted_arguments(entries: List) -> Dict[type, set]:
    classes = [WRITERS[e] for e in entries if isinstance(e, str)]
    return {cls: set(inspect.signature(cls).parameters) for cls in classes}


def build_writer(save_to: WriterSpec, savepath: str, writer_args: Optional[Dict[str, Any]] = None) -> CompositWriter:
    """Make the writers ``save_to`` names, behind one :class:`CompositWriter`.

    Even a single writer is wrapped, so that a failing writer is reported the same way
    and never stops training. Each writer made from a key receives the ``writer_args``
    its constructor takes (see :func:`check_save_to`).
    """
    entries = check_save_to(save_to, writer_args)
    accepted = _accepted_arguments(entries)
    writers = []
    for entry in entries:
        if isinstance(entry, str):
            cls = WRITERS[entry]
            kwargs = {k: v for k, v in (writer_args or {}).items() if k in accepted[cls]}
            writers.append(cls(savepath=savepath, **kwargs))
        else:
            writers.append(entry)
    return CompositWriter(writers)
