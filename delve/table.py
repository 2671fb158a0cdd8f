"""The CSV format of a run, read, checked and written in this one place.

A run's table has one row per epoch (the index, an unnamed first column) and one column
per value: the user's own values first, then the train statistics, then the eval ones,
each group in the order its columns first appeared. Files use ``;`` as separator.
:class:`RunTable` is the table while it is being filled; :func:`load_table` reads one
back and checks that it is such a table.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import pandas as pd

from delve.keys import mode_rank, parse_key

__all__ = ["RunTable", "column_order", "load_table", "read_table", "stat_groups", "write_table"]


def column_order(columns: List[str]) -> List[str]:
    """Order columns: user values, then train stats, then eval stats; first appearance within."""
    return [key for _, key in sorted(enumerate(columns), key=lambda item: (mode_rank(item[1]), item[0]))]


def read_table(csv_path: str) -> pd.DataFrame:
    """Read a run's CSV file (separator ``;``, the epoch as index), without checking it."""
    return pd.read_csv(csv_path, sep=";", index_col=0)


def write_table(table: pd.DataFrame, target) -> None:
    """Write a table in the format :func:`read_table` reads, to a path or an open text stream."""
    table.to_csv(target, sep=";")


def load_table(csv_path: str) -> pd.DataFrame:
    """Read a run's CSV file and check that it is one: distinct epoch numbers, numeric columns.

    Raises
    ------
    ValueError
        Saying why the file is not such a table (unreadable, empty, another separator,
        text where numbers belong).
    OSError
        If the file cannot be opened.

    """
    try:
        frame = read_table(csv_path)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
        raise ValueError(f"it cannot be read as a table ({type(err).__name__}: {' '.join(str(err).split())})") from None
    index = pd.to_numeric(pd.Series(frame.index, dtype=object), errors="coerce")
    if len(index) and (index.isna().any() or (index % 1 != 0).any() or (index < 0).any()):
        raise ValueError(f"its first column holds {list(frame.index[:3])!r}, not epoch numbers")
    frame.index = pd.Index(index.astype(int) if len(index) else index, name=None)
    if not frame.index.is_unique:
        raise ValueError(f"epochs {sorted(set(frame.index[frame.index.duplicated()]))} appear twice")
    bad = [column for column in frame.columns if not pd.api.types.is_numeric_dtype(frame[column])]
    if bad:
        raise ValueError(f"its column(s) {bad[:3]} hold text, not numbers")
    return frame


def stat_groups(columns: Iterable[str]) -> OrderedDict[Tuple[str, str], List[Tuple[str, str]]]:
    """Group per-layer scalar columns by ``(short stat, mode)``, layers in column (tracking) order.

    Returns
    -------
    OrderedDict
        ``(stat, mode) -> [(layer, column), ...]``; averages and user scalars are left out.

    """
    groups: OrderedDict[Tuple[str, str], List[Tuple[str, str]]] = OrderedDict()
    for column in columns:
        key = parse_key(column)
        if key is not None and not key.is_average and key.statistic.is_scalar:
            groups.setdefault((key.stat, key.mode), []).append((key.layer, column))
    return groups


class RunTable:
    """A run's table while it is filled, epoch by epoch: what the CSV file holds, in memory.

    Values that are not one number (``cov``, ``spectrum``) are not kept. A value filed
    without an epoch goes into the latest one.
    """

    def __init__(self):
        self._rows: Dict[int, Dict[str, float]] = {}
        self._columns: List[str] = []

    @property
    def last_epoch(self) -> int:
        """The latest epoch holding a value (0 for an empty table)."""
        return max(self._rows, default=0)

    def put(self, name: str, value: Any, epoch: Optional[int] = None) -> Optional[int]:
        """File one value under ``name`` at ``epoch``; return the epoch, or ``None`` if it is not one number."""
        if np.ndim(value) != 0:
            return None
        epoch = self.last_epoch if epoch is None else int(epoch)
        if name not in self._columns:
            self._columns.append(name)
        self._rows.setdefault(epoch, {})[name] = float(value)
        return epoch

    def frame(self) -> pd.DataFrame:
        """Return the table: index the epochs, columns in :func:`column_order`, NaN where nothing was filed."""
        epochs = sorted(self._rows)
        columns = column_order(self._columns)
        data = {c: [self._rows[e].get(c, np.nan) for e in epochs] for c in columns}
        return pd.DataFrame(data, index=pd.Index(epochs), columns=columns)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> RunTable:
        """Start from a table read back from a file (its missing values stay missing)."""
        table = cls()
        table._columns = list(frame.columns)
        table._rows = {
            int(epoch): {k: v for k, v in row.items() if not pd.isna(v)} for epoch, row in frame.iterrows()
        }
        return table
