"""What the framework callbacks share: argument checks and the rule that assigns forwards to epochs.

Nothing here imports a training framework, so ``import delve.integrations`` stays cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from delve.config import TrackerConfig
from delve.tracker import CheckLayerSat
from delve.writers import WriterSpec
from delve.writers.base import is_scalar

logger = logging.getLogger(__name__)

#: Tracker arguments the callbacks set themselves.
_OWN_ARGUMENTS = ("savefile", "save_to", "modules")

ModulesSpec = Union[None, nn.Module, Callable[[nn.Module], Any]]
#: What closing an epoch gives: its number and the values written for it.
Closed = Tuple[int, "OrderedDict[str, Any]"]


def tracker_arguments() -> list:
    """Return the names of the :class:`~delve.CheckLayerSat` arguments a callback passes through."""
    names = inspect.signature(CheckLayerSat).parameters
    return [name for name in names if name not in _OWN_ARGUMENTS]


def tracker_config(savefile: Optional[str], save_to: WriterSpec, tracker_kwargs: Dict[str, Any]) -> TrackerConfig:
    """Check a callback's tracker arguments when the callback is made, not when training starts.

    Raises
    ------
    TypeError
        For an argument :class:`~delve.CheckLayerSat` does not take.
    ValueError
        For a value the tracker refuses (unknown stat, writer key, device …).

    """
    valid = tracker_arguments()
    unknown = sorted(set(tracker_kwargs) - set(valid))
    if unknown:
        raise TypeError(f"unknown tracker argument(s) {unknown}; valid: {sorted(valid)}")
    return TrackerConfig(savefile=savefile, save_to=save_to, **tracker_kwargs)


def scalar_values(values: Dict[str, Any]) -> Dict[str, float]:
    """Keep the one-number values of an epoch (arrays such as ``spectrum`` are left out), as floats."""
    out = {}
    for key, value in values.items():
        if is_scalar(value):
            try:
                out[key] = float(value)
            except (TypeError, ValueError):  # a user scalar that is not a number
                continue
    return out


class _AttentionMaskHook:
    """Before a model's call, make its ``attention_mask`` keyword the row mask; after it, end that.

    A copy of the model (``copy.deepcopy``, ``torch.save``) gets an inert hook instead, as
    the tracker's own hooks do: a copy must neither drive the tracker nor carry it along.
    """

    def __init__(self, tracking: EpochTracking, before: bool):
        self.tracking = tracking
        self.before = before

    def __call__(self, module: nn.Module, args: tuple, kwargs_or_output: Any) -> None:
        if self.before:  # a pre-hook with kwargs: (module, args, kwargs)
            self.tracking.mask_rows(kwargs_or_output.get("attention_mask"))
        else:  # a forward hook: (module, args, output)
            self.tracking.unmask_rows()

    def __reduce__(self):
        return (_InertHook, ())


class _InertHook:
    """What an :class:`_AttentionMaskHook` becomes in a copy of the model."""

    def __call__(self, *arguments: Any) -> None:
        return None


class EpochTracking:
    """A tracker whose epochs follow a training framework's epochs.

    The rule both callbacks follow: forward passes are recorded while an epoch is open.
    An epoch opens when the framework starts a training epoch and closes (one
    :meth:`~delve.CheckLayerSat.add_saturations` call, one row) once its training
    batches *and* the evaluation belonging to it are done: right at the end of the
    training epoch when no evaluation is still to come, otherwise at the end of that
    evaluation. Should the expected evaluation not come, the epoch closes when the
    next one opens or training ends. Forwards outside an open epoch (Lightning's
    sanity check, an evaluation before training) are not recorded.

    Parameters
    ----------
    savefile : str, optional
        Output path without extension; ``None`` uses the default the callback gives.
    save_to : str, AbstractWriter or list of them
        The tracker's writers.
    modules : nn.Module or callable, optional
        What to track: ``None`` for the whole model, a callable receiving the model
        and returning the modules, or modules.
    tracker_kwargs : dict
        Other :class:`~delve.CheckLayerSat` arguments.

    """

    def __init__(
        self,
        savefile: Optional[str],
        save_to: WriterSpec,
        modules: ModulesSpec,
        tracker_kwargs: Dict[str, Any],
    ):
        if modules is not None and not (callable(modules) or isinstance(modules, (nn.Module, list, tuple))):
            raise TypeError(
                f"modules must be None, a module, a list of modules or a callable, got {type(modules).__name__}"
            )
        self.config = tracker_config(savefile, save_to, tracker_kwargs)
        self.modules = modules
        self._initial_epoch_given = "initial_epoch" in tracker_kwargs
        self.tracker: Optional[CheckLayerSat] = None
        #: ``epoch -> values`` of every epoch closed.
        self.history: Dict[int, Dict[str, Any]] = {}
        self._open = False
        self._awaiting_evaluation = False
        self._masking = contextlib.ExitStack()
        self._mask_handles: List[torch.utils.hooks.RemovableHandle] = []
        self._mask_refused = False

    def attach(self, model: nn.Module, default_savefile: str, initial_epoch: int) -> CheckLayerSat:
        """Make the tracker on the model's layers, not recording until :meth:`open_epoch`."""
        self.abort()
        if self.modules is None:
            modules = model
        elif callable(self.modules) and not isinstance(self.modules, nn.Module):
            modules = self.modules(model)
        else:
            modules = self.modules
        changes = {} if self._initial_epoch_given else {"initial_epoch": initial_epoch}
        savefile = self.config.savefile if self.config.savefile is not None else default_savefile
        config = dataclasses.replace(self.config, savefile=savefile, **changes)
        self.tracker = CheckLayerSat.from_config(config, modules)
        self.tracker.stop()
        logger.info("tracking %d layer(s), writing to %s", len(self.tracker.layers), savefile)
        return self.tracker

    def mask_rows(self, mask: Any) -> None:
        """Make ``mask`` (a batch's ``attention_mask``) the tracker's row mask until :meth:`unmask_rows`.

        Anything but a ``(batch, time)`` tensor masks nothing (a 4-d attention mask says
        nothing about which tokens are real); that is logged once.
        """
        self.unmask_rows()
        if self.tracker is None or mask is None:
            return
        if not (torch.is_tensor(mask) and mask.dim() == 2):
            if not self._mask_refused:
                self._mask_refused = True
                logger.info(
                    "the attention_mask is not a (batch, time) tensor (%s): padding is not left out",
                    tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__,
                )
            return
        self._masking.enter_context(self.tracker.row_mask(mask))

    def unmask_rows(self) -> None:
        """End the row mask :meth:`mask_rows` set, if any."""
        self._masking.close()

    def follow_attention_mask(self, model: nn.Module) -> None:
        """Apply the ``attention_mask`` keyword of every call of ``model`` as the row mask during that call."""
        self._mask_handles = [
            model.register_forward_pre_hook(_AttentionMaskHook(self, before=True), with_kwargs=True),
            model.register_forward_hook(_AttentionMaskHook(self, before=False)),
        ]

    def open_epoch(self) -> Optional[Closed]:
        """Start recording a new epoch; returns what closing an epoch left open gave."""
        if self.tracker is None:
            return None
        closed = self.close_epoch()
        self._open = True
        self._awaiting_evaluation = False
        self.tracker.resume()
        return closed

    def end_training_part(self, evaluation_follows: bool) -> Optional[Closed]:
        """Note that the training batches are done: close the epoch unless its evaluation is still to run."""
        if not self._open:
            return None
        if evaluation_follows:
            self._awaiting_evaluation = True
            return None
        return self.close_epoch()

    def evaluation_ended(self) -> Optional[Closed]:
        """Note that an evaluation finished: close the epoch if it was waiting for one."""
        if self._open and self._awaiting_evaluation:
            return self.close_epoch()
        return None

    def close_epoch(self) -> Optional[Closed]:
        """Write the open epoch and stop recording until the next one opens.

        Returns
        -------
        (int, OrderedDict) or None
            The epoch's number and values, ``None`` when no epoch was open.

        """
        if self.tracker is None or not self._open:
            return None
        self._open = False
        self._awaiting_evaluation = False
        epoch = self.tracker.epoch
        values = self.tracker.add_saturations()
        self.tracker.stop()
        self.history[epoch] = dict(values)
        return epoch, values

    def finish(self) -> Optional[Closed]:
        """Close an epoch still open, then the tracker (hooks removed, files closed), at the end of training."""
        closed = self.close_epoch()
        self.abort()
        return closed

    def abort(self) -> None:
        """Close the tracker without writing the epoch in progress (training failed or was interrupted)."""
        self.unmask_rows()
        for handle in self._mask_handles:
            handle.remove()
        self._mask_handles = []
        if self.tracker is not None:
            self.tracker.close()
        self._open = False
        self._awaiting_evaluation = False

