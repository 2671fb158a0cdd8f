"""The end of an epoch: every layer's covariance → its statistics → the values handed to the writers."""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from delve.config import TrackerConfig
from delve.covariance import TorchCovarianceMatrix
from delve.keys import Key, average_key, layer_key
from delve.metrics import get_stat, layer_statistics
from delve.schedule import run_all

logger = logging.getLogger(__name__)

__all__ = ["EpochValues", "epoch_values"]

#: ``key -> value`` of the scalar, vector and matrix statistics, and ``key -> (n, 2) array`` of the samples.
EpochValues = Tuple["OrderedDict[Key, Any]", Dict[Key, np.ndarray]]
SamplesOf = Callable[[str, str], Optional[torch.Tensor]]


def _nan_values(stats: List[str]) -> Dict[str, float]:
    return {stat: math.nan for stat in stats if get_stat(stat).is_scalar}


def _layer_values(
    name: str,
    mode: str,
    stats: List[str],
    accumulator: Optional[TorchCovarianceMatrix],
    config: TrackerConfig,
    samples_of: SamplesOf,
) -> Optional[Dict[str, Any]]:
    """Return one layer's statistics in one mode, NaN where nothing usable was recorded, ``None`` if nothing was."""
    if accumulator is None or accumulator.dim is None:
        return None
    if accumulator.count == 0:
        # Every batch was non-finite: the layer keeps its row, with values saying there are none.
        return _nan_values(stats) if accumulator.skipped_batches else None
    samples = samples_of(name, mode) if "embed" in stats else None
    try:
        return layer_statistics(
            accumulator.fix(),
            stats,
            config.sat_threshold,
            config.spectrum_k,
            samples=samples,
            mean=accumulator.mean if samples is not None else None,
        )
    except Exception:  # e.g. an eigensolver that does not converge: report NaN, keep training
        logger.exception("layer %s (%s): statistics could not be computed; writing NaN", name, mode)
        return _nan_values(stats)


def _all_layer_values(
    config: TrackerConfig,
    layers: List[str],
    accumulators: Mapping[Tuple[str, str], Optional[TorchCovarianceMatrix]],
    samples_of: SamplesOf,
    needed: Mapping[str, List[str]],
) -> Dict[Tuple[str, str], Optional[Dict[str, Any]]]:
    """Compute every layer's statistics in every mode, on the faster schedule (:mod:`delve.schedule`)."""
    jobs, widths, on_cpu = {}, {}, True
    for mode in config.modes:
        for name in layers:
            accumulator = accumulators[(name, mode)]
            if accumulator is None or accumulator.dim is None:
                continue
            jobs[(name, mode)] = functools.partial(
                _layer_values, name, mode, needed[mode], accumulator, config, samples_of
            )
            widths[(name, mode)] = accumulator.dim
            on_cpu = on_cpu and accumulator.n.device.type == "cpu"
    return run_all(jobs, widths, on_cpu)


def epoch_values(
    config: TrackerConfig,
    layers: List[str],
    accumulators: Mapping[Tuple[str, str], Optional[TorchCovarianceMatrix]],
    samples_of: SamplesOf,
    recording: bool,
) -> EpochValues:
    """Compute every statistic of every layer and mode for one epoch (one eigendecomposition each).

    Parameters
    ----------
    config : TrackerConfig
        Which stats in which mode, the threshold, ``layerwise_sat`` and ``average_sat``.
    layers : list of str
        The layer names, in tracking order.
    accumulators : mapping
        ``(layer, mode) -> accumulator`` holding the epoch's rows (merged over ranks);
        ``None`` for one whose rows could not be merged.
    samples_of : callable
        ``(layer, mode) -> rows`` kept for ``embed``, or ``None``.
    recording : bool
        ``False`` for a stopped epoch: every scalar is NaN.

    Returns
    -------
    (OrderedDict, dict)
        Values (train first, then eval; layers in tracking order; the averages after a
        mode's layers) and the ``embed`` samples, both keyed by :class:`~delve.keys.Key`.

    """
    values: OrderedDict[Key, Any] = OrderedDict()
    samples: Dict[Key, np.ndarray] = {}
    needed = {
        mode: list(config.stats[mode]) + (["lsat"] if config.average_sat and "lsat" not in config.stats[mode] else [])
        for mode in config.modes
    }
    results = _all_layer_values(config, layers, accumulators, samples_of, needed) if recording else {}
    for mode in config.modes:
        wanted = list(config.stats[mode])
        saturations = []
        for name in layers:
            result = results.get((name, mode)) if recording else _nan_values(needed[mode])
            if result is None:
                continue
            if "lsat" in result:
                saturations.append(result["lsat"])
            if not config.layerwise_sat:
                continue
            for stat in wanted:
                if stat not in result:  # arrays of a stopped epoch: there is nothing to report
                    continue
                key = layer_key(mode, stat, name)
                if get_stat(stat).kind == "samples":
                    samples[key] = result[stat]
                else:
                    values[key] = result[stat]
        if config.average_sat and saturations:
            values[average_key(mode)] = float(np.mean(saturations))
    return values, samples
