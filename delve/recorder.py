"""The forward hooks and what they record: one accumulator per tracked layer and mode.

A hook receives a layer's output, its :class:`~delve.layers.LayerType` turns it into rows
(a view where it can), and the layer's :class:`~delve.covariance.TorchCovarianceMatrix`
for the current mode (``train`` / ``eval``, from the layer's ``training`` flag) merges
them. Counting, ``log_interval``, ``max_samples``, the row mask, the draw of
``rows_per_batch`` and the rows kept for ``embed`` happen here too; nothing in a
hook stops training for a reason it can recover from, and nothing in it waits for
the device.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from delve._runtime import in_backward, run_eagerly
from delve.activations import Rows, draw_rows, first_rows
from delve.config import TrackerConfig
from delve.covariance import TorchCovarianceMatrix, covariance_bytes
from delve.layers import LayerType, feature_width, layer_rows, layer_type

logger = logging.getLogger(__name__)

__all__ = ["EMBED_SAMPLES", "ROW_DRAW_SEED", "EmbedSamples", "LayerRecord", "Recorder", "check_memory"]

#: The most samples an epoch keeps per layer and mode for ``embed``.
EMBED_SAMPLES = 1000
#: Seed of the tracker's own generators for ``rows_per_batch`` (offset by device index and rank).
ROW_DRAW_SEED = 20261202
#: Rows drawn by ``rows_per_batch`` are held back until a layer of ``d`` features has
#: ``d / HELD_FRACTION`` of them. Merging a batch costs O(d²) besides its Gram product
#: (the float64 state is read and written whole: 14 ms for d = 3072 on a 2-core CPU),
#: which a draw of a few rows would pay at every batch; ``d / 4`` rows make the product
#: the larger part, and hold at most 1/8 of the memory of the accumulator itself.
HELD_FRACTION = 4


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


class EmbedSamples:
    """The first :data:`EMBED_SAMPLES` real rows of an epoch's finite batches, gathered on the device.

    Which rows are real (a row mask) and whether a batch is finite (the accumulator skips
    it otherwise) are known on the device only; counting them on the host would make the
    training step wait for it. So every batch offers its first real rows, and a fixed
    buffer takes as many as it still has room for, by device-side arithmetic.
    """

    __slots__ = ("rows", "filled")

    def __init__(self) -> None:
        self.rows: Optional[torch.Tensor] = None  # (EMBED_SAMPLES, features) float32
        self.filled: Optional[torch.Tensor] = None  # int64 0-d: the rows in use

    def offer(self, x: torch.Tensor, valid: Optional[torch.Tensor]) -> None:
        """Keep the leading real rows of a batch of rows ``(..., features)`` if there is room."""
        features = x.shape[-1]
        if valid is None:
            candidates = first_rows(x, EMBED_SAMPLES)
            count = torch.isfinite(x).all() * candidates.shape[0]
        else:
            flat = valid.reshape(-1)
            # The real rows first, in their order; the padding after them is never taken.
            order = torch.argsort((~flat).to(torch.uint8), stable=True)[:EMBED_SAMPLES]
            candidates = x.reshape(-1, features)[order].detach().to(torch.float32)
            count = (torch.isfinite(x).all(-1) | ~valid).all() * flat.sum()
        if candidates.shape[0] == 0:
            return
        if self.rows is None:
            self.rows = torch.zeros(EMBED_SAMPLES, features, dtype=torch.float32, device=x.device)
            self.filled = torch.zeros((), dtype=torch.int64, device=x.device)
        device = self.rows.device  # nn.DataParallel replicas offer from their own GPUs
        candidates = candidates.to(device, non_blocking=True)
        count = count.to(device, non_blocking=True).clamp_max(candidates.shape[0])
        # Slot j takes candidate j - filled while that is one of the `count` taken.
        source = torch.arange(EMBED_SAMPLES, device=device) - self.filled
        take = (source >= 0) & (source < count)
        self.rows = torch.where(take.unsqueeze(1), candidates[source.clamp(0, candidates.shape[0] - 1)], self.rows)
        self.filled = (self.filled + count).clamp_max(EMBED_SAMPLES)

    def take(self) -> Optional[torch.Tensor]:
        """Return the rows gathered (reads their number from the device), or ``None`` if there are none."""
        if self.rows is None:
            return None
        filled = int(self.filled)
        return self.rows[:filled] if filled else None


class LayerRecord:
    """Everything recorded for one layer in one mode during the current epoch."""

    __slots__ = ("accumulator", "calls", "seen", "samples", "lock", "held", "held_rows")

    def __init__(self, device: Optional[torch.device], float64_products: bool):
        self.accumulator = TorchCovarianceMatrix(device=device, float64_products=float64_products)
        self.calls = 0
        self.seen = 0
        self.samples = EmbedSamples()
        # Hooks of nn.DataParallel replicas run in threads.
        self.lock = threading.Lock()
        self.held: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = []  # drawn rows not merged yet
        self.held_rows = 0

    @property
    def held_width(self) -> Optional[int]:
        """The feature width of the rows held back, if any."""
        return self.held[0][0].shape[-1] if self.held else None

    def hold(self, rows: Rows) -> Optional[Rows]:
        """Hold back a draw of rows; return all held rows once they are enough to merge (call under :attr:`lock`).

        A draw is copied: the layer output it may be a view of can change in place later.
        """
        width = rows.data.shape[-1]
        data = rows.data.detach().reshape(-1, width).clone()
        self.held.append((data, None if rows.valid is None else rows.valid.reshape(-1).clone()))
        self.held_rows += data.shape[0]
        return self.take_held() if self.held_rows >= _enough_rows(width) else None

    def take_held(self) -> Optional[Rows]:
        """Return the rows held back as one batch, and hold none (call under :attr:`lock`)."""
        if not self.held:
            return None
        held, self.held, self.held_rows = self.held, [], 0
        device = held[0][0].device  # nn.DataParallel replicas hold rows on their own GPUs
        data = torch.cat([rows.to(device, non_blocking=True) for rows, _ in held])
        valid = None
        if any(flags is not None for _, flags in held):
            valid = torch.cat([
                torch.ones(rows.shape[0], dtype=torch.bool, device=device) if flags is None else flags.to(device)
                for rows, flags in held
            ])
        return Rows(data, len(held), valid)

    def new_epoch(self, reset_covariance: bool) -> None:
        """Forget the epoch's counts and samples (and, with ``reset_covariance``, its rows)."""
        with self.lock:
            if reset_covariance:
                self.accumulator.reset()
            self.held, self.held_rows = [], 0
            self.calls = 0
            self.seen = 0
            self.samples = EmbedSamples()

    def finite_samples(self) -> Optional[torch.Tensor]:
        """Return the recorded embedding rows, without those of batches the accumulator skipped."""
        with self.lock:
            kept = self.samples.take()
        if kept is None:
            return None
        # nn.DataParallel replicas record on their own GPUs; gather where the covariance is.
        n = self.accumulator.n
        return kept if n is None else kept.to(n.device)


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

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self.recorder.recording:
            mask = self.recorder.row_mask
            if self.kind.call_mask is not None:
                mask = _combined(mask, self.kind.call_mask(module, args, kwargs))
            self.recorder.record(self.name, self.kind, module, output, mask)

    def __reduce__(self):
        return (_InertHook, ())


