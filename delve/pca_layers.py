"""PCA layers: project a layer's input onto the eigenspace that holds most of its variance.

A PCA layer sits between two layers of a trained network. In training mode it is the
identity and accumulates the covariance of what passes through it. On the first
forward pass in evaluation mode after training it eigendecomposes that covariance,
keeps the ``k`` leading eigendirections that explain ``threshold`` of the variance
(the intrinsic-dimensionality rule of :func:`delve.metrics.compute_intrinsic_dimensionality`)
and from then on projects every input onto them. Evaluating a network at several
thresholds, or with random directions of the same dimension in place of the
eigendirections, shows how much of a layer's width the network needs.

The eigenspace is computed from one *training phase*: the training-mode forward
passes since the layer last ran in evaluation mode. The first training forward pass
after an evaluation pass starts a new, empty window, so in a usual
train-epoch / validate loop every validation uses the eigenspace of the epoch that
preceded it. Reading :attr:`~BasePCALayer.in_dim` or :attr:`~BasePCALayer.sat`, or
calling :meth:`~BasePCALayer.fit`, fits on the data seen so far without closing the
window.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from delve._runtime import in_backward

# The channelwise data matrix and the idim rule are the ones the tracker uses; the
# PCA layers must not grow their own versions of either.
from delve.activations import conv_data_matrix
from delve.covariance import TorchCovarianceMatrix
from delve.metrics import idim_of_eigenvalues
from delve.validation import check_flag, check_fraction, check_int

__all__ = [
    "rvs",
    "BasePCALayer",
    "LinearPCALayer",
    "Conv2DPCALayer",
    "change_all_pca_layer_thresholds",
    "change_all_pca_layer_thresholds_and_inject_random_directions",
    "change_all_pca_layer_centering",
]

logger = logging.getLogger(__name__)

RandomState = Union[None, int, np.random.Generator, np.random.RandomState]

# Buffers whose shape depends on the eigenspace size or on ``keepdim``.
_SIZED_BUFFERS = ("components", "projection", "offset")


def rvs(dim: int = 3, random_state: RandomState = None) -> np.ndarray:
    """Return a random rotation: a ``dim × dim`` orthonormal matrix with determinant +1.

    The matrix is drawn uniformly (Haar measure) from the rotations: the Q factor of
    the QR decomposition of a standard Gaussian matrix, with the sign of each column
    fixed by the diagonal of R, and the first column negated if the determinant is -1.

    Parameters
    ----------
    dim : int, default 3
        Size of the matrix, at least 1.
    random_state : int, numpy.random.Generator or numpy.random.RandomState, optional
        Source of randomness. ``None`` uses numpy's global generator, so
        ``numpy.random.seed`` makes the draws reproducible.

    Returns
    -------
    numpy.ndarray
        A float64 matrix ``Q`` with ``QᵀQ = I`` and ``det Q = 1``.

    Raises
    ------
    ValueError
        If ``dim`` is not an integer >= 1.

    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if random_state is None:
        gaussian = np.random.standard_normal((dim, dim))
    elif isinstance(random_state, (np.random.Generator, np.random.RandomState)):
        gaussian = random_state.standard_normal((dim, dim))
    else:
        gaussian = np.random.default_rng(random_state).standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    # Without the sign fix the distribution of Q depends on the QR routine's conventions.
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    q = q * signs
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class BasePCALayer(nn.Module):
    """Common machinery of :class:`LinearPCALayer` and :class:`Conv2DPCALayer`.

    Subclasses say how an input becomes a ``(rows, features)`` data matrix and how
    the projection is applied to it.

    Everything needed to project lives in registered buffers, so ``state_dict()``
    saved from a fitted layer and loaded into a fresh one restores it exactly:

    ``mean`` (d,)
        Mean of the training data the eigenspace was fitted on (kept even when
        ``centering`` is off, so switching it on needs no new data).
    ``eigenvalues`` (d,), ``eigenvectors`` (d, d)
        Eigendecomposition of the covariance (``centering=True``) or of the second
        moment ``E[xxᵀ]`` (``centering=False``), eigenvalues descending, eigenvectors
        as columns in the same order.
    ``components`` (d, k)
        The orthonormal basis inputs are projected on: the ``k`` leading
        eigenvectors, or random directions after :meth:`inject_random_directions`.
    ``projection`` (d, d) or (d, k), ``offset`` (d,) or (k,)
        The affine map the forward pass applies: ``x @ projection + offset``.
    ``fitted``, ``random_directions`` (bool), ``sample_count`` (int64)
        Whether an eigenspace was computed, whether it was replaced by random
        directions, and how many rows it was computed from.

    ``threshold`` and ``centering`` travel in the module's extra state.
    """

    def __init__(
        self,
        features: int,
        threshold: float,
        keepdim: bool,
        verbose: bool,
        gradient_epoch_start: int,
        centering: bool,
    ):
        super().__init__()
        d = check_int("the feature size", features, 1)
        self.fs_dim: int = d
        self._threshold = check_fraction("threshold", threshold)
        self._centering = check_flag("centering", centering)
        self.keepdim: bool = check_flag("keepdim", keepdim)
        self.verbose: bool = bool(verbose)
        # Accepted for compatibility with the original API, where it was stored but never
        # changed what the layer does; it does not here either.
        self.gradient_epoch_start = gradient_epoch_start

        self._accumulator = TorchCovarianceMatrix()
        # Python mirrors of state the forward pass consults: reading a buffer would
        # make a GPU wait for the host on every batch.
        self._fitted = False
        self._pending = False  # training data seen since the last fit
        self._window_open = False  # False until the first training pass after an eval pass
        self._warned_unfitted = False

        f64 = {"dtype": torch.float64}
        out = d if self.keepdim else 0
        self.register_buffer("mean", torch.zeros(d, **f64))
        self.register_buffer("eigenvalues", torch.zeros(d, **f64))
        self.register_buffer("eigenvectors", torch.zeros(d, d, **f64))
        self.register_buffer("components", torch.zeros(d, 0, **f64))
        self.register_buffer("projection", torch.zeros(d, out, **f64))
        self.register_buffer("offset", torch.zeros(out, **f64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("random_directions", torch.zeros((), dtype=torch.bool))
        self.register_buffer("sample_count", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------ properties
    @property
    def threshold(self) -> float:
        """Fraction of the variance, in (0, 1], the kept eigenspace explains; setting it recomputes."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_fraction("threshold", value)
        if self._fitted:
            self._select_components()

    @property
    def centering(self) -> bool:
        """Whether inputs are centred on the training mean; setting it recomputes the eigenspace."""
        return self._centering

    @centering.setter
    def centering(self, value: bool) -> None:
        value = check_flag("centering", value)
        if value == self._centering:
            return
        if self._fitted:
            # The stored decomposition is of the other matrix: rebuild that matrix
            # (exactly, from its eigenpairs) and move between covariance and second
            # moment by the outer product of the mean.
            vectors = self.eigenvectors.to(torch.float64)
            matrix = (vectors * self.eigenvalues.to(torch.float64)) @ vectors.T
            mean = self.mean.to(torch.float64)
            shift = torch.outer(mean, mean)
            # Covariance + μμᵀ is the second moment, and back.
            matrix = matrix + shift if self._centering else matrix - shift
            self._centering = value
            self._decompose(matrix, mean, int(self.sample_count))
        else:
            self._centering = value

    @property
    def pca_computed(self) -> bool:
        """Whether an eigenspace has been computed (the layer projects in eval mode)."""
        return self._fitted

    @property
    def in_dim(self) -> Optional[int]:
        """Size ``k`` of the eigenspace inputs are projected on; ``None`` before any training data.

        Fits first if training data arrived since the last fit.
        """
        self._fit_if_pending()
        return self.components.shape[1] if self._fitted else None

    @property
    def sat(self) -> Optional[float]:
        """Saturation in percent, ``100 · in_dim / fs_dim`` (``None`` before any training data)."""
        k = self.in_dim
        return None if k is None else 100.0 * k / self.fs_dim

    @property
    def out_features(self) -> int:
        """Size of the output's feature axis in eval mode (``fs_dim``, or ``in_dim`` without keepdim)."""
        if self.keepdim or not self._fitted:
            return self.fs_dim
        return self.components.shape[1]

    # --------------------------------------------------------------- forward
    def _data_matrix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply_projection(self, x: torch.Tensor, projection: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training mode: return ``x`` and record it. Eval mode: return its projection.

        Before the layer has seen any training data, eval mode returns ``x`` unchanged
        (and logs a warning once).
        """
        self._check_input(x)
        if self.training:
            if not in_backward():  # a checkpoint's recomputation was observed by the forward pass
                self._observe(x)
            return x
        self._window_open = False
        self._fit_if_pending()
        if not self._fitted:
            if not self._warned_unfitted:
                self._warned_unfitted = True
                logger.warning(
                    "%s has seen no training data yet: it passes its input through unchanged", self._describe()
                )
            return x
        # Low-precision inputs are projected in float32 and float64 ones in float64;
        # autocast must not undo that choice.
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            projection = self.projection.to(device=x.device, dtype=work)
            offset = self.offset.to(device=x.device, dtype=work)
            out = self._apply_projection(x.to(work), projection, offset)
        return out.to(x.dtype)

    def _observe(self, x: torch.Tensor) -> None:
        if not self._window_open:
            # First training pass after an evaluation pass: a new training phase.
            self._accumulator.reset()
            self._window_open = True
        with torch.no_grad():
            self._accumulator.update(self._data_matrix(x))
        self._pending = True

    # ------------------------------------------------------------------ fit
    def _fit_if_pending(self) -> None:
        if self._pending:
            try:
                self.fit()
            except Exception:  # a failed eigensolver must not end the run: keep the old projection
                self._pending = False
                logger.exception("%s: the eigenspace could not be computed; the previous one is kept", self._describe())

    def fit(self) -> bool:
        """Compute the eigenspace from the training data of the current window now.

        Eval-mode forward passes call this by themselves; call it to inspect ``in_dim``
        or ``eigenvalues`` before evaluating. The accumulation window stays open.

        Returns
        -------
        bool
            Whether a new eigenspace was computed (``False`` when the window holds no
            usable rows, e.g. only batches with NaN/Inf, which are skipped).

        """
        self._pending = False
        acc = self._accumulator
        count = acc.count
        if acc.skipped_batches:
            logger.warning(
                "%s: %d training batch(es) with NaN/Inf values were left out of the eigenspace",
                self._describe(),
                acc.skipped_batches,
            )
        if count == 0:
            return False
        with torch.no_grad(), torch.inference_mode(False):
            mean = acc.mean.clone()
            matrix = acc.fix(center=self._centering)
            self._decompose(matrix, mean, count)
        return True

    def _decompose(self, matrix: torch.Tensor, mean: torch.Tensor, count: int) -> None:
        """Eigendecompose ``matrix`` (the covariance or the second moment) and store the result."""
        with torch.no_grad(), torch.inference_mode(False), torch.autocast(matrix.device.type, enabled=False):
            values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
            self._store("eigenvalues", values.flip(0))
            self._store("eigenvectors", vectors.flip(1))
            self._store("mean", mean)
            self.sample_count.fill_(int(count))
            self.fitted.fill_(True)
            self._fitted = True
            self._select_components()

    def _select_components(self) -> None:
        """Keep the leading eigenvectors that reach the threshold, then rebuild the projection."""
        eigenvalues = self.eigenvalues.to(torch.float64).clamp_min(0.0)
        k = idim_of_eigenvalues(eigenvalues, self._threshold)
        self._set_components(self.eigenvectors[:, :k], random=False)
        log = logger.info if self.verbose else logger.debug
        log(
            "%s: %d of %d directions explain %.4g of the variance (saturation %.1f%%)",
            self._describe(),
            k,
            self.fs_dim,
            self._threshold,
            100.0 * k / self.fs_dim,
        )

    def _set_components(self, components: torch.Tensor, random: bool) -> None:
        with torch.no_grad(), torch.inference_mode(False):
            basis = components.to(torch.float64)
            mean = self.mean.to(torch.float64)
            if not self._centering:
                mean = torch.zeros_like(mean)
            if self.keepdim:
                projection = basis @ basis.T  # (x - μ)VVᵀ + μ = x·VVᵀ + (μ - μVVᵀ)
                offset = mean - mean @ projection
            else:
                projection = basis  # (x - μ)V = x·V - μV
                offset = -(mean @ basis)
            self._store("components", basis)
            self._store("projection", projection)
            self._store("offset", offset)
            self.random_directions.fill_(bool(random))

    def _store(self, name: str, value: torch.Tensor) -> None:
        """Write ``value`` into a buffer, keeping the buffer's device and dtype."""
        current = self._buffers[name]
        value = value.to(device=current.device, dtype=current.dtype)
        if current.shape == value.shape:
            current.copy_(value)
        else:
            self._buffers[name] = value.contiguous()

    # -------------------------------------------------------- random directions
    def inject_random_directions(self, random_state: RandomState = None) -> bool:
        """Replace the eigenspace by a random subspace of the same dimension.

        The inputs are then projected on ``k = in_dim`` orthonormal directions drawn
        uniformly at random (the first ``k`` columns of :func:`rvs`). Setting
        ``threshold`` or ``centering`` again, or refitting, goes back to eigenvectors.

        Parameters
        ----------
        random_state : int, numpy.random.Generator or numpy.random.RandomState, optional
            As for :func:`rvs`.

        Returns
        -------
        bool
            ``False`` (with a warning) if the layer has no eigenspace to replace yet.

        """
        k = self.in_dim
        if k is None:
            logger.warning("%s has no eigenspace yet: no random directions injected", self._describe())
            return False
        basis = torch.from_numpy(rvs(self.fs_dim, random_state)[:, :k])
        self._set_components(basis, random=True)
        return True

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        """Return the settings the buffers depend on (saved with ``state_dict()``)."""
        return {"threshold": self._threshold, "centering": self._centering, "keepdim": self.keepdim}

    def set_extra_state(self, state: dict) -> None:
        """Restore the settings saved by :meth:`get_extra_state`."""
        self._threshold = check_fraction("threshold", state["threshold"])
        self._centering = check_flag("centering", state["centering"])
        self._loaded_keepdim = bool(state.get("keepdim", self.keepdim))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # The eigenspace size is only known once fitted: resize those buffers to the
        # saved ones so that loading into a fresh layer works.
        for name in _SIZED_BUFFERS:
            saved = state_dict.get(prefix + name)
            current = self._buffers[name]
            if saved is not None and saved.shape != current.shape and saved.dim() == current.dim():
                self._buffers[name] = torch.zeros(saved.shape, dtype=current.dtype, device=current.device)
        self._loaded_keepdim = self.keepdim
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        self._fitted = bool(self.fitted)
        self._pending = False
        self._window_open = False
        if self._fitted and self._loaded_keepdim != self.keepdim:
            # Saved with the other keepdim: same subspace, the other form of the map.
            self._set_components(self.components, random=bool(self.random_directions))

    def __getstate__(self):
        # The accumulator holds a lock, which cannot be pickled or deep-copied; the rest
        # of it can, so a copy taken mid-phase goes on accumulating where this one is.
        state = self.__dict__.copy()
        acc = state.pop("_accumulator")
        state["_accumulator_state"] = {k: v for k, v in vars(acc).items() if k != "_lock"}
        return state

    def __setstate__(self, state):
        saved = state.pop("_accumulator_state", None)
        super().__setstate__(state)
        self._accumulator = TorchCovarianceMatrix()
        if saved is not None:
            vars(self._accumulator).update(saved)

    # --------------------------------------------------------------- display
    def _describe(self) -> str:
        return f"{type(self).__name__}({self.fs_dim})"

    def extra_repr(self) -> str:
        fitted = f", in_dim={self.components.shape[1]}" if self._fitted else ", not fitted"
        settings = f"threshold={self._threshold}, keepdim={self.keepdim}, centering={self._centering}"
        return f"{self.fs_dim}, {settings}{fitted}"


class LinearPCALayer(BasePCALayer):
    """PCA layer for feature vectors: the input's last axis holds the ``in_features`` features.

    Training mode: the identity; every input row is added to the covariance of the
    current training phase. Eval mode: with ``V_k`` the ``k`` leading eigenvectors
    (``k`` the smallest count whose eigenvalues explain ``threshold`` of the total) and
    ``μ`` the training mean, returns ``(x − μ)V_kV_kᵀ + μ`` (``keepdim=True``) or the
    scores ``(x − μ)V_k`` (``keepdim=False``, last axis of size ``k``). Gradients flow
    to the input; the layer has no trainable parameters.

    Parameters
    ----------
    in_features : int
        Feature size ``d`` of the input.
    threshold : float, default 0.99
        Fraction of the variance the kept eigenspace explains, in (0, 1].
    keepdim : bool, default True
        Return the projection in the input space instead of the ``k`` scores.
    verbose : bool, default False
        Log (at INFO level) the eigenspace size every time it is computed.
    gradient_epoch_start : int, default 20
        Accepted for compatibility with the original API; it has no effect.
    centering : bool, default True
        Centre inputs on the training mean. ``False`` takes ``μ = 0`` and
        eigendecomposes the second moment ``E[xxᵀ]`` instead of the covariance.

    Attributes
    ----------
    fs_dim : int
        Feature size ``d``.
    in_dim : int or None
        Eigenspace size ``k`` (``None`` before any training data).
    sat : float or None
        ``100 · k / d``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), LinearPCALayer(64), nn.Linear(64, 2))
    >>> # train as usual, then
    >>> net.eval()  # the next forward pass computes the eigenspace and projects on it

    """

    def __init__(
        self,
        in_features: int,
        threshold: float = 0.99,
        keepdim: bool = True,
        verbose: bool = False,
        gradient_epoch_start: int = 20,
        centering: bool = True,
    ):
        super().__init__(in_features, threshold, keepdim, verbose, gradient_epoch_start, centering)
        self.in_features = self.fs_dim

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.fs_dim:
            raise ValueError(
                f"{type(self).__name__}({self.fs_dim}) expects inputs whose last axis has "
                f"{self.fs_dim} features, got shape {tuple(x.shape)}"
            )

    def _data_matrix(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.fs_dim)

    def _apply_projection(self, x, projection, offset):
        return torch.matmul(x, projection) + offset


class Conv2DPCALayer(BasePCALayer):
    """PCA layer for feature maps: a 1×1 convolution onto the channels' eigenspace.

    Every spatial position of every image is a sample of the ``in_filters`` channels
    (the ``channelwise`` data matrix of the tracker). Training mode: the identity,
    accumulating that covariance. Eval mode: a 1×1 convolution whose weight is the
    projection, so each pixel's channel vector ``x`` becomes ``(x − μ)V_kV_kᵀ + μ``
    (or the ``k`` scores with ``keepdim=False``). The convolution's weight and bias
    are :attr:`weight` and :attr:`bias`, views of the ``projection`` and ``offset``
    buffers: whatever replaces the projection (a new threshold, random directions)
    replaces the convolution.

    Parameters
    ----------
    in_filters : int
        Number of input channels ``C``.
    threshold : float, default 0.99
        Fraction of the variance the kept eigenspace explains, in (0, 1].
    verbose : bool, default True
        Log (at INFO level) the eigenspace size every time it is computed.
    gradient_epoch_start : int, default 20
        Accepted for compatibility with the original API; it has no effect.
    centering : bool, default False
        Centre inputs on the training mean (``False``: ``μ = 0``, second moment).
    downsampling : int, optional
        Before a training batch is recorded, feature maps larger than
        ``downsampling × downsampling`` are resized to it (nearest neighbour), which
        samples fewer positions. Eval-mode projection always uses the full map.
    keepdim : bool, default True
        Return ``C`` channels in the input space instead of ``k`` score channels.

    """

    def __init__(
        self,
        in_filters: int,
        threshold: float = 0.99,
        verbose: bool = True,
        gradient_epoch_start: int = 20,
        centering: bool = False,
        downsampling: Optional[int] = None,
        keepdim: bool = True,
    ):
        super().__init__(in_filters, threshold, keepdim, verbose, gradient_epoch_start, centering)
        self.in_filters = self.fs_dim
        self.downsampling = check_int("downsampling", downsampling, 1, allow_none=True)

    @property
    def weight(self) -> torch.Tensor:
        """Weight ``(out_channels, in_filters, 1, 1)`` of the projecting 1×1 convolution."""
        return self.projection.T.reshape(self.projection.shape[1], self.fs_dim, 1, 1)

    @property
    def bias(self) -> torch.Tensor:
        """Bias ``(out_channels,)`` of the projecting 1×1 convolution."""
        return self.offset

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in (3, 4) or x.shape[-3] != self.fs_dim:
            raise ValueError(
                f"{type(self).__name__}({self.fs_dim}) expects (N, {self.fs_dim}, H, W) or "
                f"({self.fs_dim}, H, W) inputs, got shape {tuple(x.shape)}"
            )

    def _data_matrix(self, x: torch.Tensor) -> torch.Tensor:
        strategy = None if self.downsampling is None else "nearest"
        matrix, _ = conv_data_matrix(x, "channelwise", strategy, self.downsampling or 1, None)
        return matrix

    def _apply_projection(self, x, projection, offset):
        weight = projection.T.reshape(projection.shape[1], self.fs_dim, 1, 1)
        return F.conv2d(x, weight, offset)


# ---------------------------------------------------------------- whole networks
def _pca_layers(network: nn.Module) -> List[Tuple[str, BasePCALayer]]:
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
    found = [(name or type(m).__name__, m) for name, m in network.named_modules() if isinstance(m, BasePCALayer)]
    if not found:
        logger.warning("%s contains no PCA layer", type(network).__name__)
    return found


def _summary(layers, verbose: bool, action: str):
    sat, in_dims, fs_dims, names = [], [], [], []
    for name, layer in layers:
        sat.append(layer.sat)
        in_dims.append(layer.in_dim)
        fs_dims.append(layer.fs_dim)
        names.append(name)
        if verbose:
            logger.info("%s %s: %s of %d directions kept", action, name, layer.in_dim, layer.fs_dim)
    return sat, in_dims, fs_dims, names


def change_all_pca_layer_thresholds(
    threshold: float, network: nn.Module, verbose: bool = False
) -> Tuple[list, list, list, list]:
    """Set the threshold of every PCA layer in ``network``; each recomputes its projection.

    Parameters
    ----------
    threshold : float
        New fraction of the variance, in (0, 1].
    network : nn.Module
        Any module; every :class:`LinearPCALayer` and :class:`Conv2DPCALayer` inside it
        (itself included) is changed.
    verbose : bool, default False
        Log each layer's new eigenspace size.

    Returns
    -------
    (list, list, list, list)
        ``(sat, in_dims, fs_dims, names)``, one entry per PCA layer in module order:
        saturation in percent, eigenspace size, feature size, module path (``None`` for
        sat/in_dim of a layer that has not seen training data).

    """
    threshold = check_fraction("threshold", threshold)
    layers = _pca_layers(network)
    for _, layer in layers:
        layer.threshold = threshold
    return _summary(layers, verbose, "threshold")


def change_all_pca_layer_thresholds_and_inject_random_directions(
    threshold: float,
    network: nn.Module,
    verbose: bool = False,
    device="cpu",
    include_names: bool = False,
) -> tuple:
    """Set the threshold of every PCA layer, then project on random directions instead.

    Each layer keeps the eigenspace size its threshold gives, but projects on that
    many orthonormal directions drawn at random (see
    :meth:`BasePCALayer.inject_random_directions`): the output of a baseline that keeps
    as many dimensions as the PCA but not the informative ones. Seed numpy
    (``numpy.random.seed``) for reproducible directions.

    Parameters
    ----------
    threshold : float
        Fraction of the variance, in (0, 1], that sets each layer's subspace size.
    network : nn.Module
        Any module containing PCA layers.
    verbose : bool, default False
        Log each layer's subspace size.
    device : str or torch.device, default 'cpu'
        Accepted for compatibility with the original API; the directions are always
        placed on each layer's own device.
    include_names : bool, default False
        Also return the module paths.

    Returns
    -------
    tuple
        ``(sat, in_dims, fs_dims)``, or ``(sat, in_dims, fs_dims, names)`` with
        ``include_names=True``.

    """
    threshold = check_fraction("threshold", threshold)
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: {err}") from None
    layers = _pca_layers(network)
    for _, layer in layers:
        layer.threshold = threshold
        layer.inject_random_directions()
    sat, in_dims, fs_dims, names = _summary(layers, verbose, "random directions")
    return (sat, in_dims, fs_dims, names) if include_names else (sat, in_dims, fs_dims)


def change_all_pca_layer_centering(
    centering: bool, network: nn.Module, verbose: bool = False, downsampling: Optional[int] = None
) -> Tuple[list, list, list, list]:
    """Switch centering on or off in every PCA layer; each recomputes its eigenspace.

    Parameters
    ----------
    centering : bool
        New centering of every layer.
    network : nn.Module
        Any module containing PCA layers.
    verbose : bool, default False
        Log each layer's new eigenspace size.
    downsampling : int, optional
        If given, also the new ``downsampling`` of every :class:`Conv2DPCALayer`
        (it applies to training data recorded from now on).

    Returns
    -------
    (list, list, list, list)
        ``(sat, in_dims, fs_dims, names)`` as for :func:`change_all_pca_layer_thresholds`.

    """
    centering = check_flag("centering", centering)
    downsampling = check_int("downsampling", downsampling, 1, allow_none=True)
    layers = _pca_layers(network)
    for _, layer in layers:
        layer.centering = centering
        if downsampling is not None and isinstance(layer, Conv2DPCALayer):
            layer.downsampling = downsampling
    return _summary(layers, verbose, "centering")
