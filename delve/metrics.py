"""Statistics of a covariance matrix, all derived from one eigendecomposition.

:func:`layer_statistics` is the single path the tracker uses: it decomposes a
covariance once and evaluates every requested statistic on the result. The
``compute_*`` functions are conveniences for one statistic of one matrix and go
through the same path.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import numpy as np
import torch

__all__ = [
    "STATMAP",
    "SCALAR_STATS",
    "layer_statistics",
    "idim_of_eigenvalues",
    "compute_intrinsic_dimensionality",
    "compute_saturation",
    "compute_cov_determinant",
    "compute_cov_trace",
    "compute_diag_trace",
    "compute_spectrum",
    "compute_effective_rank",
    "compute_participation_ratio",
]

#: Short stat name -> the long name used in keys, CSV columns and folder names.
STATMAP: Dict[str, str] = {
    "idim": "intrinsic-dimensionality",
    "lsat": "saturation",
    "cov": "covariance-matrix",
    "det": "covariance-determinant",
    "trc": "covariance-trace",
    "dtrc": "diagonal-trace",
    "embed": "embedded-sample",
    "spectrum": "spectrum",
    "erank": "effective-rank",
    "pr": "participation-ratio",
}

#: Stats whose value is one number (CSV columns, plots, TensorBoard scalars).
SCALAR_STATS = ("idim", "lsat", "det", "trc", "dtrc", "erank", "pr")

Matrix = Union[torch.Tensor, np.ndarray]
_RATIO_TOLERANCE = 1e-12


def _as_float64(cov: Matrix) -> torch.Tensor:
    cov = torch.as_tensor(cov)
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"expected a square covariance matrix, got shape {tuple(cov.shape)}")
    return cov.to(torch.float64)


def idim_of_eigenvalues(eig: Union[np.ndarray, torch.Tensor], thresh: float) -> int:
    """Return the smallest k whose k leading eigenvalues explain ``thresh`` of their sum.

    ``eig`` must be sorted descending with negatives clamped to 0 (as
    :func:`layer_statistics` and the PCA layers hold them); an all-zero spectrum gives 0.
    """
    eig = _host(eig)
    total = eig.sum()
    if total <= 0:
        return 0
    ratios = np.cumsum(eig) / total
    # Smallest k whose leading eigenvalues explain `thresh` of the variance. The
    # tolerance only absorbs summation rounding: at thresh=1 the eigenvalues a
    # rank-deficient matrix gets from rounding (~1e-16 of the total) do not count.
    below = int(np.count_nonzero(ratios < thresh - _RATIO_TOLERANCE))
    return min(below + 1, eig.shape[0])


def _host(eig) -> np.ndarray:
    # The statistics of d eigenvalues cost microseconds in numpy; on the device each
    # would be a kernel launch and a synchronisation.
    if torch.is_tensor(eig):
        eig = eig.detach().cpu().numpy()
    return np.asarray(eig, dtype=np.float64)


def _effective_rank(eig: np.ndarray) -> float:
    total = eig.sum()
    if total <= 0:
        return 0.0
    p = eig / total
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _participation_ratio(eig: np.ndarray) -> float:
    square_sum = (eig * eig).sum()
    if square_sum <= 0:
        return 0.0
    return float(eig.sum() ** 2 / square_sum)


def _spectrum(eig: np.ndarray, k: int) -> np.ndarray:
    top = eig[:k].copy()
    if top.shape[0] < k:
        top = np.concatenate([top, np.zeros(k - top.shape[0])])
    return top


def layer_statistics(
    cov: Matrix,
    stats: Iterable[str],
    thresh: float = 0.99,
    spectrum_k: int = 5,
    samples: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
) -> Dict[str, object]:
    """Compute several statistics of one covariance matrix from a single eigendecomposition.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray
        Symmetric ``(d, d)`` covariance matrix.
    stats : iterable of str
        Keys of :data:`STATMAP`.
    thresh : float, default 0.99
        Fraction of the variance the intrinsic dimensionality must explain.
    spectrum_k : int, default 5
        How many leading eigenvalues ``spectrum`` reports.
    samples : torch.Tensor, optional
        ``(m, d)`` rows to embed; needed for ``embed``.
    mean : torch.Tensor, optional
        Mean the samples are centred on before the projection (``embed``).

    Returns
    -------
    dict
        Stat name -> value: ``int`` for ``idim``, ``float`` for the scalar stats,
        ``numpy.ndarray`` for ``cov``, ``spectrum`` and ``embed``.

    """
    stats = list(stats)
    cov64 = _as_float64(cov)
    d = cov64.shape[0]
    if "embed" in stats:
        # Eigenvectors only when a projection needs them: eigh costs several eigvalsh.
        values, vectors = torch.linalg.eigh(cov64)
        vectors = vectors.flip(1)
    else:
        values, vectors = torch.linalg.eigvalsh(cov64), None
    # One transfer of d numbers to the host; every statistic below is computed there.
    eig = np.maximum(values.cpu().numpy()[::-1], 0.0)

    out: Dict[str, object] = {}
    idim = None
    for stat in stats:
        if stat in ("idim", "lsat") and idim is None:
            idim = idim_of_eigenvalues(eig, thresh)
        if stat == "idim":
            out[stat] = idim
        elif stat == "lsat":
            out[stat] = idim / d
        elif stat == "cov":
            out[stat] = cov64.cpu().numpy()
        elif stat == "det":
            out[stat] = float(np.prod(eig))
        elif stat == "trc":
            out[stat] = float(torch.trace(cov64).item())
        elif stat == "dtrc":
            out[stat] = float(eig.sum())
        elif stat == "spectrum":
            out[stat] = _spectrum(eig, spectrum_k)
        elif stat == "erank":
            out[stat] = _effective_rank(eig)
        elif stat == "pr":
            out[stat] = _participation_ratio(eig)
        elif stat == "embed":
            out[stat] = _embed(samples, mean, vectors)
        else:
            raise ValueError(f"unknown stat {stat!r}; valid stats are {sorted(STATMAP)}")
    return out


def _embed(samples: Optional[torch.Tensor], mean: Optional[torch.Tensor], vectors: torch.Tensor) -> np.ndarray:
    if samples is None or samples.shape[0] == 0:
        return np.zeros((0, 2))
    centred = samples.to(vectors.device, torch.float64)
    if mean is not None:
        centred = centred - mean.to(vectors.device, torch.float64)
    top = vectors[:, :2]
    scores = (centred @ top).cpu().numpy()
    if scores.shape[1] < 2:  # a one-feature layer has one direction; the second is 0
        scores = np.concatenate([scores, np.zeros((scores.shape[0], 2 - scores.shape[1]))], axis=1)
    return scores


def _one(cov: Matrix, stat: str, **kwargs) -> object:
    return layer_statistics(cov, [stat], **kwargs)[stat]


def compute_intrinsic_dimensionality(cov: Matrix, thresh: float = 0.99) -> int:
    """Return the number of leading eigendirections that explain ``thresh`` of the variance."""
    return _one(cov, "idim", thresh=thresh)


def compute_saturation(cov: Matrix, thresh: float = 0.99) -> float:
    """Return the intrinsic dimensionality divided by the feature dimension."""
    return _one(cov, "lsat", thresh=thresh)


def compute_cov_determinant(cov: Matrix) -> float:
    """Return the determinant of the covariance (product of its clamped eigenvalues)."""
    return _one(cov, "det")


def compute_cov_trace(cov: Matrix) -> float:
    """Return the trace of the covariance matrix (total variance)."""
    return _one(cov, "trc")


def compute_diag_trace(cov: Matrix) -> float:
    """Return the trace of the diagonalised covariance (sum of its clamped eigenvalues)."""
    return _one(cov, "dtrc")


def compute_spectrum(cov: Matrix, k: int = 5) -> np.ndarray:
    """Return the ``k`` largest eigenvalues in descending order (zero-padded)."""
    return _one(cov, "spectrum", spectrum_k=k)


def compute_effective_rank(cov: Matrix) -> float:
    """Return the effective rank: exp of the Shannon entropy of the normalised eigenvalues."""
    return _one(cov, "erank")


def compute_participation_ratio(cov: Matrix) -> float:
    """Return the participation ratio ``(Σλ)² / Σλ²`` of the eigenvalues."""
    return _one(cov, "pr")
