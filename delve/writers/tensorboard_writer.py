"""The TensorBoard writer: scalars grouped by statistic, step = epoch, and the heatmaps as images."""

from __future__ import annotations

import glob
import logging
import math
import os
import struct
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set

import numpy as np
import pandas as pd
import torch

from delve import plotting  # matplotlib is imported by the first picture only
from delve.keys import Key, history_tag, parse_key, parse_tag
from delve.table import stat_groups
from delve.validation import check_flag
from delve.writers.base import AbstractWriter

logger = logging.getLogger(__name__)

#: What a file name of TensorBoard events holds (tensorboardX and TensorBoard both write it).
EVENT_FILES = "*tfevents*"


class TensorBoardWriter(AbstractWriter):
    """Write TensorBoard event files into the folder ``savepath``.

    Every value is a scalar at step = epoch, under a tag grouped by statistic and mode,
    so that TensorBoard shows one section per statistic and mode with one card per
    layer: ``{mode}-{stem}/{layer}`` (``train-saturation/features-0``), the average
    ``{mode}-saturation/average``; values recorded with ``tracker.add_scalar`` keep
    their own names. A vector statistic such as ``spectrum`` (the ``k`` leading
    eigenvalues) becomes one tag per entry, ``{mode}-{stem}/{layer}/rank-{i}`` with
    ``i = 1 … k`` (rank 1 is the largest eigenvalue). Arrays such as ``cov`` and
    ``embed`` are not written (the npy writer stores them). See :mod:`delve.keys`.

    With ``images=True``, each save also writes, for every scalar statistic and mode
    it received, the layers × epochs heatmap of the run so far as an image at step =
    epoch, tag ``{mode}-{stem}/history``: the picture the plot writer saves as
    ``{savefile}_{stat}_{mode}_history.png``, drawn by the same code
    (:func:`delve.plotting.history_figure`).

    Every save closes the event file it wrote to, so the epoch is on disk when the save
    returns (a run killed later keeps it); the next epoch goes to a new file in the same
    folder, which TensorBoard reads as one run.

    Each run writes its own event file and starts it with a purge marker at its first
    epoch, so TensorBoard hides the steps (scalars and images) an earlier run wrote at
    or after that epoch: a run resumed with ``initial_epoch=k`` continues the curves at
    ``k`` without duplicated or lost steps, and its heatmaps cover the earlier epochs
    too (read back from the folder's event files); a new run (``initial_epoch=0``) in
    the same folder replaces the old curves. A purge applies to every tag of the
    folder, so give any other ``SummaryWriter`` a folder of its own (a sibling folder
    shows up as another run under the same ``tensorboard --logdir``).

    Parameters
    ----------
    savepath : str
        The log folder (``logdir``).
    flush_secs : int, default 120
        How often tensorboardX flushes pending events on its own between saves (values
        only arrive just before a save, so this rarely matters).
    images : bool, default True
        Write the heatmaps as images. Each costs about as much as one history PNG of the
        plot writer; ``False`` writes scalars only (and never imports matplotlib).
    fontsize : float, default 10
        Font size of the images' labels and titles.
    figsize : (float, float), default (10, 6)
        Size of the images in inches, at 100 pixels per inch.

    """

    def __init__(
        self,
        savepath: str,
        flush_secs: int = 120,
        images: bool = True,
        fontsize: float = plotting.DEFAULT_FONTSIZE,
        figsize: Sequence[float] = plotting.DEFAULT_FIGSIZE,
    ):
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, int) or flush_secs < 1:
            raise ValueError(f"flush_secs must be a positive integer, got {flush_secs!r}")
        self.images = check_flag("images", images)
        self.fontsize, self.figsize = plotting.check_plot_options(fontsize, figsize)
        self.savepath = savepath
        self.flush_secs = flush_secs
        self._purge_step: Optional[int] = 0
        self._writer = None
        self._step = 0
        #: epoch -> the scalar statistics of every layer, for the heatmaps.
        self._history: Dict[int, Dict[Key, float]] = {}
        self._columns: List[Key] = []
        self._undrawn: Set[int] = set()  # epochs whose heatmaps are still to be written

    def _summary_writer(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter  # imported on first use: it is slow to import

            # tensorboardX names files by the second; two runs within one second would share
            # a name, and TensorBoard reads files in name order, so add a finer timestamp.
            self._writer = SummaryWriter(
                logdir=self.savepath,
                purge_step=self._purge_step,
                flush_secs=self.flush_secs,
                filename_suffix=f".{time.time_ns()}",
            )
            # Only a run's first file purges; one reopened after close() continues it.
            self._purge_step = None
        return self._writer

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        if self._writer is not None or self._purge_step is None:
            logger.warning("the TensorBoard writer has already written; resume at epoch %d ignored", initial_epoch)
            return
        if not glob.glob(os.path.join(glob.escape(self.savepath), EVENT_FILES)):
            logger.warning("no TensorBoard events to resume in %s; starting at epoch %d", self.savepath, initial_epoch)
        self._purge_step = int(initial_epoch)
        if self.images:
            for tag, steps in read_scalars(self.savepath).items():
                key = parse_tag(tag)
                if key is None or key.is_average or not key.statistic.is_scalar:
                    continue
                for step, value in steps.items():
                    if step < initial_epoch:
                        self._remember(key, value, step)

    def _remember(self, key: Key, value: float, step: int) -> None:
        if key not in self._columns:
            self._columns.append(key)
        self._history.setdefault(step, {})[key] = value

    def _put(self, name: str, value: Any, step: Optional[int]) -> None:
        if step is not None:
            self._step = int(step)
        if torch.is_tensor(value):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            return
        key = parse_key(name)
        if array.ndim == 0:
            self._summary_writer().add_scalar(name if key is None else key.tag, float(array), global_step=self._step)
            if self.images and key is not None and not key.is_average and key.statistic.is_scalar:
                self._remember(key, float(array), self._step)
                self._undrawn.add(self._step)
            return
        if key is not None and key.statistic.kind == "vector" and array.ndim == 1:
            writer = self._summary_writer()
            for rank, entry in enumerate(array, start=1):
                writer.add_scalar(key.entry_tag(rank), float(entry), global_step=self._step)

    def add_scalar(self, name, value, global_step=None, **kwargs):
        self._put(name, value, global_step)

    def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
        for key, value in value_dict.items():
            self._put(f"{prefix}{key}", value, global_step)

    def _write_images(self) -> None:
        writer = self._summary_writer()
        epochs = sorted(self._undrawn)
        self._undrawn.clear()  # a picture that fails is not retried at every save
        for epoch in epochs:
            shown = [e for e in sorted(self._history) if e <= epoch]
            table = pd.DataFrame([self._history[e] for e in shown], index=shown, columns=self._columns)
            present = {(k.stat, k.mode) for k, v in self._history.get(epoch, {}).items() if not math.isnan(v)}
            for stat, mode in stat_groups(self._columns):
                if (stat, mode) in present:
                    figure = plotting.history_figure(table, stat, mode, self.fontsize, self.figsize)
                    add_png(writer, history_tag(mode, stat), plotting.png_bytes(figure), epoch)

    def save(self):
        try:
            if self._undrawn:
                self._write_images()
        finally:
            # The scalars reach the disk even if a picture fails. tensorboardX writes from a
            # thread of its own, and its flush() does not wait for the events still queued;
            # closing does. So a saved epoch is on disk when save() returns, and the next
            # epoch's values open a new file in the folder.
            self.close()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def add_png(writer, tag: str, png: bytes, step: int) -> None:
    """Write PNG bytes as an image event of a tensorboardX ``SummaryWriter``, as they are."""
    from tensorboardX.proto.summary_pb2 import Summary

    width, height = struct.unpack(">II", png[16:24])  # the PNG header's first chunk (IHDR)
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), global_step=step)


def _records(path: str) -> Iterator[bytes]:
    """Yield the records of an event file; a record cut short (a killed run) ends it."""
    with open(path, "rb") as handle:
        while True:
            header = handle.read(12)  # length (8 bytes) and its checksum (4)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = handle.read(length)
            if len(data) < length or len(handle.read(4)) < 4:
                return
            yield data


def read_scalars(folder: str) -> Dict[str, Dict[int, float]]:
    """Read the scalars TensorBoard shows from a folder's event files: ``tag -> {step: value}``.

    Files are read in name order (TensorBoard's), and a run's purge marker (a session
    start at step ``s``) hides the steps ``>= s`` written before it, as TensorBoard does.
    A file that cannot be read is skipped with a warning.
    """
    from google.protobuf.message import DecodeError
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars: Dict[str, Dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), EVENT_FILES))):
        try:
            for record in _records(path):
                event = Event.FromString(record)
                if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                    for steps in scalars.values():
                        for step in [s for s in steps if s >= event.step]:
                            del steps[step]
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        scalars.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
        except (OSError, DecodeError) as err:
            logger.warning("could not read the TensorBoard events in %s (%s); the heatmaps go without them", path, err)
    return scalars
