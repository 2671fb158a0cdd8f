"""The streaming covariance accumulator every tracked layer and PCA layer feeds.

The state is the count ``n``, the float64 mean and the float64 scatter matrix
``M = Σ (x - mean)(x - mean)ᵀ`` of all rows seen since the last reset. Each batch is
reduced to the same three quantities and merged with the pairwise update of Chan,
Golub & LeVeque, which is exact in exact arithmetic and loses no digits to a large
mean: the population covariance is ``M / n`` (the paper's ``ΣAᵀA/n − μμᵀ`` without
its cancellation).
"""

from __future__ import annotations

import threading
from typing import Optional, Union

import torch

__all__ = ["TorchCovarianceMatrix", "covariance_bytes"]

DeviceLike = Union[str, torch.device, None]


def covariance_bytes(dim: int) -> int:
    """Return the bytes one accumulator of feature dimension ``dim`` needs at its peak.

    The float64 scatter matrix, plus the batch's own scatter (float64) and Gram product
    (float32) that exist while a batch is merged.
    """
    return dim * dim * (8 + 8 + 4)


class TorchCovarianceMatrix:
    """Exact float64 running covariance of the rows of every matrix given to :meth:`update`.

    Parameters
    ----------
    device : str or torch.device, optional
        Where the state lives. ``None`` (default) keeps it on the device of the first
        batch, so no activation is ever copied between devices.
    float64_products : bool, default False
        Compute each batch's Gram product in float64. By default it is computed in
        float32 on data centred on a running shift, which keeps the result within
        1e-6 relative of the float64 two-pass reference at a fraction of the cost;
        set this for bit-for-bit float64 products.

    Notes
    -----
    Batches containing NaN or Inf are skipped whole and counted in :attr:`skipped`.
    The check happens on the device, so a GPU never waits for the host.
    Updates may come from several threads at once (``nn.DataParallel``).

    """

    def __init__(self, device: DeviceLike = None, float64_products: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.float64_products = bool(float64_products)
        self._lock = threading.Lock()
        # The shift that batches are centred on before their Gram product: the first
        # batch's own mean, then the running mean. reset() drops it, because weights
        # move between epochs and a stale shift far from the data costs float32 digits.
        self._shift: Optional[torch.Tensor] = None
        self.n: Optional[torch.Tensor] = None
        self.mean: Optional[torch.Tensor] = None
        self.scatter: Optional[torch.Tensor] = None
        self.skipped: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ state
    @property
    def dim(self) -> Optional[int]:
        """Feature dimension, or ``None`` before the first batch."""
        return None if self.mean is None else self.mean.shape[0]

    @property
    def count(self) -> int:
        """Number of rows merged since the last reset (synchronises with the device)."""
        return 0 if self.n is None else int(self.n.item())

    @property
    def skipped_batches(self) -> int:
        """Number of batches skipped for non-finite values since the last reset."""
        return 0 if self.skipped is None else int(self.skipped.item())

    def _allocate(self, dim: int, device: torch.device) -> None:
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Forget every row seen so far (the feature dimension is kept)."""
        with self._lock:
            if self.mean is not None:
                self.n.zero_()
                self.mean.zero_()
                self.scatter.zero_()
                self.skipped.zero_()
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
        rows = x.shape[0]
        if rows == 0:
            return
        # A hook can fire under autocast or inference_mode; the products must not be
        # downcast and the state must stay an ordinary tensor.
        with torch.inference_mode(False), torch.autocast(x.device.type, enabled=False):
            x = x.detach()
            if self.device is not None and x.device != self.device:
                x = x.to(self.device, non_blocking=True)
            if self.mean is None:
                with self._lock:
                    if self.mean is None:
                        self._allocate(x.shape[1], x.device)
            elif x.shape[1] != self.mean.shape[0]:
                raise ValueError(
                    f"feature dimension changed from {self.mean.shape[0]} to {x.shape[1]}"
                )
            n_b, mean_b, scatter_b, finite = self._batch_moments(x)
            with self._lock:
                self._merge(n_b, mean_b, scatter_b, finite)
                if self._shift is not None:  # None: reset() came in between; the next batch picks one
                    self._shift = torch.where(self.n > 0, self.mean, self._shift).to(self._shift.dtype)

    def _batch_moments(self, x: torch.Tensor):
        """Reduce a batch to (count, mean, scatter about its mean, all-finite flag)."""
        # float64 activations are never rounded to float32: that would cost digits.
        wide = self.float64_products or x.dtype == torch.float64
        work = torch.float64 if wide else torch.float32
        if self._shift is None or self._shift.dtype != work or self._shift.device != x.device:
            self._shift = torch.nan_to_num(x.to(work).mean(0), nan=0.0, posinf=0.0, neginf=0.0)
        shift = self._shift
        # Subtracting a shift close to the data is exact in floating point (Sterbenz),
        # so the centred values keep full precision even when |mean| >> std.
        centred = torch.sub(x, shift) if x.dtype == work else torch.sub(x.to(work), shift)
        gram = centred.T @ centred
        offset = centred.sum(0, dtype=torch.float64)
        rows = x.shape[0]
        gram = gram.to(torch.float64)
        finite = torch.isfinite(offset).all() & torch.isfinite(gram.diagonal()).all()
        offset_mean = offset / rows
        scatter_b = gram - torch.outer(offset, offset_mean)
        mean_b = shift.to(torch.float64) + offset_mean
        return rows, mean_b, scatter_b, finite

    def _merge(self, n_b, mean_b: torch.Tensor, scatter_b: torch.Tensor, finite) -> None:
        """Chan's pairwise merge of a batch (or another accumulator) into the state."""
        if not torch.is_tensor(finite):
            finite = torch.tensor(bool(finite), device=self.mean.device)
        n_b = torch.where(finite, torch.as_tensor(n_b, dtype=torch.float64, device=self.mean.device), 0.0)
        mean_b = torch.where(finite, mean_b, 0.0)
        scatter_b = torch.where(finite, scatter_b, 0.0)
        n = self.n + n_b
        weight = n_b / n.clamp_min(1.0)
        delta = mean_b - self.mean
        self.scatter += scatter_b + torch.outer(delta, delta) * (self.n * weight)
        self.mean += delta * weight
        self.n.copy_(n)
        self.skipped += (~finite).to(torch.int64)

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
        if self.mean is None:
            self._allocate(other.dim, other.mean.device if self.device is None else self.device)
            self._shift = other.mean.to(torch.float64 if self.float64_products else torch.float32)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge dimension {other.dim} into dimension {self.dim}")
        dev = self.mean.device
        with self._lock:
            self._merge(other.n.to(dev), other.mean.to(dev), other.scatter.to(dev), True)
            self.skipped += other.skipped.to(dev)
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
        if self.mean is None:
            raise RuntimeError("the covariance of no data is undefined: update() was never called")
        with self._lock:
            n = self.n.clamp_min(1.0)
            cov = self.scatter / n
            cov = 0.5 * (cov + cov.T)
            if not center:
                cov = cov + torch.outer(self.mean, self.mean)
            return cov

    def state_tensors(self) -> dict:
        """Return the state as plain tensors (for checkpointing or collective sync)."""
        return {"n": self.n, "mean": self.mean, "scatter": self.scatter, "skipped": self.skipped}

    # ------------------------------------------------------------ distributed
    @classmethod
    def _from_state(cls, n, mean, scatter, skipped, like: TorchCovarianceMatrix) -> TorchCovarianceMatrix:
        """Build an accumulator around given state tensors (they are not copied)."""
        acc = cls(device=like.device, float64_products=like.float64_products)
        acc.n, acc.mean, acc.scatter, acc.skipped = n, mean, scatter, skipped
        return acc

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
