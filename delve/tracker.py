"""CheckLayerSat: hooks on a model's layers, epoch-wide covariances, statistics to writers.

The tracker is three parts behind one face: a validated :class:`~delve.config.TrackerConfig`,
a :class:`~delve.recorder.Recorder` whose forward hooks turn every output into rows and
merge them into one accumulator per layer and mode, and the epoch loop of
:meth:`CheckLayerSat.add_saturations`: accumulators merged over ranks
(:mod:`delve.distributed`) → statistics (:func:`delve.epoch.epoch_values`, one
eigendecomposition per layer and mode) → writers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from delve import distributed
from delve.config import DEFAULT_MAX_ACCUMULATOR_BYTES, TrackerConfig
from delve.console import SaturationBars
from delve.covariance import TorchCovarianceMatrix
from delve.discovery import discover_layers
from delve.epoch import EpochValues, epoch_values
from delve.gram import release_workspace
from delve.keys import Key
from delve.recorder import Recorder
from delve.validation import check_row_mask
from delve.writers import AbstractWriter, WriterSpec, build_writer

logger = logging.getLogger(__name__)

__all__ = ["CheckLayerSat", "SaturationTracker"]

_CONFIG_FIELDS = frozenset(field.name for field in dataclasses.fields(TrackerConfig))


def _user_value(name: Any, value: Any) -> Any:
    """Check a value recorded with :meth:`CheckLayerSat.add_scalar` and make it a plain number or array."""
    if not isinstance(name, str):
        raise TypeError(f"add_scalar needs a name (str), got {type(name).__name__} {name!r}")
    if value is None:
        return float("nan")  # "no value this epoch": the epoch's row is still written
    if torch.is_tensor(value):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.numpy()
    array = np.asarray(value) if not isinstance(value, (str, bytes)) else np.asarray(object())
    if array.dtype.kind not in "biuf":
        raise TypeError(f"add_scalar({name!r}, ...) needs a number (or None), got {type(value).__name__} {value!r}")
    return value


class CheckLayerSat:
    """Track the saturation and other eigenspace statistics of a model's layers during training.

    Forward hooks record every output of every tracked layer into float64 covariance
    accumulators, one per layer and mode (``train`` / ``eval``, from the layer's
    ``training`` flag). Each :meth:`add_saturations` call closes an epoch: it computes
    the statistics of the epoch's covariance of every layer and hands them to the
    writers.

    Parameters
    ----------
    savefile : str or os.PathLike
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
        Registered statistics (:data:`delve.metrics.STATMAP`); ``_train`` / ``_eval``
        limits one to a mode.
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
        Target spatial size of the interpolation (``None`` is accepted while
        ``interpolation_strategy`` is ``None``).
    layer_filter : callable, optional
        ``dict name -> module`` in, the ``dict`` of layers to keep out.
    spectrum_k : int, default 5
        Number of leading eigenvalues the ``spectrum`` stat reports.
    float64_products : bool, default False
        Compute batch Gram products in float64 instead of float32 on centred data.
    max_accumulator_bytes : int, default 4 GiB
        Refuse (with an explanation) to allocate a layer's accumulator above this size.
    rows_per_batch : int, optional
        At most this many rows of each recorded batch's data matrix enter the
        covariance (and the ``embed`` samples), drawn uniformly without replacement on
        the batch's device; under a :meth:`row_mask`, among the real rows. ``None``
        (the default) takes every row: the covariance is exact. For wide layers fed
        many rows per batch (a transformer's tokens, a convolution's positions) the
        Gram products cost about as much as the layer itself; a draw of a few hundred
        rows per batch makes them cheap while the epoch's covariance still sees rows
        of every batch. The draw uses the tracker's own seeded generators, never the
        global random stream. ``max_samples`` still counts samples of the batch
        dimension: the rows are drawn from the samples it lets through. Draws smaller
        than a quarter of a layer's width are held back and merged together once they
        reach it (merging costs O(width²) whatever the rows), so a NaN or Inf in one
        batch skips the rows merged with it too.

    Attributes
    ----------
    config : TrackerConfig
        The validated settings; every setting is also readable as an attribute
        (``tracker.sat_threshold``).
    layers : OrderedDict
        ``name -> layer`` of the tracked layers, in tracking order.
    epoch : int
        The number of the epoch being recorded.
    writer : AbstractWriter or None
        Where the statistics go (``None`` with ``nosave`` and on ranks other than 0).

    """

    def __init__(
        self,
        savefile: Union[str, os.PathLike],
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
        interpolation_downsampling: Optional[int] = 32,
        layer_filter: Optional[Callable[[Dict[str, nn.Module]], Dict[str, nn.Module]]] = None,
        spectrum_k: int = 5,
        float64_products: bool = False,
        max_accumulator_bytes: int = DEFAULT_MAX_ACCUMULATOR_BYTES,
        rows_per_batch: Optional[int] = None,
    ):
        config = TrackerConfig(
            savefile=savefile,
            save_to=save_to,
            writer_args={} if writer_args is None else writer_args,
            log_interval=log_interval,
            max_samples=max_samples,
            stats=stats,
            layerwise_sat=layerwise_sat,
            reset_covariance=reset_covariance,
            average_sat=average_sat,
            ignore_layer_names=ignore_layer_names,
            include_conv=include_conv,
            conv_method=conv_method,
            timeseries_method=timeseries_method,
            sat_threshold=sat_threshold,
            nosave=nosave,
            verbose=verbose,
            device=device,
            initial_epoch=initial_epoch,
            interpolation_strategy=interpolation_strategy,
            interpolation_downsampling=interpolation_downsampling,
            layer_filter=layer_filter,
            spectrum_k=spectrum_k,
            float64_products=float64_products,
            max_accumulator_bytes=max_accumulator_bytes,
            rows_per_batch=rows_per_batch,
        )
        self._setup(config, modules)

    @classmethod
    def from_config(cls, config: TrackerConfig, modules: Union[nn.Module, Sequence[nn.Module]]) -> CheckLayerSat:
        """Build a tracker of ``modules`` from settings validated earlier (what the framework callbacks do)."""
        tracker = cls.__new__(cls)
        tracker._setup(config, modules)
        return tracker

    def _setup(self, config: TrackerConfig, modules) -> None:
        if config.savefile is None:
            raise ValueError("savefile must name where the outputs go (e.g. 'runs/my_run'), got None")
        self.config = config
        self.layers = discover_layers(modules, config.include_conv, config.ignore_layer_names, config.layer_filter)
        # Accumulators too big are refused before any file or hook exists.
        self._recorder = Recorder(self.layers, config)
        self.epoch = config.initial_epoch
        self.writer: Optional[AbstractWriter] = None
        # Under torch.distributed only rank 0 writes, so the other ranks make no writer
        # (some writers create files as they are built).
        if not config.nosave and distributed.is_writer():
            folder = os.path.dirname(config.savefile)
            if folder:
                os.makedirs(folder, exist_ok=True)
            self.writer = build_writer(config.save_to, config.savefile, dict(config.writer_args))
            if config.initial_epoch > 0:
                self.writer.resume_from_saved_state(config.initial_epoch)
        self._user_scalars: OrderedDict[str, Any] = OrderedDict()
        self._closed = False
        self._bars: Optional[SaturationBars] = None  # the console view of verbose=True, made at the first epoch end
        self._recorder.attach()

    def __getattr__(self, name: str) -> Any:
        # Every setting reads as an attribute, as the tracker's own arguments did.
        config = self.__dict__.get("config")
        if config is not None and name in _CONFIG_FIELDS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def accumulator(self, layer: str, mode: str = "train") -> TorchCovarianceMatrix:
        """Return the covariance accumulator of one tracked layer in one mode (this rank's rows).

        Raises
        ------
        KeyError
            For a layer that is not tracked or a mode without stats.

        """
        return self._recorder.accumulator(layer, mode)

    @contextlib.contextmanager
    def row_mask(self, mask: Optional[torch.Tensor]) -> Iterator[None]:
        """Record only the real positions of the sequences of the forward passes inside the block.

        ``with tracker.row_mask(batch["attention_mask"]): model(**batch)``: padded
        positions are then left out of every tracked sequence output whose leading
        dimensions are ``(batch, time)`` (``(time, batch)`` for time-major recurrent and
        attention layers). ``timestepwise`` keeps the rows where the mask is true;
        ``last_timestep`` takes each sequence's last true position, for left and right
        padding alike, and nothing from a sequence with none. Outputs of other shapes
        (pooled ``(batch, features)`` heads, feature maps) are unaffected, and so is an
        output whose own sequence length differs from the mask's (a decoder's). Nothing
        waits for the device: padded rows get zero weight instead of being cut out.
        ``max_samples`` still counts samples of the batch dimension. Under
        ``nn.DataParallel`` each replica sees a slice of the batch, which the mask does
        not describe: it applies to nothing there.

        Parameters
        ----------
        mask : torch.Tensor or None
            ``(batch, time)``, boolean or 0/1 (nonzero is real), best on the model's
            device. ``None`` masks nothing.

        Raises
        ------
        TypeError, ValueError
            For a mask that is not a two-dimensional real or boolean tensor.

        """
        checked = check_row_mask("mask", mask)
        previous = self._recorder.row_mask
        self._recorder.row_mask = checked
        try:
            yield
        finally:
            self._recorder.row_mask = previous

    # ------------------------------------------------------------- user values
    def add_scalar(self, name: str, value: Any, **kwargs) -> None:
        """Record a value of your own (a loss, an accuracy) in the current epoch; the last one wins.

        ``None`` records NaN (the epoch's statistics are written either way).

        Raises
        ------
        TypeError
            For a name that is not a string or a value that is not a number.

        """
        self._user_scalars[name] = _user_value(name, value)

    def add_scalars(self, prefix: str, value_dict: Dict[str, Any], **kwargs) -> None:
        """Record several values of your own in the current epoch, under ``prefix + key``."""
        for key, value in value_dict.items():
            self.add_scalar(f"{prefix}{key}", value)

    # --------------------------------------------------------------- the epoch
    def compute_statistics(self) -> EpochValues:
        """Return the statistics of the current epoch without closing it.

        Under ``torch.distributed`` this is a collective call: every rank's rows are merged.

        Returns
        -------
        (OrderedDict, dict)
            ``key -> value`` for every stat (train first, then eval, layers in tracking
            order) and ``key -> (n, 2) array`` for ``embed``; keys are
            :class:`~delve.keys.Key` strings.

        """
        self._recorder.flush()
        records = self._recorder.records
        merged = distributed.synchronize({key: record.accumulator for key, record in records.items()})
        if self._recorder.recording:
            self._report_skipped(merged)
        return epoch_values(
            self.config,
            list(self.layers),
            merged,
            lambda name, mode: records[(name, mode)].finite_samples(),
            self._recorder.recording,
        )

    def _report_skipped(self, accumulators: Dict[Any, Optional[TorchCovarianceMatrix]]) -> None:
        for (name, mode), accumulator in accumulators.items():
            skipped = 0 if accumulator is None else accumulator.skipped_batches
            if skipped and self._recorder.first_time("nonfinite", name, mode):
                logger.warning("layer %s (%s): %d batch(es) with NaN/Inf activations were skipped", name, mode, skipped)
            elif skipped and self.config.verbose:
                logger.info(
                    "epoch %d layer %s (%s): %d batch(es) with NaN/Inf activations skipped", self.epoch, name, mode,
                    skipped,
                )

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
        values, samples = self.compute_statistics()
        if self._recorder.recording:
            self._recorder.warn_silent_layers()
        step = self.epoch
        if self.writer is not None and distributed.is_writer():
            self._safely(self._write_epoch, values, samples, step, save)
        if self.config.verbose and distributed.is_writer():
            self._log_epoch(values, step)
        recorded = OrderedDict(self._user_scalars)
        recorded.update(values)
        self._user_scalars.clear()
        self._recorder.new_epoch(self.config.reset_covariance)
        self.epoch += 1
        return recorded

    def _write_user_scalars(self, step) -> None:
        for name, value in self._user_scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def _write_epoch(self, values, samples, step, save) -> None:
        self._write_user_scalars(step)
        self.writer.add_scalars("", values, global_step=step, sample_value_dict=samples)
        if save:
            self.writer.save()

    def _safely(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # disk full, a broken user writer: log it, keep the run alive
            logger.exception("the writer failed at epoch %d; training goes on", self.epoch)

    def _log_epoch(self, values: Dict[Key, Any], step: int) -> None:
        for key, value in values.items():
            if isinstance(key, Key) and key.stat == "lsat":
                logger.info("epoch %d %s: %.3f", step, key, value)
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
        self._recorder.recording = False

    def resume(self) -> None:
        """Record forward passes again after :meth:`stop`."""
        self._recorder.recording = True

    def is_recording(self) -> bool:
        """Whether forward passes are being recorded."""
        return self._recorder.recording

    def close(self) -> None:
        """Remove every hook this tracker registered, close the writer and free scratch memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._recorder.remove()
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
        release_workspace()

    def __enter__(self) -> CheckLayerSat:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(savefile={self.config.savefile!r}, layers={list(self.layers)}, epoch={self.epoch})"


#: The name later releases use for :class:`CheckLayerSat`.
SaturationTracker = CheckLayerSat