class _InertHook:
    """What a tracker's hook becomes in a copy of the model: nothing."""

    def __call__(self, *arguments) -> None:
        return None


def _combined(row_mask: Optional[torch.Tensor], own: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Return the positions both the row mask and the layer's own call keep (where both describe them)."""
    if own is None:
        return row_mask
    if row_mask is None or row_mask.shape != own.shape:
        return own
    return row_mask & own.to(row_mask.device)


def _row_count(rows: Rows) -> int:
    return math.prod(rows.data.shape[:-1])


def _enough_rows(width: int) -> int:
    """Return the rows worth merging at once into an accumulator of ``width`` features (:data:`HELD_FRACTION`)."""
    return max(1, width // HELD_FRACTION)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


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
        #: The ``(batch, time)`` boolean mask of real positions of the forward passes under way, if any.
        self.row_mask: Optional[torch.Tensor] = None
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
        self.called: Set[Tuple[str, str]] = set()  # (layer, mode) of the hooks that ran this epoch
        # rows_per_batch draws from these, never from the global stream: training with and
        # without the tracker consumes the same random numbers.
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._generators_lock = threading.Lock()
        self._warned: Set[tuple] = set()
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        """Register the forward hooks (once everything else about the tracker stands)."""
        if not self._handles:
            self._handles = [
                # With the call's arguments: a layer type may read its own padding from them.
                layer.register_forward_hook(_LayerHook(self, name, layer_type(layer)), with_kwargs=True)
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
        self._flush(layer, record)
        return record.accumulator

    def flush(self) -> None:
        """Merge every row still held back (``rows_per_batch``) into its accumulator: before an epoch's statistics."""
        for (name, _), record in self.records.items():
            self._flush(name, record)

    def _flush(self, name: str, record: LayerRecord) -> None:
        with record.lock:
            rows = record.take_held()
        if rows is not None:
            self._merge(name, record, rows)

    @run_eagerly
    def record(
        self, name: str, kind: LayerType, module: nn.Module, output, mask: Optional[torch.Tensor] = None
    ) -> None:
        """Feed one forward pass of one layer into its accumulator (only the real positions, under a mask)."""
        if in_backward():  # a checkpoint recomputing activations the forward pass recorded
            return
        mode = "train" if module.training else "eval"
        self.called.add((name, mode))
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
            rows = self._rows(name, kind, module, output, remaining, mask)
            if rows is None or not self._accepts(name, record, rows.data):
                return
            record.seen += rows.samples
            if "embed" in self.config.stats[mode]:
                record.samples.offer(rows.data, rows.valid)
            if self.config.rows_per_batch is not None and _row_count(rows) < _enough_rows(rows.data.shape[-1]):
                rows = record.hold(rows)
                if rows is None:
                    return
        self._merge(name, record, rows)

    def _merge(self, name: str, record: LayerRecord, rows: Rows) -> None:
        try:
            record.accumulator.update_rows(rows.data, rows.valid)  # the accumulator brings them to its device
        except Exception:  # a device out of memory, say: skip the batch, keep training
            if self.first_time("update", name):
                logger.exception("layer %s: a batch could not be added to its covariance; it is skipped", name)

    def _rows(
        self, name: str, kind: LayerType, module: nn.Module, output, limit: Optional[int], mask
    ) -> Optional[Rows]:
        try:
            with torch.no_grad():
                rows = layer_rows(kind, module, output, self.options, limit, mask)
                count = self.config.rows_per_batch
                if count is None:
                    return rows
                return draw_rows(rows, count, self.generator(rows.data.device))
        except Exception:  # a layer whose output we cannot read must not stop training
            if self.first_time("unreadable", name):
                logger.exception("layer %s: cannot make a data matrix from its output; it is skipped", name)
            return None

    def generator(self, device: torch.device) -> torch.Generator:
        """Return the tracker's generator for ``device`` (made at first use, with a fixed seed).

        Each device (and each rank of a distributed run) gets its own seed, so replicas do
        not draw the same positions of their batches. A device without generators of its
        own gets a CPU one (its keys are then copied over).
        """
        with self._generators_lock:  # nn.DataParallel replicas ask from their threads
            generator = self._generators.get(device)
            if generator is None:
                seed = ROW_DRAW_SEED + 1000 * _rank() + (device.index or 0)
                try:
                    generator = torch.Generator(device=device)
                except RuntimeError:
                    generator = torch.Generator()
                generator.manual_seed(seed)
                self._generators[device] = generator
            return generator

    def _accepts(self, name: str, record: LayerRecord, x: torch.Tensor) -> bool:
        width = x.shape[-1]
        expected = record.accumulator.dim or record.held_width
        if expected is None:
            check_memory(name, width, self.config.max_accumulator_bytes)
            return True
        if width == expected:
            return True
        if self.first_time("width", name):  # conv_method='flatten' on maps of another size
            logger.error(
                "layer %s: a batch has %d features where the layer's first batch had %d; such batches are "
                "skipped (use conv_method='channelwise' or an interpolation_strategy)",
                name,
                width,
                expected,
            )
        return False

    def warn_silent_layers(self) -> None:
        """Warn, once per layer (and mode), about tracked layers whose hooks did not run this epoch."""
        heard = {name for name, _ in self.called}
        active = {mode for _, mode in self.called if mode in self.config.modes}  # modes other layers ran in
        for name in self.layers:
            if name not in heard:
                if self.first_time("never called", name):
                    logger.warning(
                        "layer %s saw no forward pass this epoch, so it reports nothing. A layer used only "
                        "through its weights (by a parent calling F.linear with them) never runs its hooks; "
                        "leave it out with ignore_layer_names",
                        name,
                    )
                continue
            for mode in sorted(active):
                if (name, mode) not in self.called and self.first_time("never called", name, mode):
                    logger.warning(
                        "layer %s saw no %s forward pass this epoch while other tracked layers did, so it reports "
                        "no %s statistics. Either the model skips it in that mode, or a fused fast path ran "
                        "the layer without calling it: on PyTorch versions whose nn.TransformerEncoderLayer "
                        "takes its fast path in evaluation under no_grad despite hooks, "
                        "torch.backends.mha.set_fastpath_enabled(False) makes it visible again",
                        name,
                        mode,
                        mode,
                    )

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
