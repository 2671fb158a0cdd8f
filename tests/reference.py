"""Independent float64 numpy references the tests compare the library against."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


def np_cov(rows) -> np.ndarray:
    """Two-pass population covariance in float64."""
    rows = np.asarray(rows, dtype=np.float64)
    return np.atleast_2d(np.cov(rows, rowvar=False, bias=True))


def np_eigenvalues(cov) -> np.ndarray:
    """Eigenvalues of a covariance matrix, largest first, negatives clamped to 0."""
    return np.clip(np.sort(np.linalg.eigvalsh(np.asarray(cov, dtype=np.float64)))[::-1], 0, None)


def np_effective_rank(cov) -> float:
    """exp of the entropy of the normalised eigenvalues (0 for a zero matrix)."""
    eig = np_eigenvalues(cov)
    if eig.sum() <= 0:
        return 0.0
    p = eig / eig.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def np_stats(rows, thresh: float = 0.99) -> dict:
    """idim, lsat, trc, dtrc, det of the rows' covariance, by the rule of SPEC §5."""
    cov = np_cov(rows)
    eig = np_eigenvalues(cov)
    total = eig.sum()
    if total <= 0:
        idim = 0
    else:
        ratios = np.cumsum(eig) / total
        idim = int(min(np.sum(ratios < thresh) + 1, len(eig)))
    return {
        "cov": cov,
        "eig": eig,
        "idim": idim,
        "lsat": idim / cov.shape[0],
        "trc": float(np.trace(cov)),
        "dtrc": float(eig.sum()),
        "det": float(np.prod(eig)),
    }


def conv_rows(out: np.ndarray, method: str) -> np.ndarray:
    """Data matrix of a conv output (B, C, *spatial) under a ``conv_method``, in numpy."""
    batch, channels = out.shape[:2]
    if method == "channelwise":
        return np.moveaxis(out, 1, -1).reshape(-1, channels)
    if method == "flatten":
        return out.reshape(batch, -1)
    pooled = out.reshape(batch, channels, -1)
    if method == "median":  # the lower median, as torch.median
        return np.take(np.sort(pooled, axis=-1), (pooled.shape[-1] - 1) // 2, axis=-1)
    return {"mean": pooled.mean(-1), "max": pooled.max(-1)}[method]


def recurrent_rows(out, batch_first: bool, method: str) -> np.ndarray:
    """Rows of a recurrent layer's output by SPEC §3, computed on the test's own copy of it."""
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        padded = padded.detach().double().numpy()
        if method == "last_timestep":
            return np.stack([padded[i, n - 1] for i, n in enumerate(lengths.tolist())])
        return np.concatenate([padded[i, :n] for i, n in enumerate(lengths.tolist())])
    if not batch_first:
        out = np.swapaxes(out, 0, 1)
    if method == "last_timestep":
        return out[:, -1]
    return out.reshape(-1, out.shape[-1])


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


class OutputCapture:
    """Forward hooks of the test's own that keep every raw output, per layer and mode."""

    def __init__(self, layers: dict):
        self.outputs = defaultdict(list)
        self.handles = [
            layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()
        ]

    def _hook(self, name):
        def hook(module, inputs, output):
            mode = "train" if module.training else "eval"
            if isinstance(output, tuple):
                output = output[0]
            if isinstance(output, torch.nn.utils.rnn.PackedSequence):
                self.outputs[(name, mode)].append(output)
            else:
                self.outputs[(name, mode)].append(output.detach().to(torch.float64).cpu().numpy())

        return hook

    def take(self, name, mode):
        """Return and forget the outputs recorded for one layer and mode."""
        return self.outputs.pop((name, mode), [])

    def clear(self):
        self.outputs.clear()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def recording_tracker(base: type, epochs: list) -> type:
    """Return a subclass of the tracker class ``base`` that keeps what its layers output.

    At each ``add_saturations()`` it appends to ``epochs`` the raw outputs (per layer and
    mode, as :class:`OutputCapture` holds them) its layers gave since the previous one.
    Patched in where a script builds its tracker, it lets a test check the script's
    files against numpy on exactly the rows the tracker saw.
    """

    class Recording(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.capture = OutputCapture(dict(self.layers))

        def add_saturations(self, save=True):
            epochs.append(dict(self.capture.outputs))
            self.capture.clear()
            return super().add_saturations(save)

    return Recording
