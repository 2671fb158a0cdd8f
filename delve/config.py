"""The tracker's settings, checked all at once and then fixed for the tracker's life."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from delve.activations import CONV_METHODS, INTERPOLATION_MODES, TIMESERIES_METHODS, RowOptions
from delve.gram import PRODUCTS
from delve.keys import MODES
from delve.metrics import get_stat, registered_stats
from delve.schedule import SCHEDULES
from delve.validation import (
    check_callable,
    check_choice,
    check_device,
    check_flag,
    check_fraction,
    check_int,
    check_mapping,
    check_path,
)
from delve.writers import WriterSpec, check_save_to

__all__ = ["DEFAULT_MAX_ACCUMULATOR_BYTES", "TrackerConfig", "parse_stats"]

DEFAULT_MAX_ACCUMULATOR_BYTES = 4 * 2**30


def parse_stats(stats: Union[str, Iterable[str]]) -> Mapping[str, Tuple[str, ...]]:
    """Split stat names (``lsat``, ``lsat_train``, ``idim_eval`` …) into the stats of each mode.

    Raises
    ------
    TypeError
        For ``stats`` that is not a name or a list of names.
    ValueError
        For a name that is not a registered statistic (:data:`delve.metrics.STATMAP`).

    """
    if isinstance(stats, Mapping):  # already split (a config copied with dataclasses.replace)
        stats = [f"{name}_{mode}" for mode in MODES for name in stats.get(mode, ())]
    if isinstance(stats, str):
        stats = [stats]
    if stats is None or not isinstance(stats, Iterable):
        raise TypeError(f"stats must be a list of stat names such as ['lsat', 'idim'], got {stats!r}")
    per_mode: Dict[str, list] = {mode: [] for mode in MODES}
    for entry in stats:
        if not isinstance(entry, str):
            raise TypeError(f"stats must be strings, got {entry!r}")
        name, _, suffix = entry.rpartition("_")
        if suffix in MODES and name and _known(name):
            modes: Tuple[str, ...] = (suffix,)
        elif _known(entry):
            name, modes = entry, MODES
        else:
            raise ValueError(
                f"unknown stat {entry!r}; valid stats are {sorted(s.name for s in registered_stats())}, "
                "optionally suffixed with '_train' or '_eval'"
            )
        for mode in modes:
            if name not in per_mode[mode]:
                per_mode[mode].append(name)
    return MappingProxyType({mode: tuple(names) for mode, names in per_mode.items()})


def _known(name: str) -> bool:
    try:
        get_stat(name)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """Every setting of a :class:`~delve.CheckLayerSat` but the model, validated when it is made.

    The fields are the tracker's arguments of the same names (see its documentation);
    they hold canonical values: ``stats`` maps each mode to its stat names,
    ``sat_threshold`` is a ``float``, ``device`` a ``torch.device`` or ``None``,
    ``savefile`` a ``str`` (``None`` while a framework callback has yet to choose it).
    Framework callbacks make one when they are created, so a bad argument fails
    before training starts; ``dataclasses.replace`` gives a checked copy with changes.

    Raises
    ------
    TypeError, ValueError
        Naming the bad argument and what is valid.

    """

    savefile: Optional[str] = None
    save_to: WriterSpec = "csv"
    writer_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    log_interval: int = 1
    max_samples: Optional[int] = None
    stats: Any = ("lsat",)
    layerwise_sat: bool = True
    reset_covariance: bool = True
    average_sat: bool = False
    ignore_layer_names: Any = ()
    include_conv: bool = True
    conv_method: str = "channelwise"
    timeseries_method: str = "last_timestep"
    sat_threshold: float = 0.99
    nosave: bool = False
    verbose: bool = False
    device: Union[str, torch.device, None] = None
    initial_epoch: int = 0
    interpolation_strategy: Optional[str] = None
    interpolation_downsampling: Optional[int] = 32
    layer_filter: Optional[Callable] = None
    spectrum_k: int = 5
    float64_products: bool = False
    max_accumulator_bytes: int = DEFAULT_MAX_ACCUMULATOR_BYTES
    rows_per_batch: Optional[int] = None

    def __post_init__(self) -> None:
        checked = {
            "savefile": None if self.savefile is None else _check_savefile(self.savefile, self.nosave),
            "writer_args": MappingProxyType(check_mapping("writer_args", self.writer_args)),
            "log_interval": check_int("log_interval", self.log_interval, 1),
            "max_samples": check_int("max_samples", self.max_samples, 1, allow_none=True),
            "stats": parse_stats(self.stats),
            "ignore_layer_names": _names(self.ignore_layer_names),
            "conv_method": check_choice("conv_method", self.conv_method, CONV_METHODS),
            "timeseries_method": check_choice("timeseries_method", self.timeseries_method, TIMESERIES_METHODS),
            "sat_threshold": check_fraction("sat_threshold", self.sat_threshold),
            "device": check_device("device", self.device),
            "initial_epoch": check_int("initial_epoch", self.initial_epoch, 0),
            "interpolation_strategy": check_choice(
                "interpolation_strategy", self.interpolation_strategy, INTERPOLATION_MODES, allow_none=True
            ),
            "layer_filter": check_callable("layer_filter", self.layer_filter, "(dict name -> module) -> dict"),
            "spectrum_k": check_int("spectrum_k", self.spectrum_k, 1),
            "max_accumulator_bytes": check_int("max_accumulator_bytes", self.max_accumulator_bytes, 1),
            "rows_per_batch": check_int("rows_per_batch", self.rows_per_batch, 1, allow_none=True),
        }
        # "No downsampling" passed straight through from a config is fine while nothing interpolates.
        checked["interpolation_downsampling"] = check_int(
            "interpolation_downsampling",
            self.interpolation_downsampling,
            1,
            allow_none=checked["interpolation_strategy"] is None,
        )
        for flag in ("layerwise_sat", "reset_covariance", "average_sat", "include_conv", "nosave", "verbose",
                     "float64_products"):
            checked[flag] = check_flag(flag, getattr(self, flag))
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        check_save_to(self.save_to, dict(self.writer_args))
        # The variables that force a kernel are read at every batch: a typo fails here,
        # naming the valid values, not at the first batch.
        for tuner in (PRODUCTS, SCHEDULES):
            tuner.forced()

    @property
    def row_options(self) -> RowOptions:
        """How layer outputs become rows under these settings."""
        return RowOptions(
            self.conv_method, self.timeseries_method, self.interpolation_strategy, self.interpolation_downsampling
        )

    @property
    def modes(self) -> Tuple[str, ...]:
        """The modes that have at least one stat to report."""
        return tuple(mode for mode in MODES if self.stats[mode])


def _check_savefile(savefile: Any, nosave: bool) -> str:
    if nosave and isinstance(savefile, str) and not savefile:
        return savefile  # nothing is written: the path is never used
    return check_path("savefile", savefile)


def _names(names: Any) -> Tuple[str, ...]:
    if isinstance(names, str):
        return (names,)
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"ignore_layer_names must be a list of layer names, got {names!r}") from None
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"ignore_layer_names must hold layer names (strings), got {bad[0]!r}")
    return names
