"""The statistics delve reports, declared once each, and the one eigendecomposition they share.

Every statistic is a :class:`Statistic`: its short name (``lsat``), the stem of its column
names (``saturation``), what it is computed from, what kind of value it gives and how
that value is shown. The tracker, the writers, the pictures, ``delve summary`` and
:func:`delve.tools.reconstruct_csv_from_npy_data` all read these declarations, so a
statistic added with :func:`register_stat` appears everywhere with no other change::

    import numpy as np
    from delve.metrics import register_stat

    register_stat("top1", "top-eigenvalue-share", lambda space: space.eigenvalues[0] / space.eigenvalues.sum())

:func:`layer_statistics` is the single path from a covariance matrix to values: it
decomposes the matrix at most once and evaluates every requested statistic on the
result. The ``compute_*`` functions are conveniences for one statistic of one matrix.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from delve.validation import check_choice

__all__ = [
    "KINDS",
    "NEEDS",
    "SCALAR_STATS",
    "STATMAP",
    "Eigenspace",
    "Statistic",
    "compute_cov_determinant",
    "compute_cov_trace",
    "compute_diag_trace",
    "compute_effective_rank",
    "compute_intrinsic_dimensionality",
    "compute_participation_ratio",
    "compute_saturation",
    "compute_spectrum",
    "get_stat",
    "idim_of_eigenvalues",
    "layer_statistics",
    "register_stat",
    "registered_stats",
    "unregister_stat",
]

#: What a statistic's value is: one number (a CSV column, a bar, a TensorBoard scalar), a
#: vector (one TensorBoard scalar per entry, a bar panel per layer), a matrix (npy only)
#: or samples (an ``(n, 2)`` array of points: npy, a scatter per layer).
KINDS = ("scalar", "vector", "matrix", "samples")
#: What a statistic may be computed from (see :class:`Eigenspace`).
NEEDS = ("matrix", "eigenvalues", "eigenvectors", "samples")

Matrix = Union[torch.Tensor, np.ndarray]
_RATIO_TOLERANCE = 1e-12
# A stem is a column-name part: ``{mode}-{stem}_{layer}`` is split at the first ``_``
# after the stem, so a stem never holds one.
_STEM = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def idim_of_eigenvalues(eig: Union[np.ndarray, torch.Tensor], thresh: float) -> int:
    """Return the smallest k whose k leading eigenvalues explain ``thresh`` of their sum.

    ``eig`` must be sorted descending with negatives clamped to 0 (as
    :class:`Eigenspace` and the PCA layers hold them); an all-zero spectrum gives 0.
    """
    eig = _host(eig)
    total = eig.sum()
    if total <= 0:
        return 0
    ratios = np.cumsum(eig) / total
    # The tolerance only absorbs summation rounding: at thresh=1 the eigenvalues a
    # rank-deficient matrix gets from rounding (~1e-16 of the total) do not count.
    below = int(np.count_nonzero(ratios < thresh - _RATIO_TOLERANCE))
    return min(below + 1, eig.shape[0])


def _host(eig) -> np.ndarray:
    # The statistics of d eigenvalues cost microseconds in numpy; on the device each
    # would be a kernel launch and a synchronisation.
    if torch.is_tensor(eig):
        eig = eig.detach().cpu().numpy()
    return np.asarray(eig, dtype=np.float64)


class Eigenspace:
    """What a statistic is computed from: one covariance matrix and, once, its eigendecomposition.

    Attributes
    ----------
    covariance : torch.Tensor
        The float64 ``(d, d)`` covariance.
    eigenvalues : numpy.ndarray
        Its eigenvalues, largest first, negatives clamped to 0 (``None`` if no
        statistic asked for them).
    eigenvectors : torch.Tensor or None
        The matching unit eigenvectors as columns, when a statistic needs them.
    samples, mean : torch.Tensor or None
        Recorded rows and the mean to centre them on (the ``embed`` statistic).
    threshold : float
        The variance fraction of the intrinsic dimensionality (``sat_threshold``).
    spectrum_k : int
        How many leading eigenvalues vector statistics report.

    """

    def __init__(
        self,
        covariance: torch.Tensor,
        eigenvalues: Optional[np.ndarray],
        eigenvectors: Optional[torch.Tensor],
        threshold: float,
        spectrum_k: int,
        samples: Optional[torch.Tensor] = None,
        mean: Optional[torch.Tensor] = None,
    ):
        self.covariance = covariance
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.threshold = threshold
        self.spectrum_k = spectrum_k
        self.samples = samples
        self.mean = mean

    @property
    def dim(self) -> int:
        """The feature dimension ``d``."""
        return int(self.covariance.shape[0])

    @functools.cached_property
    def idim(self) -> int:
        """The intrinsic dimensionality at :attr:`threshold` (shared by ``idim`` and ``lsat``)."""
        return idim_of_eigenvalues(self.eigenvalues, self.threshold)

    @classmethod
    def of(cls, cov: Matrix, needs: Iterable[str], threshold: float = 0.99, spectrum_k: int = 5,
           samples: Optional[torch.Tensor] = None, mean: Optional[torch.Tensor] = None) -> Eigenspace:
        """Decompose ``cov`` as far as ``needs`` asks: eigenvectors only when one needs them."""
        cov64 = torch.as_tensor(cov)
        if cov64.dim() != 2 or cov64.shape[0] != cov64.shape[1]:
            raise ValueError(f"expected a square covariance matrix, got shape {tuple(cov64.shape)}")
        cov64 = cov64.to(torch.float64)
        needs = set(needs)
        values = vectors = None
        if "eigenvectors" in needs:  # eigh costs several eigvalsh: only when a projection needs it
            values, vectors = torch.linalg.eigh(cov64)
            vectors = vectors.flip(1)
        elif "eigenvalues" in needs:
            values = torch.linalg.eigvalsh(cov64)
        # One transfer of d numbers to the host; the statistics are computed there.
        eig = None if values is None else np.maximum(values.cpu().numpy()[::-1], 0.0)
        return cls(cov64, eig, vectors, threshold, spectrum_k, samples, mean)


@dataclass(frozen=True)
class Statistic:
    """The declaration of one statistic.

    Attributes
    ----------
    name : str
        Short name used in ``stats=[...]`` (``lsat``).
    stem : str
        The column-name stem (``saturation``): keys are ``{mode}-{stem}_{layer}``.
    compute : callable
        ``(Eigenspace) -> value``.
    kind : {'scalar', 'vector', 'matrix', 'samples'}
        What the value is, and so where it is shown (see :data:`KINDS`).
    needs : frozenset of str
        Which parts of the :class:`Eigenspace` ``compute`` reads (see :data:`NEEDS`).
    fmt : str
        Format of one value in pictures and summaries (``'{:.3f}'``).
    limits : (float, float), optional
        A fixed axis and colour range (saturation: 0 to 1).

    """

    name: str
    stem: str
    compute: Callable[[Eigenspace], Any]
    kind: str = "scalar"
    needs: FrozenSet[str] = frozenset({"eigenvalues"})
    fmt: str = "{:.3g}"
    limits: Optional[Tuple[float, float]] = None

    @property
    def label(self) -> str:
        """The stem as words, for axes and titles (``covariance trace``)."""
        return self.stem.replace("-", " ")

    @property
    def is_scalar(self) -> bool:
        """Whether a value is one number (a CSV column)."""
        return self.kind == "scalar"

    def format(self, value: Any) -> str:
        """Show one value as :attr:`fmt` says (``-`` for a missing one)."""
        try:
            value = float(value)
        except (TypeError, ValueError):
            return str(value)
        return "-" if np.isnan(value) else self.fmt.format(value)


_REGISTRY: Dict[str, Statistic] = {}
_LOCK = threading.Lock()


def register_stat(
    name: str,
    stem: str,
    compute: Callable[[Eigenspace], Any],
    kind: str = "scalar",
    needs: Iterable[str] = ("eigenvalues",),
    fmt: str = "{:.3g}",
    limits: Optional[Tuple[float, float]] = None,
) -> Statistic:
    """Declare a statistic: it can then be asked for in ``stats=[...]`` and is written everywhere.

    Parameters
    ----------
    name : str
        Short name (letters and digits, starting with a letter), e.g. ``'top1'``.
    stem : str
        Column-name stem: lower-case letters, digits and ``-`` (no ``_``), e.g.
        ``'top-eigenvalue-share'``.
    compute : callable
        ``(Eigenspace) -> value``, given the layer's covariance and what ``needs`` asks for.
        It should depend on its argument only: at an epoch end, the layers' statistics
        may be computed side by side in worker threads (:mod:`delve.schedule`).
    kind : {'scalar', 'vector', 'matrix', 'samples'}, default 'scalar'
        A scalar becomes a CSV column, bars, a history heatmap, a TensorBoard scalar and
        a ``delve summary`` column; a vector one TensorBoard scalar per entry and a bar
        panel per layer; a matrix an npy file; samples an ``(n, 2)`` scatter.
    needs : iterable of {'matrix', 'eigenvalues', 'eigenvectors', 'samples'}
        What ``compute`` reads; eigenvectors cost an ``eigh`` instead of an ``eigvalsh``.
    fmt : str, default ``'{:.3g}'``
        How one value is shown in pictures and summaries.
    limits : (float, float), optional
        A fixed axis range for pictures.

    Returns
    -------
    Statistic

    Raises
    ------
    ValueError
        For a name or stem already taken, or a malformed one; for an unknown kind or need.

    """
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(("_train", "_eval")):
        raise ValueError(f"stat name must be letters and digits starting with a letter, got {name!r}")
    if not isinstance(stem, str) or not _STEM.match(stem):
        raise ValueError(f"stat stem must be lower-case letters, digits and '-' (no '_'), got {stem!r}")
    if not callable(compute):
        raise TypeError(f"compute must be a callable (Eigenspace) -> value, got {type(compute).__name__}")
    check_choice("kind", kind, KINDS)
    needs = frozenset([needs] if isinstance(needs, str) else needs)
    unknown = sorted(needs - set(NEEDS))
    if unknown:
        raise ValueError(f"unknown needs {unknown}; valid: {list(NEEDS)}")
    fmt.format(0.5)  # a broken format fails here, not at the first picture
    statistic = Statistic(name, stem, compute, kind, needs, fmt, None if limits is None else tuple(limits))
    with _LOCK:
        if name in _REGISTRY:
            raise ValueError(f"a stat named {name!r} exists already; registered: {list(_REGISTRY)}")
        taken = {s.stem: s.name for s in _REGISTRY.values()}
        if stem in taken:
            raise ValueError(f"stem {stem!r} is already the stem of stat {taken[stem]!r}")
        _REGISTRY[name] = statistic
    return statistic


def unregister_stat(name: str) -> None:
    """Remove a statistic added with :func:`register_stat` (the built-in ones stay)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in statistic and cannot be removed")
    with _LOCK:
        if _REGISTRY.pop(name, None) is None:
            raise KeyError(f"no statistic named {name!r}; registered: {list(_REGISTRY)}")


