"""CheckLayerSat: hooks on a model's layers, epoch-wide covariances, statistics to writers.

Data flow, in one read: a forward hook receives a layer's output
(:meth:`CheckLayerSat._record`) → :func:`delve.activations.to_data_rows` makes it
``(..., features)`` rows (a view where it can) → the layer's :class:`~delve.covariance.TorchCovarianceMatrix`
for the current mode merges it → at :meth:`CheckLayerSat.add_saturations` each
accumulator's covariance goes through :func:`delve.metrics.layer_statistics` (one
eigendecomposition) → the writer receives the values.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from delve import distributed
from delve._runtime import in_backward, run_eagerly
from delve.activations import CONV_METHODS, INTERPOLATION_MODES, TIMESERIES_METHODS, first_rows, to_data_rows
from delve.console import SaturationBars
from delve.covariance import TorchCovarianceMatrix, covariance_bytes
from delve.layers import CONV_TYPES, LINEAR_TYPES, RECURRENT_TYPES, discover_layers, unwrap
from delve.metrics import SCALAR_STATS, STATMAP, layer_statistics
from delve.writers import AbstractWriter, WriterSpec, build_writer

logger = logging.getLogger(__name__)

MODES = ("train", "eval")
EMBED_SAMPLES = 1000
DEFAULT_MAX_ACCUMULATOR_BYTES = 4 * 2**30


class _LayerMode:
    """Everything recorded for one layer in one mode during the current epoch."""

    __slots__ = ("cov", "calls", "seen", "samples", "sample_rows", "lock")

    def __init__(self, device, float64_products):
        self.cov = TorchCovarianceMatrix(device=device, float64_products=float64_products)
        self.calls = 0
        self.seen = 0
        # (rows, all-finite flag of their batch); the flag stays on the device until the epoch ends.
        self.samples: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.sample_rows = 0
        # Hooks of nn.DataParallel replicas run in threads.
        self.lock = threading.Lock()

    def new_epoch(self, reset_covariance: bool) -> None:
        with self.lock:
            if reset_covariance:
                self.cov.reset()
            self.calls = 0
            self.seen = 0
            self.samples = []
            self.sample_rows = 0

    def finite_samples(self) -> Optional[torch.Tensor]:
        """Return the recorded embedding rows, without those of batches the accumulator skipped."""
        kept = [rows for rows, finite in self.samples if bool(finite)]
        if not kept:
            return None
        # nn.DataParallel replicas record on their own GPUs; gather where the covariance is.
        device = self.cov.n.device if self.cov.n is not None else kept[0].device
        return torch.cat([rows.to(device) for rows in kept])


def _known_feature_dim(module: nn.Module, conv_method: str) -> Optional[int]:
    """Return the number of columns a layer's data matrix will have, if its definition tells.

    ``None`` when it depends on the input (``conv_method='flatten'``, unknown types).
    """
    if isinstance(module, LINEAR_TYPES):
        return module.out_features
    if isinstance(module, CONV_TYPES):
        return None if conv_method == "flatten" else module.out_channels
    if isinstance(module, RECURRENT_TYPES):
        size = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
        return size * (2 if module.bidirectional else 1)
    return None


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def parse_stats(stats: Iterable[str]) -> Dict[str, List[str]]:
    """Split stat names (``lsat``, ``lsat_train``, ``idim_eval`` …) into the stats of each mode.

    Raises
    ------
    ValueError
        For a name that is not a stat of :data:`delve.metrics.STATMAP`.

    """
    if isinstance(stats, str):
        stats = [stats]
    per_mode: Dict[str, List[str]] = {mode: [] for mode in MODES}
    for entry in stats:
        if not isinstance(entry, str):
            raise TypeError(f"stats must be strings, got {entry!r}")
        name, _, suffix = entry.rpartition("_")
        if suffix in MODES and name in STATMAP:
            modes = (suffix,)
        elif entry in STATMAP:
            name, modes = entry, MODES
        else:
            raise ValueError(
                f"unknown stat {entry!r}; valid stats are {sorted(STATMAP)}, "
                "optionally suffixed with '_train' or '_eval'"
            )
        for mode in modes:
            if name not in per_mode[mode]:
                per_mode[mode].append(name)
    return per_mode


def _check_device(device) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device {device!r} is not a torch device: {err}; use None, 'cpu' or 'cuda:N'"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was asked for but CUDA is not available; use device=None or 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type == "mps":
        raise ValueError(
            "device 'mps' has no float64 arithmetic, which the accumulators need; use device=None "
            "(MPS activations are then accumulated on the CPU) or 'cpu'"
        )
    return device


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")


class _LayerHook:
    """The forward hook on one tracked layer: hands its output to the tracker while it records.

    ``nn.DataParallel`` replicas share it. A copy of the model (``copy.deepcopy`` for an
    EMA model or a kept best model, or ``torch.save(model)``) gets an :class:`_InertHook`
    instead: the copy must neither feed this tracker nor need it to be pickled.
    """

    __slots__ = ("tracker", "name")

    def __init__(self, tracker: CheckLayerSat, name: str):
        self.tracker = tracker
        self.name = name

    def __call__(self, module: nn.Module, inputs, output) -> None:
        if self.tracker._recording:
            self.tracker._record(self.name, module, output)

    def __reduce__(self):
        return (_InertHook, ())


class _InertHook:
    """What a tracker's hook becomes in a copy of the model: nothing."""

    def __call__(self, module: nn.Module, inputs, output) -> None:
        return None


