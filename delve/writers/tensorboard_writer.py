"""The TensorBoard writer: every scalar as a tag, step = epoch, in tensorboardX event files."""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any, Optional

import numpy as np
import torch

from delve.keys import parse_key
from delve.writers.base import AbstractWriter

logger = logging.getLogger(__name__)


class TensorBoardWriter(AbstractWriter):
    """Write TensorBoard event files into the folder ``savepath``.

    Every scalar key becomes a scalar tag at step = epoch. A vector statistic such as
    ``spectrum`` (the ``k`` leading eigenvalues) becomes one tag per entry,
    ``{key}/rank-{i}`` with ``i = 1 … k`` (rank 1 is the largest eigenvalue). Arrays such
    as ``cov`` and ``embed`` are not written (the npy writer stores them). Every save
    closes the event file it wrote to, so the epoch is on disk when the save returns (a
    run killed later keeps it); the next epoch goes to a new file in the same folder,
    which TensorBoard reads as one run.

    Each run writes its own event file and starts it with a purge marker at its first
    epoch, so TensorBoard hides the steps an earlier run wrote at or after that
    epoch: a run resumed with ``initial_epoch=k`` continues the curves at ``k``
    without duplicated or lost steps, and a new run (``initial_epoch=0``) in the same
    folder replaces the old curves. A purge applies to every tag of the folder, so
    give any other ``SummaryWriter`` a folder of its own (a sibling folder shows up as
    another run under the same ``tensorboard --logdir``).

    Parameters
    ----------
    savepath : str
        The log folder (``logdir``).
    flush_secs : int, default 120
        How often tensorboardX flushes pending events on its own between saves (values
        only arrive just before a save, so this rarely matters).

    """

    def __init__(self, savepath: str, flush_secs: int = 120):
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, int) or flush_secs < 1:
            raise ValueError(f"flush_secs must be a positive integer, got {flush_secs!r}")
        self.savepath = savepath
        self.flush_secs = flush_secs
        self._purge_step: Optional[int] = 0
        self._writer = None
        self._step = 0

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
        if not glob.glob(os.path.join(glob.escape(self.savepath), "*tfevents*")):
            logger.warning("no TensorBoard events to resume in %s; starting at epoch %d", self.savepath, initial_epoch)
        self._purge_step = int(initial_epoch)

    def _put(self, tag: str, value: Any, step: Optional[int]) -> None:
        if step is not None:
            self._step = int(step)
        if torch.is_tensor(value):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            return
        if array.ndim == 0:
            self._summary_writer().add_scalar(tag, float(array), global_step=self._step)
            return
        key = parse_key(tag)
        if key is not None and key.statistic.kind == "vector" and array.ndim == 1:
            writer = self._summary_writer()
            for rank, eigenvalue in enumerate(array, start=1):
                writer.add_scalar(f"{tag}/rank-{rank}", float(eigenvalue), global_step=self._step)

    def add_scalar(self, name, value, global_step=None, **kwargs):
        self._put(name, value, global_step)

    def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
        for key, value in value_dict.items():
            self._put(f"{prefix}{key}", value, global_step)

    def save(self):
        # tensorboardX writes from a thread of its own, and its flush() does not wait for
        # the events still queued; closing does. So a saved epoch is on disk when save()
        # returns, and the next epoch's values open a new file in the folder.
        self.close()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