def get_stat(name: str) -> Statistic:
    """Return the declaration of a statistic by short name.

    Raises
    ------
    ValueError
        Naming the valid statistics, for an unknown name.

    """
    statistic = _REGISTRY.get(name) if isinstance(name, str) else None
    if statistic is None:
        raise ValueError(f"unknown stat {name!r}; valid stats are {sorted(_REGISTRY)}")
    return statistic


def registered_stats() -> Tuple[Statistic, ...]:
    """Return every declared statistic, in the order they were declared."""
    return tuple(_REGISTRY.values())


def stat_of_stem(stem: str) -> Optional[Statistic]:
    """Return the statistic whose column stem is ``stem``, or ``None``."""
    for statistic in _REGISTRY.values():
        if statistic.stem == stem:
            return statistic
    return None


class _StemMap(Mapping):
    """``short name -> stem`` of every registered statistic, always current."""

    def __getitem__(self, name: str) -> str:
        return _REGISTRY[name].stem

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


class _ScalarNames(Sequence):
    """Short names of the registered scalar statistics, always current."""

    def _names(self) -> List[str]:
        return [s.name for s in _REGISTRY.values() if s.is_scalar]

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(tuple(self._names()))


#: Short stat name -> the stem used in keys, CSV columns and folder names (every registered stat).
STATMAP: Mapping[str, str] = _StemMap()
#: Short names of the statistics whose value is one number (CSV columns, plots, TensorBoard scalars).
SCALAR_STATS: Sequence[str] = _ScalarNames()


