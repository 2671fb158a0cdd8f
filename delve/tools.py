"""Working with saved runs: rebuild the CSV table from an npy folder, at any saturation threshold."""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Union

import numpy as np
import pandas as pd

from delve._files import atomic_path
from delve.keys import MODES, average_key, layer_key, parse_key
from delve.metrics import layer_statistics
from delve.table import RunTable, write_table
from delve.validation import check_fraction
from delve.writers.npy_writer import epoch_file, load_index

logger = logging.getLogger(__name__)

__all__ = ["reconstruct_csv_from_npy_data"]

RECOMPUTABLE = ("lsat", "idim")


def _check_arguments(thresh, stats) -> List[str]:
    check_fraction("thresh", thresh, allow_none=True)
    stats = [stats] if isinstance(stats, str) else list(stats)
    unknown = [s for s in stats if s not in RECOMPUTABLE]
    if unknown:
        raise ValueError(f"stats {unknown} cannot be recomputed from a covariance; valid: {list(RECOMPUTABLE)}")
    return stats


def _load_scalar(path: str):
    # A memory map reads the header only: arrays that are not scalars are never loaded.
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return array[()].item() if array.ndim == 0 else None


def reconstruct_csv_from_npy_data(
    npywriter_out_path: str,
    savefile: Union[str, os.PathLike, None] = None,
    thresh: Optional[float] = None,
    stats: Union[str, Iterable[str]] = RECOMPUTABLE,
) -> pd.DataFrame:
    """Rebuild the CSV writer's table from the folder an :class:`~delve.writers.NPYWriter` wrote.

    Parameters
    ----------
    npywriter_out_path : str
        The npy folder (the tracker's ``savefile`` when it used ``save_to='npy'``).
    savefile : str or os.PathLike, optional
        If given, also write the table to exactly this file, in the CSV writer's format
        (``savefile="out/run-95.csv"`` writes ``out/run-95.csv``; its folder is created).
    thresh : float, optional
        A new saturation threshold in (0, 1]. The ``stats`` are then recomputed from the
        stored covariance matrices (the run must have tracked ``cov``); a value the
        folder holds for a layer and mode without a covariance is left out, since it
        was computed at another threshold.
    stats : iterable of {'lsat', 'idim'}, default ('lsat', 'idim')
        The stats recomputed with ``thresh`` for every stored covariance; their columns
        are added if the run did not track them. Recomputed saturation also updates
        the ``average-{mode}-sat`` columns.

    Returns
    -------
    pandas.DataFrame
        Index: epoch; columns as the CSV writer orders them (user scalars, train
        stats, eval stats; layers in tracking order).

    Raises
    ------
    FileNotFoundError
        If the folder does not exist, or ``thresh`` is given and it holds no covariance matrix.
    ValueError
        For a bad ``thresh`` or ``stats``, or a malformed state file.

    """
    stats = _check_arguments(thresh, stats)
    entries = load_index(npywriter_out_path)
    parsed = {key: parse_key(key) for key, _, _ in entries}
    covariances = [p for p in parsed.values() if p is not None and p.stat == "cov"]
    recompute = thresh is not None and bool(stats)
    if recompute and not covariances:
        raise FileNotFoundError(
            f"{npywriter_out_path!r} holds no covariance matrix to recompute {stats} at thresh={thresh}; "
            "track the 'cov' stat with the npy writer to allow it"
        )
    rebuilt = {layer_key(p.mode, stat, p.layer) for p in covariances for stat in stats}
    replaced = set(stats) if recompute else set()
    cov_modes = {p.mode for p in covariances}
    averages = {average_key(mode) for mode in MODES} if recompute and "lsat" in stats else set()

    table = RunTable()
    dropped: Dict[str, None] = {}
    for epoch in sorted({e for _, _, epochs in entries for e in epochs}):
        row: OrderedDict[str, float] = OrderedDict()
        recomputed: Dict[str, List[float]] = {}
        for key, folder, epochs in entries:
            if epoch not in epochs:
                continue
            info = parsed[key]
            path = epoch_file(npywriter_out_path, folder, epoch)
            if recompute and info is not None and info.stat == "cov":
                values = layer_statistics(np.load(path, allow_pickle=False), stats, thresh)
                for stat in stats:
                    # Assigning to a key already in the row keeps its position.
                    row[layer_key(info.mode, stat, info.layer)] = float(values[stat])
                if "lsat" in values:
                    recomputed.setdefault(info.mode, []).append(float(values["lsat"]))
            elif info is not None and not info.statistic.is_scalar:
                continue
            elif recompute and info is not None and (key in rebuilt or (key in averages and info.mode in cov_modes)):
                # Its position is kept; the value comes from the covariance (or the average below).
                row.setdefault(key, math.nan)
            elif recompute and info is not None and (info.stat in replaced or key in averages):
                dropped[key] = None  # computed at the old threshold, and nothing to recompute it from
            else:
                value = _load_scalar(path)
                if value is not None:
                    row[key] = value
        for average in averages & set(row):
            mode = parse_key(average).mode
            row[average] = float(np.mean(recomputed[mode])) if recomputed.get(mode) else math.nan
        for key, value in row.items():
            table.put(key, value, epoch)
    if dropped:
        logger.warning(
            "no covariance stored for %s: left out rather than mixed with values at thresh=%s", list(dropped), thresh
        )
    result = table.frame()
    if savefile is not None:
        with atomic_path(os.fspath(savefile)) as tmp:
            write_table(result, tmp)
    return result
