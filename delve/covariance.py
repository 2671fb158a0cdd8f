"""The streaming covariance accumulator every tracked layer and PCA layer feeds.

What it stores, in float64: the count ``n`` of rows seen since the last reset, and
their first and second moments about a *shift* ``s`` close to their mean,
``t = Σ (x - s)`` and ``S = Σ (x - s)(x - s)ᵀ``. The mean is ``s + t/n`` and the scatter
matrix about the mean is ``M = S - t tᵀ/n``; the population covariance is ``M / n`` (the
paper's ``ΣAᵀA/n − μμᵀ`` without its cancellation, since ``|t/n|`` stays small).

How a batch is reduced, and why it is cheap:

* its rows are centred on the shift (as float32) while they are copied once into a
  reused workspace, in the layout the Gram product wants; that one copy also turns a
  channels-first feature map into rows without a separate reshape. Subtracting a shift
  close to the data is exact in floating point (Sterbenz), so the float32 products keep
  their digits even when ``|mean|`` is ``10⁴·std``;
* the Gram product computes only the lower block triangle of the symmetric result
  (up to half the multiply-adds), over blocks of at most ``max(8192, features)`` rows
  whose float32 results are summed in float64, so rounding does not grow with the batch;
* the result is added to ``S`` and ``t`` on the device, gated by a finiteness check that
  never waits for the host. Every few batches the shift moves to the running mean
  (an exact rank-two correction of ``S``), so the data stays centred while it drifts.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Dict, Optional, Tuple, Union

import torch

from delve._runtime import run_eagerly

__all__ = ["TorchCovarianceMatrix", "covariance_bytes", "workspace_bytes", "release_workspace"]

DeviceLike = Union[str, torch.device, None]

# A float32 Gram product accumulates each entry over the rows in order; over many rows
# its rounding grows past what SPEC §4 allows, so products are taken over row blocks
# of this size (or the feature count, whichever is larger) and summed in float64.
_BLOCK_ROWS = 8192
# Below this many features the product is bound by memory, not arithmetic, and BLAS
# kernels sum long runs of rows one by one; float64 products cost little there and
# keep every digit.
_FLOAT32_MIN_FEATURES = 16
# Batches centred on one shift before it moves to the running mean.
_SHIFT_EVERY = 8
# Rows a new epoch's first shift is estimated from.
_SHIFT_SAMPLE_ROWS = 4096
# From this many features on, a batch's Gram blocks are gated and added to the state one
# by one: two passes over features² values cost as much as a sizeable part of the product.
_BLOCKWISE_FEATURES = 512
# Below this many multiply-adds (rows × features²) a product is not split into blocks.
_MIN_TRIANGLE_WORK = 2**22
# A workspace larger than this is not kept between batches.
_MAX_KEPT_WORKSPACE = 512 * 2**20

_local = threading.local()


def covariance_bytes(dim: int) -> int:
    """Return the bytes one accumulator of feature dimension ``dim`` needs at its peak.

    The float64 second-moment matrix, and, while a batch is merged, its float64 Gram
    sum and the float32 block products. The centred copy of the batch is not counted:
    see :func:`workspace_bytes`.
    """
    return dim * dim * (8 + 8 + 4)


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Return a flat scratch tensor of ``numel`` elements.

    On the CPU the buffer is kept (per thread and dtype) and reused by every accumulator,
    so a training step does not fault in fresh pages for each layer's centred copy. GPU
    allocators already pool their memory.
    """
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffers: Dict[torch.dtype, torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        if numel * buffer.element_size() <= _MAX_KEPT_WORKSPACE:
            buffers[dtype] = buffer
        else:
            buffers.pop(dtype, None)
    return buffer[:numel]


def workspace_bytes() -> int:
    """Return the bytes of the CPU workspace this thread keeps for centred batch copies."""
    buffers = _local.__dict__.get("buffers", {})
    return sum(b.numel() * b.element_size() for b in buffers.values())


def release_workspace() -> None:
    """Free this thread's CPU workspace (it is allocated again by the next batch)."""
    _local.__dict__.pop("buffers", None)


@functools.cache
def _block_bounds(features: int) -> Tuple[int, ...]:
    """Split the features into the blocks whose lower block triangle the Gram product computes.

    A Gram matrix is symmetric: computing block row ``i`` only up to its diagonal block
    skips up to half of the multiply-adds (0.75 of them with two blocks, 0.56 with
    eight). Blocks stay wide enough (16 features or more, on multiples of 8) for each
    product to run near full speed; the counts were picked by timing on 1 and 2 cores.
    """
    if features < 32:
        return (0, features)
    parts = 2 if features < 64 else 4 if features < 512 else 8
    inner = sorted({8 * round(i * features / parts / 8) for i in range(1, parts)} - {0, features})
    return (0, *inner, features)


def _centred_gram(
    x: torch.Tensor, shift: torch.Tensor, work: torch.dtype, bounds: Tuple[int, ...]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the Gram matrix and the column sums of the rows of ``x`` centred on ``shift``.

    ``x`` has shape ``(..., features)``: every index of the leading dimensions is a row.
    Only the lower block triangle of the Gram matrix (blocks given by ``bounds``) is
    computed; the blocks above it are zero, or undefined from ``_BLOCKWISE_FEATURES``
    features on. It is float64 when it was summed over row blocks, else ``work``.
    """
    features = x.shape[-1]
    rows = x.numel() // features
    # Row blocks only serve float32 rounding; at least `features` rows each keeps their
    # results (blocks × features²) no larger than the centred copy.
    block = rows if work == torch.float64 else max(_BLOCK_ROWS, features)
    blocks = -(-rows // block)
    per_block = -(-rows // blocks)
    padded = blocks * per_block  # the zero rows that pad the last block change no sum
    buffer = _workspace(features * padded, work, x.device)
    if x.stride(-1) == 1 or features == 1:
        # Features adjacent in memory: the centred copy is row-major (rows, features).
        flat = buffer.view(padded, features)
        torch.sub(x, shift, out=flat[:rows].view(x.shape))
        if padded > rows:
            flat[rows:].zero_()
        sums = flat.sum(0)
        chunks = flat.view(blocks, per_block, features).transpose(1, 2)
    else:
        # Features strided (a channels-first map seen as rows): write the centred copy
        # feature-major, (features, rows), reading the input in its own memory order.
        flat = buffer.view(features, padded)
        lead = x.shape[:-1]
        out = flat[:, :rows].view(features, *lead)
        torch.sub(x.movedim(-1, 0), shift.view((features,) + (1,) * len(lead)), out=out)
        if padded > rows:
            flat[:, rows:].zero_()
        sums = flat.sum(1)
        chunks = flat.view(features, blocks, per_block).transpose(0, 1)
    # chunks: (blocks, features, per_block), whatever the layout; BLAS reads either.
    dtype = work if blocks == 1 else torch.float64
    if blocks == 1 and (len(bounds) == 2 or rows * features * features < _MIN_TRIANGLE_WORK):
        # One full product: for a small one, extra calls would cost more than they save.
        return chunks[0] @ chunks[0].T, sums
    # Wide blocks are added to the state one by one (see _add_batch), so the blocks
    # above the diagonal are never read: no need to zero them.
    new = torch.empty if features >= _BLOCKWISE_FEATURES else torch.zeros
    gram = new(features, features, dtype=dtype, device=x.device)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = gram[start:stop, :stop]
        if blocks == 1:
            torch.mm(chunks[0, start:stop], chunks[0, :stop].T, out=part)
        else:
            torch.sum(torch.bmm(chunks[:, start:stop], chunks[:, :stop].transpose(1, 2)), 0, dtype=dtype, out=part)
    return gram, sums


def _first_shift(x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """Estimate the mean of a batch's rows from its leading samples (about 4096 rows).

    A shift only has to be near the data, within a few standard deviations, for the
    centred float32 products to keep their digits. Non-finite values are left out, so
    that a first batch with a NaN (which will be skipped) does not centre the next ones
    on zero; a feature with no finite value gets 0.
    """
    per_sample = max(1, x[0].numel() // x.shape[-1])
    sample = x[: -(-_SHIFT_SAMPLE_ROWS // per_sample)]
    lead = tuple(range(sample.dim() - 1))
    finite = torch.isfinite(sample)
    total = torch.where(finite, sample, 0.0).sum(lead, dtype=work)
    count = finite.sum(lead)
    return torch.where(count > 0, total / count.clamp_min(1), 0.0).to(work)


def _autocast_off(device_type: str):
    """Return a context that disables autocast on ``device_type``, or a no-op if it is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4, or a device type autocast does not know
        enabled = True
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


# Process-wide matmul precision settings that make float32 products round their inputs
# (TF32 on GPUs, bf16 on some CPUs), and the accumulators currently multiplying.
_PRECISION_LOCK = threading.Lock()
_precision_users = 0
_saved_precision: Optional[Tuple[Tuple[object, str], ...]] = None


# The per-backend settings of recent torch releases; older ones have only the process-wide one.
_PRECISION_BACKENDS = tuple(
    b for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul) if hasattr(b, "fp32_precision")
)


def _reduced_precision_settings() -> Tuple[Tuple[object, str], ...]:
    """Return ``(backend, value)`` for each matmul precision setting that is not full float32."""
    if _PRECISION_BACKENDS:
        # A backend left at "none" follows the process-wide default.
        full = ("ieee", "none") if getattr(torch.backends, "fp32_precision", "ieee") in ("ieee", "none") else ("ieee",)
        values = [(b, b.fp32_precision) for b in _PRECISION_BACKENDS]
        return tuple((b, value) for b, value in values if value not in full)
    precision = torch.get_float32_matmul_precision()
    return () if precision == "highest" else ((torch, precision),)


def _set_precision(backend: object, value: Optional[str]) -> None:
    if backend is torch:
        torch.set_float32_matmul_precision(value or "highest")
    else:
        backend.fp32_precision = value or "ieee"


@contextlib.contextmanager
def _full_precision_products():
    """Run the float32 Gram products at full precision, whatever the process-wide setting.

    ``torch.set_float32_matmul_precision("high")``, which training frameworks recommend
    on recent GPUs, lets float32 products round their inputs to TF32's 10 mantissa bits:
    harmless for training, but a relative error of 1e-5 to 1e-4 in a covariance, far over
    SPEC §4. The setting is process-wide, so it is raised while any accumulator
    multiplies and put back, exactly as it was, when the last one is done. Another
    thread's products in that window only run at full precision.
    """
    global _precision_users, _saved_precision
    with _PRECISION_LOCK:
        if _precision_users == 0:
            try:
                _saved_precision = _reduced_precision_settings()
                for backend, _ in _saved_precision:
                    _set_precision(backend, None)
            except (AttributeError, RuntimeError, TypeError):  # settings torch will not report
                _saved_precision = ()
        _precision_users += 1
    try:
        yield
    finally:
        with _PRECISION_LOCK:
            _precision_users -= 1
            if _precision_users == 0:
                for backend, value in _saved_precision or ():
                    _set_precision(backend, value)
                _saved_precision = None


# Device types without float64 arithmetic (Apple's MPS).
_NO_FLOAT64 = ("mps",)


def _float64_home(device: torch.device) -> torch.device:
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
        self._fresh = True  # no row merged since the last reset: a batch picks the shift
        self._since_shift = 0  # batches added since the shift last moved

    # ------------------------------------------------------------------ state
    # n, mean, scatter and skipped are the public state, derived from n, s, t and S;
    # _load_state replaces them together (a distributed sync, a restore).
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
    def update_rows(self, x: torch.Tensor) -> None:
        """Merge a tensor of shape ``(..., features)``: every index of the leading dimensions is a row.

        This reads layer outputs without reshaping them first: the rows of a
        channels-first feature map are ``output.movedim(1, -1)``, a view, and the one
        copy the accumulator makes anyway is written in the layout its product wants.

        Parameters
        ----------
        x : torch.Tensor
            At least two dimensions, any floating dtype, any strides.

        """
        if x.dim() < 2:
            raise ValueError(f"update_rows expects a (..., features) tensor, got shape {tuple(x.shape)}")
        self._update(x)

    @run_eagerly
    def _update(self, x: torch.Tensor) -> None:
        features = x.shape[-1]
        if self._dim is not None and features != self._dim:
            raise ValueError(f"feature dimension changed from {self._dim} to {features}")
        if x.numel() == 0:
            return
        # A hook can fire under autocast or inference_mode; the products must not be
        # downcast and the state must stay an ordinary tensor. (The checks are cheaper
        # than entering both contexts on every batch.)
        inference = torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()
        with inference, _autocast_off(x.device.type), self._lock:
            x = x.detach()
            if self._gram is None:
                self._allocate(features, self.device if self.device is not None else _float64_home(x.device))
            if x.device != self._gram.device:
                # To the host a copy must be complete before the CPU reads it: only copies
                # to an accelerator may run asynchronously (they are ordered on its stream).
                x = x.to(self._gram.device, non_blocking=self._gram.device.type != "cpu")
            self._add_batch(x)

    def _add_batch(self, x: torch.Tensor) -> None:
        # float64 activations are never rounded to float32: that would cost digits.
        wide = self.float64_products or x.dtype == torch.float64 or self._dim < _FLOAT32_MIN_FEATURES
        work = torch.float64 if wide else torch.float32
        if self._shift is None or self._shift.dtype != work or self._since_shift >= _SHIFT_EVERY:
            if self._fresh:
                target = _first_shift(x, work)
            else:  # the running mean (the shift itself while no row was accepted)
                target = (self._origin + self._sum / self._n.clamp_min(1.0)).to(work)
            self._move_shift(target)
        bounds = _block_bounds(self._dim)
        with _full_precision_products():
            gram, sums = _centred_gram(x, self._shift, work, bounds)
        rows = x.numel() // x.shape[-1]
        # A non-finite value anywhere makes its column's diagonal entry, hence the trace,
        # non-finite. The batch is then dropped on the device: no host round trip.
        ok = torch.isfinite(gram.trace())
        bad = ~ok
        if self._dim >= _BLOCKWISE_FEATURES:
            for start, stop in zip(bounds[:-1], bounds[1:]):
                self._gram[start:stop, :stop].add_(gram[start:stop, :stop].masked_fill_(bad, 0.0))
        else:
            self._gram.add_(gram.masked_fill_(bad, 0.0))
        self._sum.add_(sums.masked_fill_(bad, 0.0))
        self._n.add_(ok, alpha=rows)
        self._skipped.add_(bad)
        self._fresh = False
        self._since_shift += 1

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

    def state_tensors(self) -> dict:
        """Return the state as plain tensors (for checkpointing or collective sync)."""
        with self._lock:
            return {"n": self.n, "mean": self.mean, "scatter": self.scatter, "skipped": self.skipped}

    # ------------------------------------------------------------ distributed
    @classmethod
    def _from_state(cls, n, mean, scatter, skipped, like: TorchCovarianceMatrix) -> TorchCovarianceMatrix:
        """Build an accumulator around given state tensors (they are not copied)."""
        acc = cls(device=like.device, float64_products=like.float64_products)
        acc._load_state(n, mean, scatter, skipped)
        return acc

    def _load_state(self, n, mean, scatter, skipped) -> None:
        """Replace the state by a count, mean, scatter matrix and skipped count (not copied)."""
        with self._lock:
            self._dim = int(mean.shape[0])
            self._n, self._skipped = n, skipped
            # Moments about the mean itself: t = 0 and S is the scatter.
            self._origin, self._sum, self._gram = mean, torch.zeros_like(mean), scatter
            self._shift = None
            self._fresh = False

    def synced(self, group=None) -> TorchCovarianceMatrix:
        """Return a new accumulator holding the rows that every rank of a process group has seen.

        Every rank's count, mean and scatter are gathered and merged exactly, in rank
        order, with the same pairwise update :meth:`merge` uses, so each rank gets the
        same result: the statistics of the union of all ranks' rows, not an average
        of per-rank covariances. ``self`` is left untouched, so syncing twice never
        counts a row twice.

        This is a collective call: every rank of ``group`` must make it, in the same
        order, including ranks whose accumulator has seen no data (they contribute
        nothing). Without an initialised process group of more than one rank it
        returns a plain copy.

        Parameters
        ----------
        group : torch.distributed.ProcessGroup, optional
            The group to combine over; ``None`` is the default (world) group.

        Returns
        -------
        TorchCovarianceMatrix
            A new accumulator; it has no dimension if no rank has seen any data.

        Raises
        ------
        ValueError
            If ranks disagree on the feature dimension (all ranks raise together).

        """
        import torch.distributed as dist

        copy = TorchCovarianceMatrix(device=self.device, float64_products=self.float64_products)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
            with self._lock:
                return copy.merge(self)
        world = dist.get_world_size(group)
        # NCCL moves only CUDA tensors; every other backend is given host tensors.
        if dist.get_backend(group) == "nccl":
            comm = torch.device("cuda", torch.cuda.current_device())
        else:
            comm = torch.device("cpu")

        # Dimensions first: a rank without data still has to know the payload size.
        local_dim = torch.tensor([-1 if self.dim is None else self.dim], dtype=torch.int64, device=comm)
        dims = [torch.empty_like(local_dim) for _ in range(world)]
        dist.all_gather(dims, local_dim, group=group)
        dims = [int(d.item()) for d in dims]
        known = sorted({d for d in dims if d >= 0})
        if not known:
            return copy
        if len(known) > 1:
            raise ValueError(f"ranks disagree on the feature dimension: {dims} (rank order, -1 = no data)")
        dim = known[0]

        # One flat float64 message per rank: n, skipped, mean, scatter.
        payload = torch.zeros(2 + dim + dim * dim, dtype=torch.float64, device=comm)
        if self.mean is not None:
            with self._lock:
                payload[0] = self.n.to(comm)
                payload[1] = self.skipped.to(comm, torch.float64)
                payload[2 : 2 + dim] = self.mean.to(comm)
                payload[2 + dim :] = self.scatter.to(comm).reshape(-1)
        gathered = [torch.empty_like(payload) for _ in range(world)]
        dist.all_gather(gathered, payload, group=group)

        if self.mean is not None:
            target = self.mean.device
        else:
            target = self.device if self.device is not None else comm
        for rank, message in enumerate(gathered):
            if dims[rank] < 0:
                continue
            message = message.to(target)
            part = TorchCovarianceMatrix._from_state(
                message[0],
                message[2 : 2 + dim],
                message[2 + dim :].reshape(dim, dim),
                message[1].to(torch.int64),
                like=self,
            )
            copy.merge(part)
        return copy