# ------------------------------------------------------------------ the built-in statistics
def _effective_rank(space: Eigenspace) -> float:
    eig = space.eigenvalues
    total = eig.sum()
    if total <= 0:
        return 0.0
    p = eig / total
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _participation_ratio(space: Eigenspace) -> float:
    eig = space.eigenvalues
    square_sum = (eig * eig).sum()
    if square_sum <= 0:
        return 0.0
    return float(eig.sum() ** 2 / square_sum)


def _spectrum(space: Eigenspace) -> np.ndarray:
    top = space.eigenvalues[: space.spectrum_k].copy()
    if top.shape[0] < space.spectrum_k:
        top = np.concatenate([top, np.zeros(space.spectrum_k - top.shape[0])])
    return top


def _embed(space: Eigenspace) -> np.ndarray:
    samples, vectors = space.samples, space.eigenvectors
    if samples is None or samples.shape[0] == 0:
        return np.zeros((0, 2))
    centred = samples.to(vectors.device, torch.float64)
    if space.mean is not None:
        centred = centred - space.mean.to(vectors.device, torch.float64)
    scores = (centred @ vectors[:, :2]).cpu().numpy()
    if scores.shape[1] < 2:  # a one-feature layer has one direction; the second is 0
        scores = np.concatenate([scores, np.zeros((scores.shape[0], 2 - scores.shape[1]))], axis=1)
    return scores