class CheckLayerSat:
    """Track the saturation and other eigenspace statistics of a model's layers during training.

    Forward hooks record every output of every tracked layer into float64 covariance
    accumulators, one per layer and mode (``train`` / ``eval``, from the layer's
    ``training`` flag). Each :meth:`add_saturations` call closes an epoch: it computes
    the statistics of the epoch's covariance of every layer and hands them to the
    writers.

    Parameters
    ----------
    savefile : str
        Destination of the outputs: ``{savefile}.csv``, the folder ``{savefile}/``, …
    save_to : str, AbstractWriter or list of them
        Writer keys (``csv``, ``npy``, ``print``/``console``, ``tensorboard``/``tb``,
        ``plot``/``csvplot``/``plotcsv``/``csvplotting``), writer instances, or a list.
    modules : nn.Module or list of nn.Module
        A model, a single layer, or a list of layers and containers.
    writer_args : dict, optional
        Extra constructor arguments for the writers made from keys.
    log_interval : int, default 1
        Record only every ``log_interval``-th forward pass of a layer in a mode
        (counted from the start of each epoch).
    max_samples : int, optional
        Per layer, mode and epoch, stop recording after this many samples of the batch
        dimension; the batch that reaches the limit is cut to it.
    stats : list of str, default ``['lsat']``
        Keys of :data:`delve.metrics.STATMAP`; ``_train`` / ``_eval`` limits one to a mode.
    layerwise_sat : bool, default True
        Report per-layer values (``False`` keeps only the averages).
    reset_covariance : bool, default True
        Start every epoch with empty accumulators.
    average_sat : bool, default False
        Also report ``average-{mode}-sat``, the mean saturation over layers.
    ignore_layer_names : sequence of str
        Names of layers not to track.
    include_conv : bool, default True
        Track convolutions.
    conv_method : {'channelwise', 'mean', 'max', 'median', 'flatten'}
        How a convolution's output becomes a data matrix.
    timeseries_method : {'last_timestep', 'timestepwise'}
        How a sequence output becomes a data matrix.
    sat_threshold : float, default 0.99
        Fraction of the variance the intrinsic dimensionality explains, in (0, 1].
    nosave : bool, default False
        Make no writer: statistics are only returned by :meth:`add_saturations`.
    verbose : bool, default False
        At every epoch end, log each layer's saturation and show it as one progress bar
        per layer and mode on standard error (see :class:`delve.console.SaturationBars`).
    device : str or torch.device, optional
        Where accumulators live; ``None`` follows the activations.
    initial_epoch : int, default 0
        Number of the first epoch; above 0, the writers resume their saved state.
    interpolation_strategy : str, optional
        A :func:`torch.nn.functional.interpolate` mode; feature maps larger than
        ``interpolation_downsampling`` are resized to it before recording.
    interpolation_downsampling : int, default 32
        Target spatial size of the interpolation.
    layer_filter : callable, optional
        ``dict name -> module`` in, the ``dict`` of layers to keep out.
    spectrum_k : int, default 5
        Number of leading eigenvalues the ``spectrum`` stat reports.
    float64_products : bool, default False
        Compute batch Gram products in float64 instead of float32 on centred data.
    max_accumulator_bytes : int, default 4 GiB
        Refuse (with an explanation) to allocate a layer's accumulator above this size.

    """

    def __init__(
        self,
        savefile: str,
        save_to: WriterSpec,
        modules: Union[nn.Module, Sequence[nn.Module]],
        writer_args: Optional[Dict[str, Any]] = None,
        log_interval: int = 1,
        max_samples: Optional[int] = None,
        stats: Sequence[str] = ("lsat",),
        layerwise_sat: bool = True,
        reset_covariance: bool = True,
        average_sat: bool = False,
        ignore_layer_names: Sequence[str] = (),
        include_conv: bool = True,
        conv_method: str = "channelwise",
        timeseries_method: str = "last_timestep",
        sat_threshold: float = 0.99,
        nosave: bool = False,
        verbose: bool = False,
        device: Union[str, torch.device, None] = None,
        initial_epoch: int = 0,
        interpolation_strategy: Optional[str] = None,
        interpolation_downsampling: int = 32,
        layer_filter: Optional[Callable[[Dict[str, nn.Module]], Dict[str, nn.Module]]] = None,
        spectrum_k: int = 5,
        float64_products: bool = False,
        max_accumulator_bytes: int = DEFAULT_MAX_ACCUMULATOR_BYTES,
    ):
        # Everything is validated before anything is hooked or written.
        self.stats = parse_stats(stats)
        if conv_method not in CONV_METHODS:
            raise ValueError(f"unknown conv_method {conv_method!r}; valid methods are {list(CONV_METHODS)}")
        if timeseries_method not in TIMESERIES_METHODS:
            raise ValueError(
                f"unknown timeseries_method {timeseries_method!r}; valid methods are {list(TIMESERIES_METHODS)}"
            )
        if isinstance(sat_threshold, bool) or not isinstance(sat_threshold, (int, float)) or not (
            0 < sat_threshold <= 1
        ):
            raise ValueError(f"sat_threshold must lie in (0, 1], got {sat_threshold!r}")
        _check_int("log_interval", log_interval, 1)
        _check_int("max_samples", max_samples, 1, allow_none=True)
        _check_int("initial_epoch", initial_epoch, 0)
        _check_int("interpolation_downsampling", interpolation_downsampling, 1)
        _check_int("spectrum_k", spectrum_k, 1)
        _check_int("max_accumulator_bytes", max_accumulator_bytes, 1)
        if interpolation_strategy is not None and interpolation_strategy not in INTERPOLATION_MODES:
            raise ValueError(
                f"unknown interpolation_strategy {interpolation_strategy!r}; "
                f"valid modes are None or {list(INTERPOLATION_MODES)}"
            )
        if layer_filter is not None and not callable(layer_filter):
            raise TypeError(f"layer_filter must be callable, got {type(layer_filter).__name__}")
        if isinstance(ignore_layer_names, str):
            ignore_layer_names = [ignore_layer_names]
        self.device = _check_device(device)

        self.layers = discover_layers(unwrap(modules), include_conv, ignore_layer_names, layer_filter)
        if not self.layers:
            raise ValueError(
                "no trackable layer found: delve tracks Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
                "LSTM, GRU and RNN layers"
                + ("" if include_conv else " (convolutions are excluded by include_conv=False)")
            )

        self.savefile = savefile
        self.log_interval = int(log_interval)
        self.max_samples = None if max_samples is None else int(max_samples)
        self.layerwise_sat = layerwise_sat
        self.reset_covariance = reset_covariance
        self.average_sat = average_sat
        self.conv_method = conv_method
        self.timeseries_method = timeseries_method
        self.threshold = float(sat_threshold)
        self.verbose = verbose
        self.initial_epoch = int(initial_epoch)
        self.epoch = int(initial_epoch)
        self.interpolation_strategy = interpolation_strategy
        self.interpolation_downsampling = int(interpolation_downsampling)
        self.spectrum_k = int(spectrum_k)
        self.float64_products = bool(float64_products)
        self.max_accumulator_bytes = int(max_accumulator_bytes)
        # Refuse an accumulator too big for memory now, before any hook, file or tensor
        # exists; layers whose width depends on the input are checked at their first batch.
        for name, layer in self.layers.items():
            dim = _known_feature_dim(layer, conv_method)
            if dim is not None and any(self.stats[mode] for mode in MODES):
                self._check_memory(name, dim)

        self.writer: Optional[AbstractWriter] = None
        # Under torch.distributed only rank 0 writes, so the other ranks make no writer
        # (some writers create files as they are built).
        if not nosave and distributed.is_writer():
            folder = os.path.dirname(savefile)
            if folder:
                os.makedirs(folder, exist_ok=True)
            self.writer = build_writer(save_to, savefile, writer_args)
            if self.initial_epoch > 0:
                self.writer.resume_from_saved_state(self.initial_epoch)

        self._state: Dict[Tuple[str, str], _LayerMode] = {
            (name, mode): _LayerMode(self.device, self.float64_products)
            for name in self.layers
            for mode in MODES
            if self.stats[mode]
        }
        self._user_scalars: OrderedDict[str, Any] = OrderedDict()
        self._recording = True
        self._closed = False
        self._warned: set = set()  # (reason, layer, ...) already logged once: see _first_time
        self._called: set = set()  # layers whose hook ran this epoch
        self._bars = None  # the console view of verbose=True, made at the first epoch end
        self._hooks = [
            layer.register_forward_hook(_LayerHook(self, name)) for name, layer in self.layers.items()
        ]

    # ------------------------------------------------------------------ hooks
    @run_eagerly
    def _record(self, name: str, module: nn.Module, output) -> None:
        """Feed one forward pass of one layer into its accumulator."""
        if in_backward():  # a checkpoint recomputing activations the forward pass recorded
            return
        self._called.add(name)
        mode = "train" if module.training else "eval"
        state = self._state.get((name, mode))
        if state is None:
            return
        # Counting, the max_samples budget and the embedding rows are one atomic step,
        # so concurrent replicas neither lose calls nor overshoot max_samples. The
        # reshaping is views and cheap kernels; the covariance update runs unlocked.
        with state.lock:
            state.calls += 1
            if state.calls % self.log_interval:
                return
            remaining = None if self.max_samples is None else self.max_samples - state.seen
            if remaining is not None and remaining <= 0:
                return
            try:
                with torch.no_grad():
                    x, batch = to_data_rows(
                        module,
                        output,
                        self.conv_method,
                        self.timeseries_method,
                        self.interpolation_strategy,
                        self.interpolation_downsampling,
                        remaining,
                    )
            except Exception:  # a layer whose output we cannot read must not stop training
                if self._first_time("unreadable", name):
                    logger.exception("layer %s: cannot make a data matrix from its output; it is skipped", name)
                return
            if state.cov.dim is None:
                self._check_memory(name, x.shape[-1])
            elif x.shape[-1] != state.cov.dim:  # conv_method='flatten' on maps of another size
                if self._first_time("width", name):
                    logger.error(
                        "layer %s: a batch has %d features where the layer's first batch had %d; "
                        "such batches are skipped (use conv_method='channelwise' or an interpolation_strategy)",
                        name,
                        x.shape[-1],
                        state.cov.dim,
                    )
                return
            state.seen += batch
            if "embed" in self.stats[mode] and state.sample_rows < EMBED_SAMPLES:
                keep = first_rows(x, EMBED_SAMPLES - state.sample_rows)
                # A batch the accumulator skips (NaN/Inf) must not reach the embedding either.
                state.samples.append((keep, torch.isfinite(x).all()))
                state.sample_rows += keep.shape[0]
        try:
            state.cov.update_rows(x)  # the accumulator brings x to its own device
        except Exception:  # a device out of memory, say: skip the batch, keep training
            if self._first_time("update", name):
                logger.exception("layer %s: a batch could not be added to its covariance; it is skipped", name)

    def _first_time(self, *key) -> bool:
        """Return whether ``key`` is new: for what is logged once per tracker."""
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

    def _check_memory(self, name: str, dim: int) -> None:
        needed = covariance_bytes(dim)
        if needed > self.max_accumulator_bytes:
            limit = self.max_accumulator_bytes
            raise MemoryError(
                f"layer {name!r} has {dim} features: its covariance accumulator needs "
                f"{needed} bytes ({_human_bytes(needed)}), over max_accumulator_bytes={limit} "
                f"({_human_bytes(limit)}). Use conv_method='channelwise' (one feature per channel) or "
                "'mean', set interpolation_strategy to shrink feature maps, leave the layer out with "
                "ignore_layer_names or layer_filter, or raise max_accumulator_bytes."
            )

    # ------------------------------------------------------------- user values
    def add_scalar(self, name: str, value: Any, **kwargs) -> None:
        """Record a value of your own (a loss, an accuracy) in the current epoch; the last one wins."""
        if torch.is_tensor(value):
            value = value.item() if value.numel() == 1 else value.detach().cpu().numpy()
        self._user_scalars[name] = value

    def add_scalars(self, prefix: str, value_dict: Dict[str, Any], **kwargs) -> None:
        """Record several values of your own in the current epoch, under ``prefix + key``."""
        for key, value in value_dict.items():
            self.add_scalar(f"{prefix}{key}", value)

    # --------------------------------------------------------------- the epoch
    def compute_statistics(self) -> Tuple[OrderedDict[str, Any], Dict[str, np.ndarray]]:
        """Return the statistics of the current epoch without closing it.

        Returns
        -------
        (OrderedDict, dict)
            ``key -> value`` for every stat (train first, then eval, layers in tracking
            order) and ``key -> (n, 2) array`` for ``embed``.

        """
        # Under torch.distributed these are merged copies of every rank's accumulators.
        covs = distributed.synchronize(self)
        values: OrderedDict[str, Any] = OrderedDict()
        embeds: Dict[str, np.ndarray] = {}
        for mode in MODES:
            wanted = self.stats[mode]
            if not wanted:
                continue
            needed = list(wanted) + (["lsat"] if self.average_sat and "lsat" not in wanted else [])
            saturations = []
            for name in self.layers:
                result = self._layer_result(name, mode, needed, covs[(name, mode)])
                if result is None:
                    continue
                if "lsat" in result:
                    saturations.append(result["lsat"])
                if not self.layerwise_sat:
                    continue
                for stat in wanted:
                    if stat not in result:  # arrays of a stopped epoch: there is nothing to report
                        continue
                    key = f"{mode}-{STATMAP[stat]}_{name}"
                    if stat == "embed":
                        embeds[key] = result[stat]
                    else:
                        values[key] = result[stat]
            if self.average_sat and saturations:
                values[f"average-{mode}-sat"] = float(np.mean(saturations))
        return values, embeds

    def _layer_result(
        self, name: str, mode: str, stats: List[str], cov: TorchCovarianceMatrix
    ) -> Optional[Dict[str, Any]]:
        if not self._recording:
            return {stat: math.nan for stat in stats if stat in SCALAR_STATS}
        state = self._state[(name, mode)]
        if cov.dim is None or cov.count == 0:
            return None
        skipped = cov.skipped_batches
        if skipped and self._first_time("nonfinite", name, mode):
            logger.warning(
                "layer %s (%s): %d batch(es) with NaN/Inf activations were skipped", name, mode, skipped
            )
        elif skipped and self.verbose:
            logger.info(
                "epoch %d layer %s (%s): %d batch(es) with NaN/Inf activations skipped",
                self.epoch,
                name,
                mode,
                skipped,
            )
        with state.lock:
            samples = state.finite_samples()
        try:
            return layer_statistics(
                cov.fix(), stats, self.threshold, self.spectrum_k, samples=samples,
                mean=cov.mean if samples is not None else None,
            )
        except Exception:  # e.g. an eigensolver that does not converge: report NaN, keep training
            logger.exception("layer %s (%s): statistics could not be computed; writing NaN", name, mode)
            return {stat: math.nan for stat in stats if stat in SCALAR_STATS}

    def add_saturations(self, save: bool = True) -> OrderedDict[str, Any]:
        """Close the epoch: compute every statistic, hand it to the writer, save, reset.

        Parameters
        ----------
        save : bool, default True
            Call the writer's ``save()`` after recording.

        Returns
        -------
        OrderedDict
            The values recorded for this epoch (user scalars first).

        """
        if self._closed:
            raise RuntimeError("add_saturations() called on a closed tracker")
        values, embeds = self.compute_statistics()
        if self._recording:
            for name in self.layers:
                if name not in self._called and self._first_time("never called", name):
                    logger.warning(
                        "layer %s saw no forward pass this epoch, so it reports nothing. A layer used only "
                        "through its weights (nn.MultiheadAttention.out_proj is one) never runs its hooks; "
                        "leave it out with ignore_layer_names",
                        name,
                    )
        self._called.clear()
        step = self.epoch
        if self.writer is not None and distributed.is_writer():
            self._safely(self._write_epoch, values, embeds, step, save)
        if self.verbose and distributed.is_writer():
            self._log_epoch(values, step)
        recorded = OrderedDict(self._user_scalars)
        recorded.update(values)
        self._user_scalars.clear()
        for state in self._state.values():
            state.new_epoch(self.reset_covariance)
        self.epoch += 1
        return recorded

    def _write_user_scalars(self, step) -> None:
        for name, value in self._user_scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def _write_epoch(self, values, embeds, step, save) -> None:
        self._write_user_scalars(step)
        self.writer.add_scalars("", values, global_step=step, sample_value_dict=embeds)
        if save:
            self.writer.save()

    def _safely(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # disk full, a broken user writer: log it, keep the run alive
            logger.exception("the writer failed at epoch %d; training goes on", self.epoch)

    def _log_epoch(self, values, step) -> None:
        for key, value in values.items():
            if "saturation" in key or key.startswith("average-"):
                logger.info("epoch %d %s: %.3f", step, key, value)
        if not distributed.is_writer():
            return
        try:
            if self._bars is None:
                self._bars = SaturationBars()
            self._bars.update(values)
        except Exception:  # a console that cannot be drawn on must not stop training
            logger.exception("the console view failed at epoch %d; training goes on", step)

    def save(self) -> None:
        """Ask the writer to persist everything recorded so far."""
        if self.writer is not None and distributed.is_writer():
            self._safely(self.writer.save)

    # ------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        """Stop recording forward passes (statistics of a stopped epoch are NaN)."""
        self._recording = False

    def resume(self) -> None:
        """Record forward passes again after :meth:`stop`."""
        self._recording = True

    def is_recording(self) -> bool:
        """Whether forward passes are being recorded."""
        return self._recording

    def close(self) -> None:
        """Remove every hook this tracker registered and close the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._bars is not None:
            try:
                self._bars.close()
            except Exception:  # a console gone away must not make close() fail
                logger.exception("the console view could not be closed")
        if self.writer is not None and distributed.is_writer():
            if self._user_scalars:  # values given after the last epoch still reach the files
                self._safely(self._write_user_scalars, self.epoch)
                self._safely(self.writer.save)
            self._safely(self.writer.close)

    def __enter__(self) -> CheckLayerSat:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(savefile={self.savefile!r}, layers={list(self.layers)}, epoch={self.epoch})"


#: The name later releases use for :class:`CheckLayerSat`.
SaturationTracker = CheckLayerSat
