"""Track saturation in a Lightning ``Trainer.fit`` run with one callback.

Install with ``pip install delve[lightning]``. Works with the ``lightning`` package
(``lightning.pytorch``) and, when that is absent, with ``pytorch_lightning``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Dict, Optional

from delve.integrations._base import Closed, EpochTracking, ModulesSpec, scalar_values
from delve.keys import dashboard_tag
from delve.tracker import CheckLayerSat
from delve.validation import check_flag
from delve.writers import WriterSpec

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older standalone distribution
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as err:
        raise ImportError(
            "delve.integrations.lightning needs Lightning; install it with: pip install 'delve[lightning]'"
        ) from err

__all__ = ["SaturationCallback"]

logger = logging.getLogger(__name__)


class SaturationCallback(Callback):
    """Attach a :class:`~delve.CheckLayerSat` to the LightningModule being fitted.

    The layers of the module are hooked when training starts; every training epoch
    becomes one row of statistics. Validation forwards land in the ``eval`` columns
    (Lightning puts the module in eval mode for validation). The values also go to
    the trainer's loggers (``log_metrics``, with ``epoch`` added, at the trainer's
    ``global_step``), so they show up in ``CSVLogger``'s ``metrics.csv`` or in
    TensorBoard next to the losses, named by statistic as dashboards group them:
    ``{mode}-{stem}/{layer}`` (``train-saturation/net-0``), ``{mode}-saturation/average``
    (see :attr:`delve.keys.Key.tag`).

    Which forwards count for epoch ``N``: the training batches of epoch ``N`` and
    every validation run during it, including the one Lightning runs after its
    last batch. The row is written at ``on_train_epoch_end`` when that
    validation has already run (Lightning 2 runs it before the hook) or none is due
    this epoch (``check_val_every_n_epoch``); otherwise at the end of the validation
    that follows. The sanity-check validation before training is never recorded.
    On a run resumed from a checkpoint, rows continue at the first epoch Lightning
    starts, and the rows of the epochs before it are kept (an epoch the checkpoint
    interrupted keeps the row its first run wrote, if any).

    Padding: when a training or validation batch is a mapping holding an
    ``attention_mask`` (what Hugging Face tokenizers and collators give), it is the
    tracker's row mask for that batch (see :meth:`~delve.CheckLayerSat.row_mask`), so
    padded positions are left out of every ``(batch, tokens, ...)`` output. With
    ``timeseries_method='timestepwise'`` every real token is a sample; with the default
    ``'last_timestep'``, each sequence's last real token. ``use_attention_mask=False``
    turns this off.

    Parameters
    ----------
    savefile : str, optional
        Output path without extension. ``None`` writes to
        ``{trainer.log_dir}/saturation`` (``saturation.csv`` next to the logger's files).
    save_to : str, AbstractWriter or list of them, default ``'csv'``
        The tracker's writers, as for :class:`~delve.CheckLayerSat`.
    modules : nn.Module, list or callable, optional
        What to track. ``None`` tracks every supported layer of the LightningModule;
        a callable receives the module and returns the modules to track
        (e.g. ``lambda m: [m.encoder, m.head]``).
    log_to_loggers : bool, default True
        Also send the scalar values to ``trainer.loggers``.
    use_attention_mask : bool, default True
        Leave out the positions a mapping batch's ``attention_mask`` marks as padding.
    **tracker_kwargs
        Any other :class:`~delve.CheckLayerSat` argument (``stats``,
        ``average_sat``, ``verbose`` …). They are checked here, so a typo fails
        before the trainer starts.

    Examples
    --------
    >>> from lightning.pytorch import Trainer
    >>> from delve.integrations.lightning import SaturationCallback
    >>> trainer = Trainer(max_epochs=5, callbacks=[SaturationCallback(stats=["lsat", "idim"])])
    >>> trainer.fit(model, train_loader, val_loader)  # doctest: +SKIP

    """

    def __init__(
        self,
        savefile: Optional[str] = None,
        save_to: WriterSpec = "csv",
        modules: ModulesSpec = None,
        log_to_loggers: bool = True,
        use_attention_mask: bool = True,
        **tracker_kwargs: Any,
    ):
        super().__init__()
        self._tracking = EpochTracking(savefile, save_to, modules, tracker_kwargs)
        self.log_to_loggers = bool(log_to_loggers)
        self.use_attention_mask = check_flag("use_attention_mask", use_attention_mask)
        self._validated = False
        self._attach = False  # a fit has started and its tracker is still to be made

    @property
    def history(self) -> Dict[int, Dict[str, Any]]:
        """``epoch -> values`` of every epoch written in this run."""
        return self._tracking.history

    @property
    def tracker(self) -> Optional[CheckLayerSat]:
        """The tracker of the current (or last) fit; ``None`` until its first training epoch starts."""
        return self._tracking.tracker

    # ------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer, pl_module) -> None:
        # The tracker is made at the first epoch start, not here: on a run resumed from a
        # checkpoint taken after the validation of epoch N (check_val_every_n_epoch > 1),
        # current_epoch still reads N here, though N is finished and N + 1 comes next.
        self._tracking.abort()
        self._attach = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._attach:
            self._attach = False
            log_dir = trainer.log_dir or trainer.default_root_dir
            self._tracking.attach(pl_module, os.path.join(log_dir, "saturation"), trainer.current_epoch)
        self._validated = False
        self._report(trainer, self._tracking.open_epoch())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mask(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tracking.unmask_rows()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._mask(batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._tracking.unmask_rows()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._validated = True
        self._report(trainer, self._tracking.evaluation_ended())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        follows = not self._validated and _validation_due(trainer)
        self._report(trainer, self._tracking.end_training_part(follows))

    def on_train_end(self, trainer, pl_module) -> None:
        self._report(trainer, self._tracking.finish())

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._tracking.abort()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._tracking.abort()

    def close(self) -> None:
        """Close the tracker (hooks removed) without writing an unfinished epoch."""
        self._tracking.abort()

    # ----------------------------------------------------------------- helpers
    def _mask(self, batch: Any) -> None:
        if self.use_attention_mask and isinstance(batch, Mapping):
            self._tracking.mask_rows(batch.get("attention_mask"))

    def _report(self, trainer, closed: Optional[Closed]) -> None:
        if closed is None:
            return
        epoch, values = closed
        if not self.log_to_loggers or not trainer.loggers:
            return
        metrics = {dashboard_tag(name): value for name, value in scalar_values(values).items()}
        metrics["epoch"] = epoch
        try:
            for lightning_logger in trainer.loggers:
                lightning_logger.log_metrics(metrics, step=trainer.global_step)
                lightning_logger.save()
        except Exception:  # a logger failing must not stop training; the tracker's files still have the values
            logger.exception("could not send the epoch %d statistics to the trainer's loggers", epoch)


def _validation_due(trainer) -> bool:
    """Whether Lightning validates at the end of the current epoch (public trainer attributes only)."""
    if not trainer.enable_validation:
        return False
    every = trainer.check_val_every_n_epoch
    return every is None or (trainer.current_epoch + 1) % every == 0