for _args in (
    ("idim", "intrinsic-dimensionality", lambda s: s.idim, "scalar", ("eigenvalues",), "{:.0f}"),
    ("lsat", "saturation", lambda s: s.idim / s.dim, "scalar", ("eigenvalues",), "{:.3f}", (0.0, 1.0)),
    ("cov", "covariance-matrix", lambda s: s.covariance.cpu().numpy(), "matrix", ("matrix",)),
    ("det", "covariance-determinant", lambda s: float(np.prod(s.eigenvalues))),
    ("trc", "covariance-trace", lambda s: float(torch.trace(s.covariance).item()), "scalar", ("matrix",)),
    ("dtrc", "diagonal-trace", lambda s: float(s.eigenvalues.sum())),
    ("embed", "embedded-sample", _embed, "samples", ("eigenvectors", "samples")),
    ("spectrum", "spectrum", _spectrum, "vector"),
    ("erank", "effective-rank", _effective_rank),
    ("pr", "participation-ratio", _participation_ratio),
):
    register_stat(*_args)
_BUILTIN = frozenset(_REGISTRY)


def layer_statistics(
    cov: Matrix,
    stats: Iterable[str],
    thresh: float = 0.99,
    spectrum_k: int = 5,
    samples: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """Compute several statistics of one covariance matrix from a single eigendecomposition.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray
        Symmetric ``(d, d)`` covariance matrix.
    stats : iterable of str
        Short names of registered statistics (:data:`STATMAP`).
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
    wanted = [get_stat(name) for name in stats]
    needs = set().union(*(s.needs for s in wanted)) if wanted else set()
    space = Eigenspace.of(cov, needs, thresh, spectrum_k, samples, mean)
    return {s.name: s.compute(space) for s in wanted}


def _one(cov: Matrix, stat: str, **kwargs) -> Any:
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
