"""The streaming covariance accumulator every tracked layer and PCA layer feeds.

What it stores, in float64: the count ``n`` of rows seen since the last reset, and
their first and second moments about a *shift* ``s`` close to their mean,
``t = Σ (x - s)`` and ``S = Σ (x - s)(x - s)ᵀ``. The mean is ``s + t/n`` and the scatter
matrix about the mean is ``M = S - t tᵀ/n``; the population covariance is ``M / n`` (the
paper's ``ΣAᵀA/n − μμᵀ`` without its cancellation, since ``|t/n|`` stays small).

A batch is centred on the shift and multiplied by :func:`delve.gram.centred_gram`; the
result is added to ``S`` and ``t`` on the device, gated by a finiteness check that never
waits for an accelerator (the CPU reads it, which costs nothing there). Every few batches
the shift moves to the running mean (an exact rank-two correction of ``S``), so the data
stays centred while it drifts, and the scale the batches are multiplied by follows their
spread.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from delve import gram as products
from delve._runtime import run_eagerly
from delve.precision import FULL_PRECISION, autocast_off

__all__ = ["TorchCovarianceMatrix", "covariance_bytes", "float64_home", "product_dtype"]

DeviceLike = Union[str, torch.device, None]

# Below this many features the product is bound by memory, not arithmetic, and BLAS
# kernels sum long runs of rows one by one; float64 products cost little there and
# keep every digit.
_FLOAT32_MIN_FEATURES = 16
# Batches centred on one shift before it moves to the running mean.
_SHIFT_EVERY = 8
# Device types without float64 arithmetic (Apple's MPS).
_NO_FLOAT64 = ("mps",)


def covariance_bytes(dim: int) -> int:
    """Return the bytes one accumulator of feature dimension ``dim`` needs at its peak.

    The float64 second-moment matrix, and, while a batch is merged, its float64 Gram
    sum and the float32 block products. The centred copy of the batch is not counted:
    see :func:`delve.gram.workspace_bytes`.
    """
    return dim * dim * (8 + 8 + 4)


def product_dtype(dtype: torch.dtype, features: int, float64_products: bool = False) -> torch.dtype:
    """Return the dtype a batch of ``dtype`` rows with ``features`` features is centred and multiplied in."""
    # float64 activations are never rounded to float32: that would cost digits.
    wide = float64_products or dtype == torch.float64 or features < _FLOAT32_MIN_FEATURES
    return torch.float64 if wide else torch.float32


def float64_home(device: torch.device) -> torch.device:
    """Return where the float64 state of activations on ``device`` lives: there, or the CPU."""
    return torch.device("cpu") if device.type in _NO_FLOAT64 else device


_TRIANGLES: Dict[Tuple[int, torch.device], torch.Tensor] = {}


def _lower_triangle(dim: int, device: torch.device) -> torch.Tensor:
    """Return a cached boolean mask of the lower triangle (diagonal included)."""
    key = (dim, device)
    mask = _TRIANGLES.get(key)
    if mask is None:
        mask = _TRIANGLES[key] = torch.ones(dim, dim, dtype=torch.bool, device=device).tril_()
    return mask


class TorchCovarianceMatrix:
    """Exact float64 running covariance of the rows of every matrix given to :meth:`update`.

    Parameters
    ----------
    device : str or torch.device, optional
        Where the state lives. ``None`` (default) keeps it on the device of the first
        batch, so no activation is ever copied between devices; activations on a device
        without float64 arithmetic (Apple's MPS) are accumulated on the CPU.
    float64_products : bool, default False
        Compute each batch's Gram product in float64. By default it is computed in
        float32 on data centred on a running shift, over row blocks summed in float64,
        which keeps the result within 1e-6 relative of the float64 two-pass reference
        at a fraction of the cost; set this for float64 products throughout. Layers
        of fewer than 16 features and float64 activations always get float64 products.

    Notes
    -----
    Batches containing NaN or Inf are skipped whole and counted in :attr:`skipped`.
    The check happens on the device, so a GPU never waits for the host.
    Updates may come from several threads at once (``nn.DataParallel``).
    The products run at full float32 precision even where
    ``torch.set_float32_matmul_precision("high")`` lets the rest of the model use TF32;
    the setting is put back after each batch.

    """

    def __init__(self, device: DeviceLike = None, float64_products: bool = False):
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type in _NO_FLOAT64:
            raise ValueError(
                f"device {str(self.device)!r} has no float64 arithmetic, which the accumulator needs; use "
                "device=None (the state then stays on the CPU for such activations) or 'cpu'"
            )
        self.float64_products = bool(float64_products)
        # Re-entrant, so that a method holding it may read the public state properties.
        self._lock = threading.RLock()
        self._dim: Optional[int] = None
        # The state (see the module docstring): n, t, S about the float64 shift s.
        self._n: Optional[torch.Tensor] = None
        self._origin: Optional[torch.Tensor] = None  # s, float64
        self._sum: Optional[torch.Tensor] = None  # t
        self._gram: Optional[torch.Tensor] = None  # S; only its lower triangle is kept current
        self._skipped: Optional[torch.Tensor] = None
        # s in the dtype of the products (s is always exactly this value). None until
        # a batch comes: reset() drops it, because weights move between epochs and a
        # stale shift far from the data costs float32 digits.
        self._shift: Optional[torch.Tensor] = None
        # The power of two centred batches are multiplied by (None for float64 products).
        self._scale: Optional[torch.Tensor] = None
        self._unscale: Optional[torch.Tensor] = None  # 1 / scale and its square, in float64
        self._unscale2: Optional[torch.Tensor] = None
        self._fresh = True  # no row merged since the last reset: a batch picks the shift
        self._since_shift = 0  # batches added since the shift last moved

    # ------------------------------------------------------------------ state
    # n, mean, scatter and skipped are the public state, derived from n, s, t and S;
    # from_state builds an accumulator around them (a distributed sync, a restore).
    @property
    def n(self) -> Optional[torch.Tensor]:
        """Number of rows merged (float64 scalar tensor), or ``None`` before the first batch."""
        return self._n

    @property
    def mean(self) -> Optional[torch.Tensor]:
        """Float64 mean of the rows merged, or ``None`` before the first batch."""
        with self._lock:
            if self._origin is None:
                return None
            return self._origin + self._sum / self._n.clamp_min(1.0)

    @property
    def scatter(self) -> Optional[torch.Tensor]:
        """Float64 scatter matrix ``Σ (x - mean)(x - mean)ᵀ``, or ``None`` before the first batch."""
        with self._lock:
            if self._gram is None:
                return None
            # Only the lower triangle of S is kept up to date (the products skip the
            # blocks above the diagonal): mirror it. u uᵀ with u = t/√n is symmetric to
            # the last bit, so the result is too.
            scatter = torch.where(_lower_triangle(self._dim, self._gram.device), self._gram, self._gram.T)
            u = self._sum / self._n.clamp_min(1.0).sqrt()
            return scatter.addr_(u, u, alpha=-1.0)

    @property
    def skipped(self) -> Optional[torch.Tensor]:
        """Number of non-finite batches skipped (int64 scalar tensor), or ``None`` before the first batch."""
        return self._skipped

    @property
    def dim(self) -> Optional[int]:
        """Feature dimension, or ``None`` before the first batch."""
        return self._dim

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the accumulator holds between batches."""
        state = (self._n, self._origin, self._sum, self._gram, self._skipped, self._shift, self._scale)
        return sum(t.numel() * t.element_size() for t in state if t is not None)

    @property
    def count(self) -> int:
        """Number of rows merged since the last reset (synchronises with the device)."""
        return 0 if self._n is None else int(self._n.item())

    @property
    def skipped_batches(self) -> int:
        """Number of batches skipped for non-finite values since the last reset."""
        return 0 if self._skipped is None else int(self._skipped.item())

    def _allocate(self, dim: int, device: torch.device) -> None:
        self._dim = dim
        self._n = torch.zeros((), dtype=torch.float64, device=device)
        self._origin = torch.zeros(dim, dtype=torch.float64, device=device)
        self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Forget every row seen so far (the feature dimension is kept)."""
        with self._lock:
            if self._gram is not None:
                self._n.zero_()
                self._sum.zero_()
                self._gram.zero_()
                self._skipped.zero_()
            self._shift = None
            self._fresh = True

    def _move_shift(self, shift: torch.Tensor) -> None:
        """Re-express the state about a new shift (exact algebra) and centre batches on it."""
        new = shift.to(torch.float64)
        if not self._fresh:  # an empty state has nothing to re-express
            delta = new - self._origin
            # S' = S - δtᵀ - tδᵀ + nδδᵀ and t' = t - nδ: the moments about s + δ.
            self._gram.addr_(delta, delta * self._n - self._sum)
            self._gram.addr_(self._sum, delta, alpha=-1.0)
            self._sum.sub_(delta * self._n)
        self._origin = new
        self._shift = shift
        self._since_shift = 0

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the rows of ``x`` (shape ``(rows, features)``) into the statistics.

        Parameters
        ----------
        x : torch.Tensor
            A data matrix of any floating dtype. It is neither copied to float64 nor
            kept.

        """
        if x.dim() != 2:
            raise ValueError(f"update expects a (rows, features) matrix, got shape {tuple(x.shape)}")
        self._update(x)

    @torch.no_grad()
    def update_rows(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Merge a tensor of shape ``(..., features)``: every index of the leading dimensions is a row.

        This reads layer outputs without reshaping them first: the rows of a
        channels-first feature map are ``output.movedim(1, -1)``, a view, and the one
        copy the accumulator makes anyway is written in the layout its product wants.

        Parameters
        ----------
        x : torch.Tensor
            At least two dimensions, any floating dtype, any strides.
        valid : torch.Tensor, optional
            Boolean, of shape ``x.shape[:-1]``: only the rows where it is true are merged
            (the padding of a batch of sequences is left out). The others get no weight
            in the copy the accumulator makes anyway, so nothing waits for the device to
            count them, and a NaN in them does not make the batch skipped.

        """
        if x.dim() < 2:
            raise ValueError(f"update_rows expects a (..., features) tensor, got shape {tuple(x.shape)}")
        if valid is not None and tuple(valid.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"valid must have the leading shape {tuple(x.shape[:-1])} of the rows, got {tuple(valid.shape)}"
            )
        self._update(x, valid)

    @run_eagerly
    def _update(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        features = x.shape[-1]
        if self._dim is not None and features != self._dim:
            raise ValueError(f"feature dimension changed from {self._dim} to {features}")
        if x.numel() == 0:
            return
        # A hook can fire under autocast or inference_mode; the products must not be
        # downcast and the state must stay an ordinary tensor. (The checks are cheaper
        # than entering both contexts on every batch.)
        inference = torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()
        with inference, autocast_off(x.device.type), self._lock:
            x = x.detach()
            if self._gram is None:
                self._allocate(features, self.device if self.device is not None else float64_home(x.device))
            if x.device != self._gram.device:
                # To the host a copy must be complete before the CPU reads it: only copies
                # to an accelerator may run asynchronously (they are ordered on its stream).
                x = x.to(self._gram.device, non_blocking=self._gram.device.type != "cpu")
            if valid is not None:
                valid = valid.to(x.device, torch.bool, non_blocking=x.device.type != "cpu")
            self._add_batch(x, valid)

    def _add_batch(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        work = product_dtype(x.dtype, self._dim, self.float64_products)
        if self._shift is None or self._shift.dtype != work or self._since_shift >= _SHIFT_EVERY:
            self._recentre(x, work, valid)
        bounds = products.block_bounds(self._dim)
        with FULL_PRECISION:
            gram, sums = products.centred_gram(x, self._shift, work, bounds, self._scale, valid)
        # A non-finite value anywhere makes its column's diagonal entry, hence the trace,
        # non-finite, and the batch is dropped. On an accelerator that is decided on the
        # device (no host round trip): the batch's terms are zeroed and counted as skipped.
        trace = gram.trace()
        value = products.host_value(trace)  # read where that is free (the CPU)
        if value is not None and not math.isfinite(value):
            self._skipped.add_(1)
            return
        ok = torch.isfinite(trace) if value is None else None  # decided on the accelerator
        rows = x.numel() // x.shape[-1] if valid is None else valid.sum()
        if self._dim >= products.BLOCKWISE_FEATURES:
            for start, stop in zip(bounds[:-1], bounds[1:]):
                _add(self._gram[start:stop, :stop], gram[start:stop, :stop], self._unscale2, ok)
        else:
            _add(self._gram, gram, self._unscale2, ok)
        _add(self._sum, sums, self._unscale, ok)
        self._n.add_(rows if ok is None else ok * rows)
        if ok is not None:
            self._skipped.add_(~ok)
        self._fresh = False
        self._since_shift += 1

    def _recentre(self, x: torch.Tensor, work: torch.dtype, valid: Optional[torch.Tensor]) -> None:
        """Move the shift to the running mean (or the batch's, at the start) and fit the scale to the spread."""
        if self._fresh:
            target, spread = products.first_shift(x, work, valid)
            self._move_shift(target)
        else:  # the running mean (the shift itself while no row was accepted)
            self._move_shift((self._origin + self._sum / self._n.clamp_min(1.0)).to(work))
            # About the new shift, S's diagonal is the scatter of each feature.
            spread = (self._gram.diagonal().amax() / self._n.clamp_min(1.0)).sqrt()
        scale = products.power_of_two_scale(spread, work)
        if scale is not None and self._scale is not None and self._scale.dtype == scale.dtype:
            scale = torch.where(self._n > 0, scale, self._scale)  # no accepted row yet: nothing to fit
        self._scale = scale
        # The products are of scaled rows: (x - s)·c gives c² times the Gram matrix.
        self._unscale = None if scale is None else scale.to(torch.float64).reciprocal()
        self._unscale2 = None if scale is None else self._unscale * self._unscale

    def merge(self, other: TorchCovarianceMatrix) -> TorchCovarianceMatrix:
        """Add the rows another accumulator has seen into this one, exactly.

        Parameters
        ----------
        other : TorchCovarianceMatrix
            An accumulator of the same feature dimension; it is not modified.

        Returns
        -------
        TorchCovarianceMatrix
            ``self``, so merges can be chained.

        """
        if other.dim is None:
            return self
        with self._lock:
            if self._gram is None:
                self._allocate(other.dim, other.n.device if self.device is None else self.device)
            if other.dim != self._dim:
                raise ValueError(f"cannot merge dimension {other.dim} into dimension {self._dim}")
            dev = self._gram.device
            n_b, mean_b = other.n.to(dev), other.mean.to(dev)
            scatter_b, skipped_b = other.scatter.to(dev), other.skipped.to(dev)
            # Re-express this state about the merged mean first, so that neither part
            # is far from the origin of the sum.
            n = self._n + n_b
            merged_mean = torch.where(n > 0, (self._n * self.mean + n_b * mean_b) / n.clamp_min(1.0), mean_b)
            self._move_shift(merged_mean)
            delta = mean_b - merged_mean
            self._gram.add_(scatter_b).addr_(delta, delta * n_b)
            self._sum.add_(delta * n_b)
            self._n.copy_(n)
            self._skipped.add_(skipped_b)
            self._fresh = False
            self._shift = None  # batches re-derive a shift of their own dtype
        return self

    # -------------------------------------------------------------------- result
    def fix(self, center: bool = True) -> torch.Tensor:
        """Return the float64 population covariance of all rows seen since the last reset.

        Parameters
        ----------
        center : bool, default True
            ``False`` returns the raw second moment ``Σxxᵀ/n`` instead.

        Returns
        -------
        torch.Tensor
            A ``(features, features)`` float64 tensor on the accumulator's device.

        """
        with self._lock:
            if self._gram is None:
                raise RuntimeError("the covariance of no data is undefined: update() was never called")
            cov = self.scatter.div_(self._n.clamp_min(1.0))
            if not center:
                mean = self.mean
                cov.addr_(mean, mean)
            return cov

    def state_tensors(self) -> Dict[str, Optional[torch.Tensor]]:
        """Return the state as plain tensors: ``n``, ``mean``, ``scatter`` and ``skipped`` (see :meth:`from_state`)."""
        with self._lock:
            return {"n": self.n, "mean": self.mean, "scatter": self.scatter, "skipped": self.skipped}

    @classmethod
    def from_state(
        cls, state: Mapping[str, torch.Tensor], device: DeviceLike = None, float64_products: bool = False
    ) -> TorchCovarianceMatrix:
        """Build an accumulator holding the rows a state describes (what :meth:`state_tensors` returns).

        Parameters
        ----------
        state : mapping
            ``n`` (count), ``mean`` (``(d,)``), ``scatter`` (``(d, d)``, about the mean) and
            optionally ``skipped``; float64 tensors are used as they are, not copied.
        device, float64_products
            As for the constructor.

        """
        acc = cls(device=device, float64_products=float64_products)
        mean = state["mean"].to(torch.float64)
        home = acc.device if acc.device is not None else mean.device
        skipped = state.get("skipped")
        with acc._lock:
            acc._dim = int(mean.shape[0])
            acc._n = torch.as_tensor(state["n"], dtype=torch.float64).to(home)
            acc._skipped = torch.zeros((), dtype=torch.int64, device=home) if skipped is None else skipped.to(home)
            # Moments about the mean itself: t = 0 and S is the scatter.
            acc._origin = mean.to(home)
            acc._sum = torch.zeros_like(acc._origin)
            acc._gram = state["scatter"].to(home, torch.float64)
            acc._fresh = False
        return acc


def _add(target: torch.Tensor, value: torch.Tensor, factor: Optional[torch.Tensor], ok: Optional[torch.Tensor]) -> None:
    """Add ``value`` (times ``factor``, which undoes the scale of the products) to the float64 ``target``.

    ``ok``, a 0-d boolean on the device, zeroes a batch that must not count (``None``: it counts).
    """
    if ok is not None:
        value = value.masked_fill_(~ok, 0.0)
    if factor is None:
        target.add_(value)
    else:
        target.addcmul_(value, factor)
