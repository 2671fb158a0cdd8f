"""The streaming covariance accumulator every tracked layer and PCA layer feeds.

The state is the count ``n``, the float64 mean and the float64 scatter matrix
``M = Σ (x - mean)(x - mean)ᵀ`` of all rows seen since the last reset. Batches are
merged with the pairwise update of Chan, Golub & LeVeque, which is exact in exact
arithmetic and loses no digits to a large mean: the population covariance is
``M / n`` (the paper's ``ΣAᵀA/n − μμᵀ`` without its cancellation).

How a batch is reduced, and why it is cheap:

* its rows are centred on a *shift* (the running mean, as float32) while they are
  copied once into a reused workspace, in the layout the Gram product wants; that one
  copy also turns a channels-first feature map into rows without a separate reshape.
  Subtracting a shift close to the data is exact in floating point (Sterbenz), so the
  float32 products keep their digits even when ``|mean|`` is ``10⁴·std``;
* the Gram product runs over blocks of at most ``max(1024, features)`` rows whose
  float32 results are summed in float64, so rounding does not grow with the batch;
* the batch's Gram matrix and row sum are added to a float64 *window* about the
  same shift; every few batches (and whenever the state is read) the window is merged
  into ``n, mean, M`` and the shift moves to the new mean. Per batch that is a handful
  of tensor operations, none of which waits for the device.
"""

from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple, Union

import torch

__all__ = ["TorchCovarianceMatrix", "covariance_bytes", "workspace_bytes", "release_workspace"]

DeviceLike = Union[str, torch.device, None]

# A float32 Gram product accumulates each entry over the rows in order; over many rows
# its rounding grows past what SPEC §4 allows, so products are taken over row blocks
# of this size (or the feature count, whichever is larger) and summed in float64.
_BLOCK_ROWS = 4096
# Below this many features the product is bound by memory, not arithmetic, and BLAS
# kernels sum long runs of rows one by one; float64 products cost little there and
# keep every digit.
_FLOAT32_MIN_FEATURES = 16
# Batches added to the window between two merges into the state (and shift updates).
_FOLD_EVERY = 8
# A workspace larger than this is not kept between batches.
_MAX_KEPT_WORKSPACE = 512 * 2**20

_local = threading.local()


def covariance_bytes(dim: int) -> int:
    """Return the bytes one accumulator of feature dimension ``dim`` needs at its peak.

    The float64 scatter matrix and window, and, while a batch is merged, its float64
    Gram sum and the gated copy of it. The centred copy of the batch is not counted:
    see :func:`workspace_bytes`.
    """
    return dim * dim * (8 + 8 + 8 + 8)


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


