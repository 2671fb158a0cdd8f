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
from delve.validation import check_int
from delve.writers.csv_writer import CSVWriter

logger = logging.getLogger(__name__)


class CSVandPlottingWriter(CSVWriter):
    """Write ``{savepath}.csv`` and, at every save, PNG pictures of the new epochs.

    For each scalar stat (short name, e.g. ``lsat``) and mode, per epoch:
    ``{savepath}_{stat}_{mode}_epoch_{epoch}.png`` (one bar per layer, tracking order;
    saturation on a 0–1 axis). A vector statistic (``spectrum``) or samples (``embed``)
    add ``{savepath}_{stat}_{mode}_epoch_{epoch}.png`` (one panel per layer).

    The heatmap of the whole run, ``{savepath}_{stat}_{mode}_history.png`` (layers ×
    epochs), costs as much as two to four bar charts, so it is not redrawn at every
    save: by default it is drawn when the writer closes, and every ``history_every``
    epochs if asked. An epoch then costs what the bar charts alone cost, as in the
    releases before the heatmaps (``benchmarks/plots.py``). After a crash the CSV and
    the bar charts hold every finished epoch, the heatmap the epochs up to its last
    redraw, if any (``delve plot`` draws it from the CSV). The drawing lives in
    :mod:`delve.plotting`, which can redraw everything from a CSV later.

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
    history_every : int, optional
        Also redraw the history heatmaps during the run, once this many epochs have been
        drawn since their last redraw (``1``: at every save). ``None`` (the default):
        only when the writer closes.

    """

    def __init__(
        self,
        savepath: str,
        fontsize: float = plotting.DEFAULT_FONTSIZE,
        figsize: Sequence[float] = plotting.DEFAULT_FIGSIZE,
        primary_metric: Optional[str] = None,
        plot_manipulation_func: Optional[Callable] = None,
        history_every: Optional[int] = None,
    ):
        self.fontsize, self.figsize = plotting.check_plot_options(
            fontsize, figsize, primary_metric, plot_manipulation_func
        )
        self.history_every = check_int("history_every", history_every, minimum=1, allow_none=True)
        super().__init__(savepath)
        self.primary_metric = primary_metric
        self.plot_manipulation_func = plot_manipulation_func
        self._pending = set()
        self._undrawn_history = 0  # epochs drawn as bars since the heatmaps were last redrawn
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

    def _options(self) -> dict:
        return {"fontsize": self.fontsize, "figsize": self.figsize,
                "plot_manipulation_func": self.plot_manipulation_func}

    def save(self):
        super().save()
        table = self.table()
        epochs = sorted(e for e in self._pending if e in table.index)
        self._undrawn_history += len(epochs)
        try:
            plotting.plot_epochs(table, self.savepath, epochs=epochs, primary_metric=self._primary(table),
                                 **self._options())
            for epoch in sorted(self._arrays):
                plotting.plot_vectors(self._arrays[epoch], self.savepath, epoch, **self._options())
            if self.history_every is not None and self._undrawn_history >= self.history_every:
                self._draw_history(table)
        finally:
            # A picture that failed (say, a broken plot_manipulation_func) is not retried
            # at every later save; the CSV above is already safe.
            self._pending.clear()
            self._arrays.clear()

    def _draw_history(self, table) -> None:
        self._undrawn_history = 0  # set first: a failing heatmap is not retried at every save
        plotting.plot_history(table, self.savepath, primary_metric=self._primary(table), **self._options())

    def close(self):
        try:
            if self._undrawn_history:
                self._draw_history(self.table())
        finally:
            super().close()
