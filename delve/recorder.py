"""The forward hooks and what they record: one accumulator per tracked layer and mode.

A hook receives a layer's output, its :class:`~delve.layers.LayerType` turns it into rows
(a view where it can), and the layer's :class:`~delve.covariance.TorchCovarianceMatrix`
for the current mode (``train`` / ``eval``, from the layer's ``training`` flag) merges
them. Counting, ``log_interval``, ``max_samples`` and the rows kept for ``embed`` happen
here too; nothing in a hook stops training for a reason it can recover from.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from delve._runtime import in_backward, run_eagerly
from delve.activations import first_rows
from delve.config import TrackerConfig
from delve.covariance import TorchCovarianceMatrix, covariance_bytes
from delve.layers import LayerType, feature_width, layer_type

logger = logging.getLogger(__name__)

__all__ = ["EMBED_SAMPLES", "LayerRecord", "Recorder", "check_memory"]

#: The most samples an epoch keeps per layer and mode for ``embed``.
EMBED_SAMPLES = 1000


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def check_memory(name: str, dim: int, limit: int) -> None:
    """Refuse, with what to do about it, an accumulator of ``dim`` features over ``limit`` bytes.

    Raises
    ------
    MemoryError
        Naming the layer, its width, the bytes needed and the ways out.

    """
    needed = covariance_bytes(dim)
    if needed > limit:
        raise MemoryError(
            f"layer {name!r} has {dim} features: its covariance accumulator needs "
            f"{needed} bytes ({_human_bytes(needed)}), over max_accumulator_bytes={limit} "
            f"({_human_bytes(limit)}). Use conv_method='channelwise' (one feature per channel) or "
            "'mean', set interpolation_strategy to shrink feature maps, leave the layer out with "
            "ignore_layer_names or layer_filter, or raise max_accumulator_bytes."
        )


class LayerRecord:
    """Everything recorded for one layer in one mode during the current epoch."""

    __slots__ = ("accumulator", "calls", "seen", "samples", "sample_rows", "lock")

    def __init__(self, device: Optional[torch.device], float64_products: bool):
        self.accumulator = TorchCovarianceMatrix(device=device, float64_products=float64_products)
        self.calls = 0
        self.seen = 0
        # (rows, all-finite flag of their batch); the flag stays on the device until the epoch ends.
        self.samples: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.sample_rows = 0
        # Hooks of nn.DataParallel replicas run in threads.
        self.lock = threading.Lock()

    def new_epoch(self, reset_covariance: bool) -> None:
        """Forget the epoch's counts and samples (and, with ``reset_covariance``, its rows)."""
        with self.lock:
            if reset_covariance:
                self.accumulator.reset()
            self.calls = 0
            self.seen = 0
            self.samples = []
            self.sample_rows = 0

    def finite_samples(self) -> Optional[torch.Tensor]:
        """Return the recorded embedding rows, without those of batches the accumulator skipped."""
        with self.lock:
            kept = [rows for rows, finite in self.samples if bool(finite)]
        if not kept:
            return None
        # nn.DataParallel replicas record on their own GPUs; gather where the covariance is.
        n = self.accumulator.n
        device = n.device if n is not None else kept[0].device
        return torch.cat([rows.to(device) for rows in kept])


class _LayerHook:
    """The forward hook on one tracked layer: hands its output to the recorder while it records.

    ``nn.DataParallel`` replicas share it. A copy of the model (``copy.deepcopy`` for an
    EMA model or a kept best model, or ``torch.save(model)``) gets an :class:`_InertHook`
    instead: the copy must neither feed this tracker nor need it to be pickled.
    """

    __slots__ = ("recorder", "name", "kind")

    def __init__(self, recorder: Recorder, name: str, kind: LayerType):
        self.recorder = recorder
        self.name = name
        self.kind = kind

    def __call__(self, module: nn.Module, inputs, output) -> None:
        if self.recorder.recording:
            self.recorder.record(self.name, self.kind, module, output)

    def __reduce__(self):
        return (_InertHook, ())


class _InertHook:
    """What a tracker's hook becomes in a copy of the model: nothing."""

    def __call__(self, module: nn.Module, inputs, output) -> None:
        return None