def _block_bounds(features: int) -> Tuple[int, ...]:
    """Split the features into the blocks whose lower block triangle the Gram product computes.

    A Gram matrix is symmetric: computing block row ``i`` only up to its diagonal block
    skips up to half of the multiply-adds (0.75 of them with two blocks, 0.56 with
    eight). Blocks keep at least 16 features, on multiples of 8, so each product still
    runs at full speed.
    """
    parts = min(8, features // 16)
    if parts < 2:
        return (0, features)
    inner = sorted({8 * round(i * features / parts / 8) for i in range(1, parts)} - {0, features})
    return (0, *inner, features)


def _centred_gram(
    x: torch.Tensor, shift: torch.Tensor, work: torch.dtype, bounds: Tuple[int, ...]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the Gram matrix and the column sums of the rows of ``x`` centred on ``shift``.

    ``x`` has shape ``(..., features)``: every index of the leading dimensions is a row.
    Only the lower block triangle of the Gram matrix (blocks given by ``bounds``) is
    computed; the blocks above it are zero (see :func:`_mirror_lower_blocks`). It is
    float64 when it was summed over row blocks, else ``work``.
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
    if len(bounds) == 2 and blocks == 1:
        return chunks[0] @ chunks[0].T, sums
    gram = torch.zeros(features, features, dtype=dtype, device=x.device)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = gram[start:stop, :stop]
        if blocks == 1:
            torch.mm(chunks[0, start:stop], chunks[0, :stop].T, out=part)
        else:
            torch.sum(torch.bmm(chunks[:, start:stop], chunks[:, :stop].transpose(1, 2)), 0, dtype=dtype, out=part)
    return gram, sums


def _mirror_lower_blocks(gram: torch.Tensor, bounds: Tuple[int, ...]) -> None:
    """Fill the blocks above the block diagonal from those below it, in place."""
    for start, stop in zip(bounds[1:-1], bounds[2:]):
        gram[:start, start:stop].copy_(gram[start:stop, :start].T)


class TorchCovarianceMatrix:
    """Exact float64 running covariance of the rows of every matrix given to :meth:`update`.

    Parameters
    ----------
    device : str or torch.device, optional
        Where the state lives. ``None`` (default) keeps it on the device of the first
        batch, so no activation is ever copied between devices.
    float64_products : bool, default False
        Compute each batch's Gram product in float64. By default it is computed in
        float32 on data centred on a running shift, over row blocks summed in float64,
        which keeps the result within 1e-6 relative of the float64 two-pass reference
        at a fraction of the cost; set this for float64 products throughout.

    Notes
    -----
    Batches containing NaN or Inf are skipped whole and counted in :attr:`skipped`.
    The check happens on the device, so a GPU never waits for the host.
    Updates may come from several threads at once (``nn.DataParallel``).

    """

    def __init__(self, device: DeviceLike = None, float64_products: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.float64_products = bool(float64_products)
        # Re-entrant: reading a public state attribute merges the window under the lock.
        self._lock = threading.RLock()
        # The shift that batches are centred on before their Gram product (float32, or
        # float64 for float64 products): the first batch's mean, then the running mean.
        # reset() drops it, because weights move between epochs and a stale shift far
        # from the data costs float32 digits.
        self._shift: Optional[torch.Tensor] = None
        self._dim: Optional[int] = None
        self._n: Optional[torch.Tensor] = None
        self._mean: Optional[torch.Tensor] = None
        self._scatter: Optional[torch.Tensor] = None
        self._skipped: Optional[torch.Tensor] = None
        # The window: Gram sum, row sum, row count and accepted-batch count of the
        # batches since the last fold, all about ``_shift``; ``_pending`` batches in it.
        self._win_gram: Optional[torch.Tensor] = None
        self._win_sum: Optional[torch.Tensor] = None
        self._win_rows: Optional[torch.Tensor] = None
        self._win_ok: Optional[torch.Tensor] = None
        self._pending = 0
        # The feature blocks of the window's Gram sum: only its lower block triangle is
        # accumulated, and mirrored when the window is merged.
        self._bounds: Tuple[int, ...] = ()

    # ------------------------------------------------------------------ state
    # n, mean, scatter and skipped are the public state. Reading one first merges the
    # batches still in the window; assigning one replaces the state (as a distributed
    # sync or a checkpoint restore does).
    @property
    def n(self) -> Optional[torch.Tensor]:
        """Number of rows merged (float64 scalar tensor), or ``None`` before the first batch."""
        self._fold()
        return self._n

    @n.setter
    def n(self, value: Optional[torch.Tensor]) -> None:
        self._n = value

    @property
    def mean(self) -> Optional[torch.Tensor]:
        """Float64 mean of the rows merged, or ``None`` before the first batch."""
        self._fold()
        return self._mean

    @mean.setter
    def mean(self, value: Optional[torch.Tensor]) -> None:
        self._mean = value
        self._dim = None if value is None else int(value.shape[0])

    @property
    def scatter(self) -> Optional[torch.Tensor]:
        """Float64 scatter matrix ``Σ (x - mean)(x - mean)ᵀ``, or ``None`` before the first batch."""
        self._fold()
        return self._scatter

    @scatter.setter
    def scatter(self, value: Optional[torch.Tensor]) -> None:
        self._scatter = value

    @property
    def skipped(self) -> Optional[torch.Tensor]:
        """Number of non-finite batches skipped (int64 scalar tensor), or ``None`` before the first batch."""
        self._fold()
        return self._skipped

    @skipped.setter
    def skipped(self, value: Optional[torch.Tensor]) -> None:
        self._skipped = value

    @property
    def dim(self) -> Optional[int]:
        """Feature dimension, or ``None`` before the first batch."""
        return self._dim

    @property
    def count(self) -> int:
        """Number of rows merged since the last reset (synchronises with the device)."""
        n = self.n
        return 0 if n is None else int(n.item())

    @property
    def skipped_batches(self) -> int:
        """Number of batches skipped for non-finite values since the last reset."""
        skipped = self.skipped
        return 0 if skipped is None else int(skipped.item())

    def _allocate(self, dim: int, device: torch.device) -> None:
        self._dim = dim
        self._n = torch.zeros((), dtype=torch.float64, device=device)
        self._mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self._scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)

    def _allocate_window(self) -> None:
        device, dim = self._mean.device, self._dim
        self._bounds = _block_bounds(dim)
        self._win_gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._win_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._win_rows = torch.zeros((), dtype=torch.float64, device=device)
        self._win_ok = torch.zeros((), dtype=torch.int64, device=device)
        self._pending = 0

    def reset(self) -> None:
        """Forget every row seen so far (the feature dimension is kept)."""
        with self._lock:
            if self._mean is not None:
                self._n.zero_()
                self._mean.zero_()
                self._scatter.zero_()
                self._skipped.zero_()
            if self._win_gram is not None:
                self._allocate_window()
            self._shift = None

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

    def _update(self, x: torch.Tensor) -> None:
        features = x.shape[-1]
        if features == 0 or x.numel() == 0:
            if self._dim is not None and features != self._dim:
                raise ValueError(f"feature dimension changed from {self._dim} to {features}")
            return
        # A hook can fire under autocast or inference_mode; the products must not be
        # downcast and the state must stay an ordinary tensor.
        with torch.inference_mode(False), torch.autocast(x.device.type, enabled=False):
            x = x.detach()
            with self._lock:
                if self._mean is None:
                    self._allocate(features, self.device if self.device is not None else x.device)
                elif features != self._dim:
                    raise ValueError(f"feature dimension changed from {self._dim} to {features}")
                if x.device != self._mean.device:
                    x = x.to(self._mean.device, non_blocking=True)
                if self._win_gram is None:
                    self._allocate_window()
                self._add_batch(x)

    def _add_batch(self, x: torch.Tensor) -> None:
        """Add one batch to the window; merge the window into the state every few batches."""
        # float64 activations are never rounded to float32: that would cost digits.
        wide = self.float64_products or x.dtype == torch.float64 or self._dim < _FLOAT32_MIN_FEATURES
        work = torch.float64 if wide else torch.float32
        if self._shift is None or self._shift.dtype != work:
            self._fold()  # the window is kept about one shift; merge it before changing that
            if self._shift is None:
                lead = tuple(range(x.dim() - 1))
                self._shift = torch.nan_to_num(x.mean(lead, dtype=work), nan=0.0, posinf=0.0, neginf=0.0)
            else:
                self._shift = self._shift.to(work)
        gram, sums = _centred_gram(x, self._shift, work, self._bounds)
        rows = x.numel() // x.shape[-1]
        # A non-finite value anywhere makes its column's diagonal entry, hence the trace,
        # non-finite. The batch is then dropped on the device: no host round trip.
        ok = torch.isfinite(gram.trace())
        self._win_gram.add_(torch.where(ok, gram, 0.0))
        self._win_sum.add_(torch.where(ok, sums, 0.0))
        self._win_rows.add_(ok, alpha=rows)
        self._win_ok.add_(ok)
        self._pending += 1
        if self._pending >= _FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        """Merge the window into ``n, mean, scatter`` and move the shift to the new mean."""
        with self._lock:
            if not self._pending:
                return
            _mirror_lower_blocks(self._win_gram, self._bounds)
            rows = self._win_rows
            offset = self._win_sum / rows.clamp_min(1.0)  # window mean minus the shift
            # The window's scatter about its own mean, in place: the window is reset below.
            self._win_gram.addr_(self._win_sum, offset, alpha=-1.0)
            self._merge(rows, self._shift.to(torch.float64) + offset, self._win_gram)
            self._skipped.add_(self._pending).sub_(self._win_ok)
            self._shift = torch.where(self._n > 0, self._mean, self._shift).to(self._shift.dtype)
            self._win_gram.zero_()
            self._win_sum.zero_()
            self._win_rows.zero_()
            self._win_ok.zero_()
            self._pending = 0

    def _merge(self, n_b: torch.Tensor, mean_b: torch.Tensor, scatter_b: torch.Tensor) -> None:
        """Chan's pairwise merge of a batch (or another accumulator) into the state."""
        n = self._n + n_b
        weight = n_b / n.clamp_min(1.0)
        delta = mean_b - self._mean
        self._scatter.add_(scatter_b)
        self._scatter.addr_(delta, delta * (self._n * weight))
        self._mean.add_(delta * weight)
        self._n.copy_(n)

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
        if other.mean is None:
            return self
        with self._lock:
            self._fold()
            if self._mean is None:
                self._allocate(other.dim, other.mean.device if self.device is None else self.device)
            if other.dim != self._dim:
                raise ValueError(f"cannot merge dimension {other.dim} into dimension {self._dim}")
            dev = self._mean.device
            self._merge(other.n.to(dev), other.mean.to(dev), other.scatter.to(dev))
            self._skipped.add_(other.skipped.to(dev))
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
            self._fold()
            if self._mean is None:
                raise RuntimeError("the covariance of no data is undefined: update() was never called")
            cov = self._scatter / self._n.clamp_min(1.0)
            cov = 0.5 * (cov + cov.T)
            if not center:
                cov = cov + torch.outer(self._mean, self._mean)
            return cov

    def state_tensors(self) -> dict:
        """Return the state as plain tensors (for checkpointing or collective sync)."""
        with self._lock:
            self._fold()
            return {"n": self._n, "mean": self._mean, "scatter": self._scatter, "skipped": self._skipped}
