"""Keep the accumulators' float32 products at full precision whatever the process-wide settings say.

``torch.set_float32_matmul_precision("high")``, which training frameworks recommend on
recent GPUs, lets float32 products round their inputs to TF32's 10 mantissa bits (bf16
on some CPUs): harmless for training, but a relative error of 1e-5 to 1e-4 in a
covariance, far over SPEC §4. The setting is process-wide, so :data:`FULL_PRECISION`
raises it while any accumulator multiplies and puts it back, exactly as it was, when the
last one is done. Another thread's products in that window only run at full precision.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["FULL_PRECISION", "FullPrecisionProducts", "autocast_off"]


def _backends() -> Tuple[object, ...]:
    # The per-backend settings of recent torch releases; older ones only have the process-wide one.
    return tuple(
        b for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul) if hasattr(b, "fp32_precision")
    )


class FullPrecisionProducts:
    """A context manager, shared by every thread, that holds float32 products at full precision.

    Reference-counted: the first thread to enter records the reduced-precision settings
    and raises them, the last one to leave restores them.

    Parameters
    ----------
    backends : sequence, optional
        The per-backend precision settings to manage (``torch.backends.cuda.matmul`` …);
        an empty sequence manages the process-wide ``float32_matmul_precision`` instead.
        ``None`` detects them.

    Attributes
    ----------
    users : int
        Number of products running under the guard right now.

    """

    def __init__(self, backends: Optional[Sequence[object]] = None):
        self.backends = tuple(_backends() if backends is None else backends)
        self.users = 0
        self._lock = threading.Lock()
        self._saved: Tuple[Tuple[object, str], ...] = ()

    def _reduced(self) -> Tuple[Tuple[object, str], ...]:
        """Return ``(backend, value)`` for each matmul precision setting that is not full float32."""
        if self.backends:
            # A backend left at "none" follows the process-wide default.
            default = getattr(torch.backends, "fp32_precision", "ieee")
            full = ("ieee", "none") if default in ("ieee", "none") else ("ieee",)
            values = [(b, b.fp32_precision) for b in self.backends]
            return tuple((b, value) for b, value in values if value not in full)
        precision = torch.get_float32_matmul_precision()
        return () if precision == "highest" else ((torch, precision),)

    @staticmethod
    def _set(backend: object, value: Optional[str]) -> None:
        if backend is torch:
            torch.set_float32_matmul_precision(value or "highest")
        else:
            backend.fp32_precision = value or "ieee"

    def __enter__(self) -> FullPrecisionProducts:
        with self._lock:
            if self.users == 0:
                try:
                    self._saved = self._reduced()
                    for backend, _ in self._saved:
                        self._set(backend, None)
                except (AttributeError, RuntimeError, TypeError):  # settings torch will not report
                    self._saved = ()
            self.users += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                for backend, value in self._saved:
                    self._set(backend, value)
                self._saved = ()


#: The guard every accumulator multiplies under.
FULL_PRECISION = FullPrecisionProducts()


def autocast_off(device_type: str):
    """Return a context that disables autocast on ``device_type``, or a no-op if it is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4, or a device type autocast does not know
        enabled = True
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()
