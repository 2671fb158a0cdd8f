"""The console writer: one line per value on standard output."""

from __future__ import annotations

from delve.writers.base import AbstractWriter, is_scalar


class PrintWriter(AbstractWriter):
    """Print every scalar as ``[epoch E] key: value`` on standard output.

    Parameters
    ----------
    savepath : str, optional
        Accepted for a uniform constructor; nothing is written to disk.

    """

    def __init__(self, savepath: str = ""):
        self.savepath = savepath

    def _print(self, name, value, step):
        if is_scalar(value):
            prefix = "" if step is None else f"[epoch {step}] "
            print(f"{prefix}{name}: {value}", flush=True)

    def add_scalar(self, name, value, global_step=None, **kwargs):
        self._print(name, value, global_step)

    def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
        for key, value in value_dict.items():
            self._print(f"{prefix}{key}", value, global_step)