class Recorder:
    """Hooks on the tracked layers and the per-layer, per-mode records they fill.

    Whoever attaches removes: :meth:`attach` registers the hooks, :meth:`remove` takes
    them all off again.

    Parameters
    ----------
    layers : OrderedDict
        ``name -> layer``, in tracking order.
    config : TrackerConfig
        The settings (``stats`` decides which modes are recorded).

    Raises
    ------
    MemoryError
        When a layer's accumulator would exceed ``max_accumulator_bytes`` (checked before
        any hook is registered, for every layer whose width its definition tells).

    """

    def __init__(self, layers: OrderedDict[str, nn.Module], config: TrackerConfig):
        self.layers = layers
        self.config = config
        self.options = config.row_options
        self.recording = True
        # Refuse an accumulator too big for memory now, before any hook or tensor exists;
        # layers whose width depends on the input are checked at their first batch.
        if config.modes:
            for name, layer in layers.items():
                width = feature_width(layer, self.options)
                if width is not None:
                    check_memory(name, width, config.max_accumulator_bytes)
        self.records: Dict[Tuple[str, str], LayerRecord] = {
            (name, mode): LayerRecord(config.device, config.float64_products)
            for name in layers
            for mode in config.modes
        }
        self.called: Set[str] = set()  # layers whose hook ran this epoch
        self._warned: Set[tuple] = set()
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        """Register the forward hooks (once everything else about the tracker stands)."""
        if not self._handles:
            self._handles = [
                layer.register_forward_hook(_LayerHook(self, name, layer_type(layer)))
                for name, layer in self.layers.items()
            ]

    def first_time(self, *key) -> bool:
        """Return whether ``key`` is new: for what is logged once per tracker."""
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

    def accumulator(self, layer: str, mode: str) -> TorchCovarianceMatrix:
        """Return the accumulator of one layer in one mode.

        Raises
        ------
        KeyError
            Naming the tracked layers and recorded modes, for anything else.

        """
        record = self.records.get((layer, mode))
        if record is None:
            raise KeyError(
                f"no accumulator for layer {layer!r} in mode {mode!r}; layers: {list(self.layers)}, "
                f"recorded modes: {list(self.config.modes)}"
            )
        return record.accumulator

    @run_eagerly
    def record(self, name: str, kind: LayerType, module: nn.Module, output) -> None:
        """Feed one forward pass of one layer into its accumulator."""
        if in_backward():  # a checkpoint recomputing activations the forward pass recorded
            return
        self.called.add(name)
        mode = "train" if module.training else "eval"
        record = self.records.get((name, mode))
        if record is None:
            return
        # Counting, the max_samples budget and the embedding rows are one atomic step,
        # so concurrent replicas neither lose calls nor overshoot max_samples. The
        # reshaping is views and cheap kernels; the covariance update runs unlocked.
        with record.lock:
            record.calls += 1
            if record.calls % self.config.log_interval:
                return
            limit = self.config.max_samples
            remaining = None if limit is None else limit - record.seen
            if remaining is not None and remaining <= 0:
                return
            rows = self._rows(name, kind, module, output, remaining)
            if rows is None or not self._accepts(name, record.accumulator, rows[0]):
                return
            x, batch = rows
            record.seen += batch
            if "embed" in self.config.stats[mode] and record.sample_rows < EMBED_SAMPLES:
                keep = first_rows(x, EMBED_SAMPLES - record.sample_rows)
                # A batch the accumulator skips (NaN/Inf) must not reach the embedding either.
                record.samples.append((keep, torch.isfinite(x).all()))
                record.sample_rows += keep.shape[0]
        try:
            record.accumulator.update_rows(x)  # the accumulator brings x to its own device
        except Exception:  # a device out of memory, say: skip the batch, keep training
            if self.first_time("update", name):
                logger.exception("layer %s: a batch could not be added to its covariance; it is skipped", name)

    def _rows(self, name: str, kind: LayerType, module: nn.Module, output, limit: Optional[int]):
        try:
            with torch.no_grad():
                return kind.rows(module, output, self.options, limit)
        except Exception:  # a layer whose output we cannot read must not stop training
            if self.first_time("unreadable", name):
                logger.exception("layer %s: cannot make a data matrix from its output; it is skipped", name)
            return None

    def _accepts(self, name: str, accumulator: TorchCovarianceMatrix, x: torch.Tensor) -> bool:
        width = x.shape[-1]
        if accumulator.dim is None:
            check_memory(name, width, self.config.max_accumulator_bytes)
            return True
        if width == accumulator.dim:
            return True
        if self.first_time("width", name):  # conv_method='flatten' on maps of another size
            logger.error(
                "layer %s: a batch has %d features where the layer's first batch had %d; such batches are "
                "skipped (use conv_method='channelwise' or an interpolation_strategy)",
                name,
                width,
                accumulator.dim,
            )
        return False

    def new_epoch(self, reset_covariance: bool) -> None:
        """Start the next epoch: counts and samples cleared, accumulators reset if asked."""
        for record in self.records.values():
            record.new_epoch(reset_covariance)
        self.called.clear()

    def remove(self) -> None:
        """Remove every hook this recorder registered. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
