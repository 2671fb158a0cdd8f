"""The CSV writer that also draws pictures of every epoch and of the run so far."""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from delve import plotting
from delve._files import remove_temporaries
from delve.keys import parse_key
from delve.writers.csv_writer import CSVWriter

logger = logging.getLogger(__name__)


class CSVandPlottingWriter(CSVWriter):
    """Write ``{savepath}.csv`` and, at every save, PNG pictures of the new epochs.

    For each scalar stat (short name, e.g. ``lsat``) and mode, per epoch:
    ``{savepath}_{stat}_{mode}_epoch_{epoch}.png`` (one bar per layer, tracking order;
    saturation on a 0–1 axis), and a heatmap of the whole run refreshed at every save:
    ``{savepath}_{stat}_{mode}_history.png`` (layers × epochs). A vector statistic
    (``spectrum``) or samples (``embed``) add ``{savepath}_{stat}_{mode}_epoch_{epoch}.png``
    (one panel per layer). The drawing
    lives in :mod:`delve.plotting`, which can redraw everything from a CSV later.

    Parameters
    ----------
    savepath : str
        Prefix of every file (the CSV is ``{savepath}.csv``).
    fontsize : float, default 10
        Font size of labels and titles.
    figsize : (float, float), default (10, 6)
        Figure size in inches.
    primary_metric : str, optional
        Name of a scalar you record with ``tracker.add_scalar`` (e.g. ``test-accuracy``);
        its value at the epoch is shown in the titles.
    plot_manipulation_func : callable, optional
        ``(ax) -> ax``, applied to every axes before the picture is saved (limits,
        log scales, annotations …).

    """

    def __init__(
        self,
        savepath: str,
        fontsize: float = plotting.DEFAULT_FONTSIZE,
        figsize: Sequence[float] = plotting.DEFAULT_FIGSIZE,
        primary_metric: Optional[str] = None,
        plot_manipulation_func: Optional[Callable] = None,
    ):
        self.fontsize, self.figsize = plotting.check_plot_options(
            fontsize, figsize, primary_metric, plot_manipulation_func
        )
        super().__init__(savepath)
        self.primary_metric = primary_metric
        self.plot_manipulation_func = plot_manipulation_func
        self._pending = set()
        self._arrays: Dict[int, Dict[str, np.ndarray]] = {}  # per epoch: vector and samples stats
        self._warned_primary = False

    def _remove_temporaries(self) -> None:
        super()._remove_temporaries()
        # Only the names of this writer's pictures, in its folder.
        names = r"_[A-Za-z0-9]+_(train|eval)_(epoch_\d+|history)\.png"
        pictures = re.compile(re.escape(os.path.basename(self.savepath)) + names)
        remove_temporaries(os.path.dirname(os.path.abspath(self.path)), pictures)

    def _step(self, global_step) -> int:
        # The step CSVWriter files a value under when none is given.
        return int(global_step) if global_step is not None else self.rows.last_epoch

    def add_scalar(self, name, value, global_step=None, **kwargs):
        super().add_scalar(name, value, global_step=global_step, **kwargs)
        self._pending.add(self._step(global_step))

    def add_scalars(self, prefix, value_dict, global_step=None, sample_value_dict=None, **kwargs):
        super().add_scalars(prefix, value_dict, global_step=global_step, **kwargs)
        step = self._step(global_step)
        self._pending.add(step)
        arrays = {**value_dict, **(sample_value_dict or {})}
        for name, value in arrays.items():
            key = parse_key(f"{prefix}{name}")
            if key is not None and key.statistic.kind in plotting.FIGURES and np.ndim(value) > 0:
                self._arrays.setdefault(step, {})[key] = np.asarray(value)

    def _primary(self, table) -> Optional[str]:
        if self.primary_metric is None or self.primary_metric in table.columns:
            return self.primary_metric
        if not self._warned_primary:
            self._warned_primary = True
            logger.warning(
                "primary_metric %r has not been recorded (tracker.add_scalar); the plots go without it",
                self.primary_metric,
            )
        return None

    def save(self):
        super().save()
        table = self.table()
        epochs = sorted(e for e in self._pending if e in table.index)
        options = {"fontsize": self.fontsize, "figsize": self.figsize,
                   "plot_manipulation_func": self.plot_manipulation_func}
        try:
            plotting.plot_table(table, self.savepath, epochs=epochs, primary_metric=self._primary(table), **options)
            for epoch in sorted(self._arrays):
                plotting.plot_vectors(self._arrays[epoch], self.savepath, epoch, **options)
        finally:
            # A picture that failed (say, a broken plot_manipulation_func) is not retried
            # at every later save; the CSV above is already safe.
            self._pending.clear()
            self._arrays.clear()
