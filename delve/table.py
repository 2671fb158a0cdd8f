"""The CSV format of a run, read and written in this one place.

A run's table has one row per epoch (the index, an unnamed first column) and one column
per value: the user's own values first, then the train statistics, then the eval ones,
each group in the order its columns first appeared. Files use ``;`` as separator.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, List, Tuple

import pandas as pd

from delve.keys import mode_rank, parse_key

__all__ = ["column_order", "read_table", "stat_groups", "write_table"]


def column_order(columns: List[str]) -> List[str]:
    """Order columns: user values, then train stats, then eval stats; first appearance within."""
    return [key for _, key in sorted(enumerate(columns), key=lambda item: (mode_rank(item[1]), item[0]))]


def read_table(csv_path: str) -> pd.DataFrame:
    """Read a run's CSV file (separator ``;``, the epoch as index)."""
    return pd.read_csv(csv_path, sep=";", index_col=0)


def write_table(table: pd.DataFrame, target) -> None:
    """Write a table in the format :func:`read_table` reads, to a path or an open text stream."""
    table.to_csv(target, sep=";")


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
