"""The end of an epoch: every layer's covariance → its statistics → the values handed to the writers."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from delve.config import TrackerConfig
from delve.covariance import TorchCovarianceMatrix
from delve.eigen import Decomposition, decompose_all
from delve.keys import Key, average_key, layer_key
from delve.metrics import get_stat, layer_statistics, stat_needs

logger = logging.getLogger(__name__)

__all__ = ["EpochValues", "epoch_values"]

#: ``key -> value`` of the scalar, vector and matrix statistics, and ``key -> (n, 2) array`` of the samples.
EpochValues = Tuple["OrderedDict[Key, Any]", Dict[Key, np.ndarray]]
SamplesOf = Callable[[str, str], Optional[torch.Tensor]]


def _nan_values(stats: List[str]) -> Dict[str, float]:
    return {stat: math.nan for stat in stats if get_stat(stat).is_scalar}


def _covariance(accumulator: Optional[TorchCovarianceMatrix]) -> Union[torch.Tensor, Exception, None]:
    """Return the epoch's covariance of an accumulator that merged rows (or why it failed), else ``None``."""
    if accumulator is None or accumulator.dim is None or accumulator.count == 0:
        return None
    try:
        return accumulator.fix()
    except Exception as error:  # reported with the layer's statistics
        return error


def _groups(pairs: List[Tuple[str, str]]) -> Iterator[List[Tuple[str, str]]]:
    """Split the (layer, mode) pairs into groups whose eigenproblems are solved together.

    As many as torch has threads, so that each can have one. A covariance exists only
    while its group is solved: the epoch end holds a copy of that many, not of all.
    """
    group: List[Tuple[str, str]] = []
    for pair in pairs:
        group.append(pair)
        if len(group) >= torch.get_num_threads():
            yield group
            group = []
    if group:
        yield group


def _group_values(
    group: List[Tuple[str, str]],
    needed: Mapping[str, List[str]],
    accumulators: Mapping[Tuple[str, str], Optional[TorchCovarianceMatrix]],
    config: TrackerConfig,
    samples_of: SamplesOf,
) -> Dict[Tuple[str, str], Optional[Dict[str, Any]]]:
    """Return the statistics of a group of (layer, mode) pairs, their eigenproblems solved at once."""
    covariances = {pair: _covariance(accumulators[pair]) for pair in group}
    jobs = {}
    for (name, mode), cov in covariances.items():
        needs = stat_needs(needed[mode])
        if isinstance(cov, torch.Tensor) and ("eigenvectors" in needs or "eigenvalues" in needs):
            jobs[(name, mode)] = (cov, "eigenvectors" in needs)
    decompositions = decompose_all(jobs)
    return {
        (name, mode): _layer_values(
            name, mode, needed[mode], accumulators[(name, mode)], covariances[(name, mode)],
            decompositions.get((name, mode)), config, samples_of,
        )
        for name, mode in group
    }


def _layer_values(
    name: str,
    mode: str,
    stats: List[str],
    accumulator: Optional[TorchCovarianceMatrix],
    covariance: Union[torch.Tensor, Exception, None],
    decomposition: Union[Decomposition, Exception, None],
    config: TrackerConfig,
    samples_of: SamplesOf,
) -> Optional[Dict[str, Any]]:
    """Return one layer's statistics in one mode, NaN where nothing usable was recorded, ``None`` if nothing was."""
    if covariance is None:
        # Every batch was non-finite: the layer keeps its row, with values saying there are none.
        skipped = accumulator is not None and accumulator.dim is not None and accumulator.skipped_batches
        return _nan_values(stats) if skipped else None
    try:
        for failure in (covariance, decomposition):
            if isinstance(failure, Exception):
                raise failure
        samples = samples_of(name, mode) if "embed" in stats else None
        return layer_statistics(
            covariance,
            stats,
            config.sat_threshold,
            config.spectrum_k,
            samples=samples,
            mean=accumulator.mean if samples is not None else None,
            decomposition=decomposition,
        )
    except Exception:  # e.g. an eigensolver that does not converge: report NaN, keep training
        logger.exception("layer %s (%s): statistics could not be computed; writing NaN", name, mode)
        return _nan_values(stats)


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
    needed = {}
    for mode in config.modes:
        extra = ["lsat"] if config.average_sat and "lsat" not in config.stats[mode] else []
        needed[mode] = list(config.stats[mode]) + extra
    results: Dict[Tuple[str, str], Optional[Dict[str, Any]]] = {}
    if recording:
        for group in _groups([(name, mode) for mode in config.modes for name in layers]):
            results.update(_group_values(group, needed, accumulators, config, samples_of))
    for mode in config.modes:
        wanted = list(config.stats[mode])
        saturations = []
        for name in layers:
            result = results[(name, mode)] if recording else _nan_values(needed[mode])
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
