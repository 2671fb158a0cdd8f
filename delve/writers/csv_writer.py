"""The CSV writer: one row per epoch, one column per key."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List

import numpy as np
import pandas as pd

from delve._files import atomic_path
from delve.table import column_order, read_table, write_table
from delve.writers.base import AbstractWriter, is_scalar

logger = logging.getLogger(__name__)


class CSVWriter(AbstractWriter):
    """Write ``{savepath}.csv`` (separator ``;``), rewritten atomically on every save.

    The first, unnamed column is the epoch. A key first seen at a later epoch holds
    NaN in the earlier rows; arrays (``cov``, ``spectrum``) are not written.

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

    def save(self):
        with atomic_path(self.path) as tmp:
            write_table(self.table(), tmp)

    def resume_from_saved_state(self, initial_epoch: int):
        if not os.path.exists(self.path):
            logger.warning("no CSV to resume at %s; starting a new one", self.path)
            return
        frame = read_table(self.path)
        frame = frame[frame.index < initial_epoch]
        self._columns = list(frame.columns)
        self._rows = {
            int(epoch): {k: v for k, v in row.items() if not pd.isna(v)} for epoch, row in frame.iterrows()
        }
