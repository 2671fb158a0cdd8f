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
from delve.keys import parse_key
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

__all__ = ["MODE_PREFIXES", "SaturationCallback", "log_name"]

logger = logging.getLogger(__name__)

#: How the trainer writes the mode of a value: ``loss`` in training, ``eval_loss`` in
#: evaluation. Its reporters show them as ``train/loss`` and ``eval/loss``.
MODE_PREFIXES = {"train": "", "eval": "eval_"}


class SaturationCallback(TrainerCallback):
    """Attach a :class:`~delve.CheckLayerSat` to the model a Hugging Face ``Trainer`` trains.

    The model's layers are hooked at ``on_train_begin``; every training epoch becomes
    one row of statistics. Evaluation forwards land in the ``eval`` columns (the
    trainer puts the model in eval mode to evaluate).

    Each epoch's scalar values are also logged as the trainer logs its own, named by
    statistic and layer with the mode written the trainer's way (:func:`log_name`):
    ``saturation/classifier`` for training, ``eval_saturation/classifier`` for
    evaluation, ``saturation/average``. Given the trainer (``trainer=``), the callback
    logs them with ``trainer.log``: they join ``trainer.state.log_history`` (saved in
    ``trainer_state.json`` with every checkpoint) and reach every reporter of
    ``report_to`` (TensorBoard shows them as ``train/saturation/classifier`` and
    ``eval/saturation/classifier``; W&B, MLflow …). Without it, a callback cannot reach
    the reporters: the entry is appended to ``log_history`` alone, shaped like the
    trainer's (the values, ``epoch``, ``step``).

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
        Also log the scalar values (``state.log_history``, and the reporters when the
        trainer is given).
    use_attention_mask : bool, default True
        Leave out the positions the ``attention_mask`` keyword of each model call marks
        as padding.
    trainer : transformers.Trainer, optional
        The trainer the callback is added to, to log through it (see above).
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

    With the values in TensorBoard too:

    >>> args = TrainingArguments("out", report_to=["tensorboard"], eval_strategy="epoch")  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test)  # doctest: +SKIP
    >>> trainer.add_callback(SaturationCallback(trainer=trainer, stats=["lsat"]))  # doctest: +SKIP

    """

    def __init__(
        self,
        savefile: Optional[str] = None,
        save_to: WriterSpec = "csv",
        modules: ModulesSpec = None,
        log_to_history: bool = True,
        use_attention_mask: bool = True,
        trainer: Any = None,
        **tracker_kwargs: Any,
    ):
        if trainer is not None and not callable(getattr(trainer, "log", None)):
            kind = type(trainer).__name__
            raise TypeError(f"trainer must be the transformers Trainer the callback is added to, got {kind}")
        tracker_kwargs.setdefault("timeseries_method", "timestepwise")
        self._tracking = EpochTracking(savefile, save_to, modules, tracker_kwargs)
        self.log_to_history = bool(log_to_history)
        self.use_attention_mask = check_flag("use_attention_mask", use_attention_mask)
        self._trainer = trainer

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
        if self.log_to_history and self._trainer is None and getattr(args, "report_to", None):
            logger.warning(
                "the saturation values go to state.log_history but not to the reporters %s: "
                "add the callback with trainer.add_callback(SaturationCallback(trainer=trainer, ...))",
                list(args.report_to),
            )

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
        if not self.log_to_history:
            return
        entry = {log_name(name): value for name, value in scalar_values(values).items()}
        if self._trainer is None:
            entry.update(epoch=state.epoch, step=state.global_step)
            state.log_history.append(entry)
            return
        try:
            self._trainer.log(entry)  # log_history and every reporter, as the trainer's own values
        except Exception:  # a reporter failing must not stop training; the tracker's files have the values
            logger.exception("could not log the epoch %d statistics through the trainer", epoch)


def log_name(name: str) -> str:
    """Return the name a value is logged under: ``{prefix}{stem}/{layer}``, the trainer's prefix of its mode.

    ``saturation/classifier`` (training), ``eval_saturation/classifier`` (evaluation),
    ``saturation/average``; values of the user's own keep their name.
    """
    key = parse_key(name)
    return name if key is None else key.tag_with(MODE_PREFIXES[key.mode])
