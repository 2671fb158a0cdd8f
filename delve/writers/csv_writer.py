"""The CSV writer: one row per epoch, one column per key."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List

import numpy as np
import pandas as pd

from delve._files import atomic_path, remove_temporaries
from delve.writers.base import AbstractWriter, is_scalar, parse_key

logger = logging.getLogger(__name__)

_MODE_RANK = {None: 0, "train": 1, "eval": 2}


def column_order(columns: List[str]) -> List[str]:
    """Order columns: user scalars, then train stats, then eval stats; first appearance within."""
    def rank(item):
        position, key = item
        parsed = parse_key(key)
        return (_MODE_RANK[parsed[0] if parsed else None], position)

    return [key for _, key in sorted(enumerate(columns), key=rank)]


def read_table(csv_path: str) -> pd.DataFrame:
    """Read a CSV file written by :class:`CSVWriter` (separator ``;``, epoch index)."""
    return pd.read_csv(csv_path, sep=";", index_col=0)


def _resumable_table(csv_path: str) -> pd.DataFrame:
    """Read a CSV file to resume from, or raise a ``ValueError`` that names it and says why not."""
    def refuse(reason: str) -> ValueError:
        return ValueError(
            f"cannot resume from {csv_path}: {reason}, so it is not a table the csv writer wrote "
            "(separator ';', the epoch as first column). Move the file away to keep it and start "
            "again, or start a new run with initial_epoch=0"
        )

    try:
        frame = read_table(csv_path)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
        raise refuse(f"it cannot be read ({type(err).__name__}: {' '.join(str(err).split())})") from None
    index = frame.index
    if len(index) and not (pd.api.types.is_integer_dtype(index) and index.is_unique and index.min() >= 0):
        raise refuse(f"its first column holds {list(index[:3])!r}, not distinct epoch numbers")
    bad = [column for column in frame.columns if not pd.api.types.is_numeric_dtype(frame[column])]
    if bad:
        raise refuse(f"its column(s) {bad[:3]} hold text, not numbers")
    return frame


def write_table(table: pd.DataFrame, target) -> None:
    """Write a table in the format :func:`read_table` reads, to a path or an open text stream."""
    table.to_csv(target, sep=";")


class CSVWriter(AbstractWriter):
    """Write ``{savepath}.csv`` (separator ``;``), rewritten atomically on every save.

    The first, unnamed column is the epoch. A key first seen at a later epoch holds
    NaN in the earlier rows; arrays (``cov``, ``spectrum``) are not written. A run
    resumed from a file that is not such a table (empty, binary, another separator)
    stops with a ``ValueError`` naming the file, which is left as it is.

    Parameters
    ----------
    savepath : str
        Path of the file without the ``.csv`` extension.

    """

    def __init__(self, savepath: str):
        self.savepath = savepath
        self.path = savepath + ".csv"
        self._rows: Dict[int, Dict[str, float]] = {}
        self._columns: List[str] = []
        self._saved = False

    def _put(self, name: str, value: Any, step) -> None:
        if not is_scalar(value):
            return
        if step is None:
            step = max(self._rows, default=0)
        if name not in self._columns:
            self._columns.append(name)
        self._rows.setdefault(int(step), {})[name] = float(value)

    def add_scalar(self, name, value, global_step=None, **kwargs):
        self._put(name, value, global_step)

    def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
        for key, value in value_dict.items():
            self._put(f"{prefix}{key}", value, global_step)

    def table(self) -> pd.DataFrame:
        """Return what was recorded as the table the file holds."""
        epochs = sorted(self._rows)
        columns = column_order(self._columns)
        data = {c: [self._rows[e].get(c, np.nan) for e in epochs] for c in columns}
        return pd.DataFrame(data, index=pd.Index(epochs), columns=columns)

    def _remove_temporaries(self) -> None:
        remove_temporaries(os.path.dirname(os.path.abspath(self.path)), os.path.basename(self.path))

    def save(self):
        if not self._saved:  # a run's first save clears what a killed one left half-written
            self._remove_temporaries()
            self._saved = True
        with atomic_path(self.path) as tmp:
            write_table(self.table(), tmp)

    def resume_from_saved_state(self, initial_epoch: int):
        if not os.path.exists(self.path):
            logger.warning("no CSV to resume at %s; starting a new one", self.path)
            return
        frame = _resumable_table(self.path)
        frame = frame[frame.index < initial_epoch]
        self._columns = list(frame.columns)
        self._rows = {
            int(epoch): {k: v for k, v in row.items() if not pd.isna(v)} for epoch, row in frame.iterrows()
        }
