"""Argument checks shared by the tracker, the PCA layers, the writers, the tools and the command line.

Each check returns the value in its canonical type (a ``float``, an ``int``, a
``torch.device`` …) or raises with a message that names the parameter, shows the bad
value and says what is valid, so that every entry point refuses bad input the same way
and before any work is done.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any, Dict, Iterable, Optional, Union

import torch

__all__ = [
    "check_callable",
    "check_choice",
    "check_device",
    "check_flag",
    "check_fraction",
    "check_int",
    "check_mapping",
    "check_path",
    "check_positive",
    "check_row_mask",
]


def _number(value: Any, integral: bool = False) -> Optional[Union[int, float]]:
    """Return ``value`` as a Python number if it is one (numpy scalars and 0-d tensors too), else ``None``."""
    if isinstance(value, bool) or (hasattr(value, "dtype") and str(value.dtype) == "bool"):
        return None
    if torch.is_tensor(value):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            return None
        if integral and value.is_floating_point():
            return None
        return value.item()
    kind = Integral if integral else Real
    if isinstance(value, kind):
        return int(value) if integral else float(value)
    return None


def check_fraction(name: str, value: Any, allow_none: bool = False) -> Optional[float]:
    """Return ``value`` as a float in (0, 1].

    Raises
    ------
    ValueError
        For anything else, naming ``name``.

    """
    if value is None and allow_none:
        return None
    number = _number(value)
    if number is None:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a number in (0, 1]{extra}, got {value!r}")
    if not 0 < number <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return float(number)


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> Optional[int]:
    """Return ``value`` as an int of at least ``minimum`` (``None`` passes when allowed).

    Raises
    ------
    ValueError
        For a non-integer or one below ``minimum``, naming ``name``.

    """
    if value is None and allow_none:
        return None
    number = _number(value, integral=True)
    if number is None or number < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")
    return int(number)


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float above 0."""
    number = _number(value)
    if number is None or not number > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(number)


def check_flag(name: str, value: Any) -> bool:
    """Return ``value`` as a bool; only ``True`` and ``False`` (numpy's too) are flags."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str], allow_none: bool = False) -> Optional[str]:
    """Return ``value`` if it is one of ``choices`` (or ``None`` when allowed).

    Raises
    ------
    ValueError
        ``unknown {name} {value!r}; valid values are [...]``.

    """
    choices = list(choices)
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        valid = f"None or {choices}" if allow_none else str(choices)
        raise ValueError(f"unknown {name} {value!r}; valid values are {valid}")
    return value


def check_callable(name: str, value: Any, expected: str = "", allow_none: bool = True) -> Any:
    """Return ``value`` if it is callable (or ``None`` when allowed); ``expected`` describes the call."""
    if value is None and allow_none:
        return None
    if not callable(value):
        what = f" {expected}" if expected else ""
        extra = " or None" if allow_none else ""
        raise TypeError(f"{name} must be callable{what}{extra}, got {type(value).__name__}")
    return value


def check_mapping(name: str, value: Any, allow_none: bool = True) -> Dict[str, Any]:
    """Return a mapping of keyword arguments as a new dict (``None`` gives ``{}`` when allowed)."""
    if value is None and allow_none:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of argument names to values (a dict), got {type(value).__name__}")
    bad = [key for key in value if not isinstance(key, str)]
    if bad:
        raise TypeError(f"{name} keys must be argument names (strings), got {bad[0]!r}")
    return dict(value)


def check_path(name: str, value: Any) -> str:
    """Return a file system path (``str`` or ``os.PathLike``) as a non-empty ``str``.

    Raises
    ------
    TypeError
        For something that is not a path.
    ValueError
        For an empty path or one holding a NUL byte (no file system accepts it).

    """
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or pathlib.Path), got {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a text path, got {path!r}")
    if not path:
        raise ValueError(f"{name} must not be empty: it names where the outputs go, e.g. 'runs/my_run'")
    if "\0" in path:
        raise ValueError(f"{name} {path!r} contains a NUL byte, which no file system accepts")
    return path


def check_device(name: str, device: Any) -> Optional[torch.device]:
    """Return a device the float64 accumulators can live on, or ``None`` (follow the activations).

    Raises
    ------
    ValueError
        For something that is not a device, a device without float64 arithmetic (MPS), the
        ``meta`` device (no data), or one this machine or this torch build cannot use.

    """
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} {device!r} is not a torch device: {err}; use None, 'cpu' or 'cuda:N'") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name} {str(device)!r} was asked for but CUDA is not available; use {name}=None or 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name} {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return device
    if device.type == "mps":
        raise ValueError(
            f"{name} 'mps' has no float64 arithmetic, which the accumulators need; use {name}=None "
            "(MPS activations are then accumulated on the CPU) or 'cpu'"
        )
    if device.type == "meta":
        raise ValueError(
            f"{name} 'meta' holds no data, so nothing can be accumulated on it; use None, 'cpu' or 'cuda:N'"
        )
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ValueError(
            f"{name} {str(device)!r}: this torch build cannot use {device.type!r} devices here; "
            "use None, 'cpu' or 'cuda:N'"
        )
    return device


def check_row_mask(name: str, mask: Any) -> Optional[torch.Tensor]:
    """Return a ``(batch, time)`` mask as a boolean tensor on its own device (nonzero: real), or ``None``.

    Only the shape and dtype are checked: reading the values would wait for the device.

    Raises
    ------
    TypeError
        For something that is not a real-valued or boolean tensor.
    ValueError
        For a tensor that is not two-dimensional.

    """
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.is_complex():
        raise TypeError(
            f"{name} must be a (batch, time) tensor of bools or 0/1 values (an attention_mask) or None, "
            f"got {type(mask).__name__}"
        )
    if mask.dim() != 2:
        raise ValueError(f"{name} must be (batch, time), two-dimensional; got shape {tuple(mask.shape)}")
    return mask.detach() if mask.dtype == torch.bool else mask.detach() != 0
