"""Track saturation in a Hugging Face ``Trainer`` run with one callback.

Install with ``pip install delve[transformers]`` (pulls ``transformers`` and ``accelerate``).
The callback measures the tokens the model trains on: every real token is a sample
(``timeseries_method='timestepwise'``) and the padding each batch's ``attention_mask``
marks is left out.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, Optional

from delve.integrations._base import Closed, EpochTracking, ModulesSpec, scalar_values
from delve.tracker import CheckLayerSat
from delve.validation import check_flag
from delve.writers import WriterSpec

try:
    from transformers import TrainerCallback
except ImportError as err:
    raise ImportError(
        "delve.integrations.transformers needs Hugging Face transformers; "
        "install it with: pip install 'delve[transformers]'"
    ) from err

__all__ = ["SaturationCallback"]

logger = logging.getLogger(__name__)


class SaturationCallback(TrainerCallback):
    """Attach a :class:`~delve.CheckLayerSat` to the model a Hugging Face ``Trainer`` trains.

    The model's layers are hooked at ``on_train_begin``; every training epoch becomes
    one row of statistics. Evaluation forwards land in the ``eval`` columns (the
    trainer puts the model in eval mode to evaluate). Each epoch's scalar values are
    also appended to ``trainer.state.log_history`` as one entry shaped like the
    trainer's own log entries (the values, ``epoch``, ``step``), so they are saved in
    ``trainer_state.json`` with every checkpoint.

    Which forwards count for epoch ``N``: the training steps of epoch ``N``, every
    evaluation run during it (``eval_strategy='steps'``) and the evaluation the
    trainer runs right after it (``eval_strategy='epoch'``). The row is written
    at ``on_epoch_end`` when no evaluation follows, otherwise at the end of that
    evaluation (``on_evaluate``). An evaluation before training (``eval_on_start``)
    is not recorded. On a resumed run, rows continue at the epoch the trainer
    resumes in.

    What a sample is: every real token. The tracker's ``timeseries_method`` defaults to
    ``'timestepwise'`` here (each position of a ``(batch, tokens, features)`` output is a
    sample), and the ``attention_mask`` the trainer passes the model is applied as the
    tracker's row mask during each call (see :meth:`~delve.CheckLayerSat.row_mask`), so
    padded positions are left out of every ``(batch, tokens, ...)`` output. Pass
    ``timeseries_method='last_timestep'`` to measure each sequence's last real token
    instead, and ``use_attention_mask=False`` to count padding as data.

    Parameters
    ----------
    savefile : str, optional
        Output path without extension. ``None`` writes to ``{args.output_dir}/saturation``.
    save_to : str, AbstractWriter or list of them, default ``'csv'``
        The tracker's writers, as for :class:`~delve.CheckLayerSat`.
    modules : nn.Module, list or callable, optional
        What to track. ``None`` tracks every supported layer of the model; a
        callable receives the model and returns the modules to track
        (e.g. ``lambda m: m.bert.encoder``).
    log_to_history : bool, default True
        Also append the scalar values to ``state.log_history``.
    use_attention_mask : bool, default True
        Leave out the positions the ``attention_mask`` keyword of each model call marks
        as padding.
    **tracker_kwargs
        Any other :class:`~delve.CheckLayerSat` argument (``stats``, ``layer_filter``,
        ``verbose`` …; ``timeseries_method`` defaults to ``'timestepwise'``). They are
        checked here, so a typo fails before training.

    Examples
    --------
    >>> from transformers import Trainer
    >>> from delve.integrations.transformers import SaturationCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
    ...                   callbacks=[SaturationCallback(stats=["lsat", "idim"])])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP

    """

    def __init__(
        self,
        savefile: Optional[str] = None,
        save_to: WriterSpec = "csv",
        modules: ModulesSpec = None,
        log_to_history: bool = True,
        use_attention_mask: bool = True,
        **tracker_kwargs: Any,
    ):
        tracker_kwargs.setdefault("timeseries_method", "timestepwise")
        self._tracking = EpochTracking(savefile, save_to, modules, tracker_kwargs)
        self.log_to_history = bool(log_to_history)
        self.use_attention_mask = check_flag("use_attention_mask", use_attention_mask)

    @property
    def history(self) -> Dict[int, Dict[str, Any]]:
        """``epoch -> values`` of every epoch written in this run."""
        return self._tracking.history

    @property
    def tracker(self) -> Optional[CheckLayerSat]:
        """The tracker of the current (or last) training run; ``None`` before training starts."""
        return self._tracking.tracker

    # ----------------------------------------------------------- trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            logger.warning("the trainer passed no model to on_train_begin; saturation is not tracked")
            return
        # A resumed run starts inside the epoch its checkpoint was saved in.
        first_epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
        output_dir = args.output_dir or os.getcwd()
        self._tracking.attach(model, os.path.join(output_dir, "saturation"), first_epoch)
        if self.use_attention_mask:
            self._tracking.follow_attention_mask(model)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._report(state, self._tracking.open_epoch())

    def on_epoch_end(self, args, state, control, **kwargs):
        # The trainer's flow callback runs before this one and has already decided
        # whether an evaluation follows the epoch.
        self._report(state, self._tracking.end_training_part(bool(control.should_evaluate)))

    def on_evaluate(self, args, state, control, **kwargs):
        self._report(state, self._tracking.evaluation_ended())

    def on_train_end(self, args, state, control, **kwargs):
        self._report(state, self._tracking.finish())

    def close(self) -> None:
        """Close the tracker (hooks removed) without writing an unfinished epoch.

        Training that ends normally closes it; call this after a run that raised.
        """
        self._tracking.abort()

    # ----------------------------------------------------------------- helpers
    def _report(self, state, closed: Optional[Closed]) -> None:
        if closed is None:
            return
        epoch, values = closed
        if self.log_to_history:
            entry = scalar_values(values)
            entry.update(epoch=state.epoch, step=state.global_step)
            state.log_history.append(entry)
