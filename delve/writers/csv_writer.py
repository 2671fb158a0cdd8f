"""The CSV writer: one row per epoch, one column per key."""

from __future__ import annotations

import logging
import os

from delve._files import atomic_path, remove_temporaries
from delve.table import RunTable, load_table, write_table
from delve.writers.base import AbstractWriter

logger = logging.getLogger(__name__)


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
        self.rows = RunTable()
        self._saved = False

    def add_scalar(self, name, value, global_step=None, **kwargs):
        self.rows.put(name, value, global_step)

    def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
        for key, value in value_dict.items():
            self.rows.put(f"{prefix}{key}", value, global_step)

    def table(self):
        """Return what was recorded as the table the file holds (a :class:`pandas.DataFrame`)."""
        return self.rows.frame()

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
        try:
            frame = load_table(self.path)
        except ValueError as err:
            raise ValueError(
                f"cannot resume from {self.path}: {err}, so it is not a table the csv writer wrote "
                "(separator ';', the epoch as first column). Move the file away to keep it and start "
                "again, or start a new run with initial_epoch=0"
            ) from None
        self.rows = RunTable.from_frame(frame[frame.index < initial_epoch])
