"""Small tracked runs shared by the writer tests, with the rows every layer really produced."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from tests.reference import OutputCapture, np_cov

# Input scales spread the spectrum, so saturation depends visibly on the threshold.
SCALES = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
#: Tracking order of the layers of :func:`make_model` (deliberately not alphabetical).
LAYERS = ["zeta", "alpha"]
MODES = ("train", "eval")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([("zeta", nn.Linear(6, 5)), ("act", nn.Tanh()), ("alpha", nn.Linear(5, 3))]))


def loss_value(seed: int, epoch: int) -> float:
    return seed + 1.0 / (epoch + 1)


def run_epochs(tracker, model, epochs, seed=0, first_epoch=0, train_batches=3, batch=16, layers=None):
    """Run ``epochs`` epochs (train and eval passes, a ``loss`` scalar) and close each with the tracker.

    Returns ``{epoch: {(layer, mode): rows}}``: every output row the test's own hooks saw,
    in float64 (``layers`` maps the tracker's layer names to modules; default :data:`LAYERS`).
    """
    layers = layers if layers is not None else {name: getattr(model, name) for name in LAYERS}
    capture = OutputCapture(layers)
    generator = torch.Generator().manual_seed(1000 + seed)
    rows = {}
    try:
        for offset in range(epochs):
            epoch = first_epoch + offset
            model.train()
            for _ in range(train_batches):
                model(torch.randn(batch, 6, generator=generator) * SCALES)
            model.eval()
            with torch.no_grad():
                model(torch.randn(batch, 6, generator=generator) * SCALES)
            tracker.add_scalar("loss", loss_value(seed, epoch))
            rows[epoch] = {(name, mode): np.concatenate(capture.take(name, mode)) for name in layers for mode in MODES}
            tracker.add_saturations()
    finally:
        capture.remove()
    return rows


def np_embedding(rows) -> np.ndarray:
    """SPEC §5 ``embed`` in numpy: the rows, centred, projected on the top-2 eigenvectors of their covariance."""
    rows = np.asarray(rows, dtype=np.float64)
    vectors = np.linalg.eigh(np_cov(rows))[1][:, ::-1][:, :2]
    return (rows - rows.mean(0)) @ vectors


def aligned(embedding, reference) -> np.ndarray:
    """Flip the signs of the embedding's columns onto the reference (eigenvectors have no sign)."""
    embedding = np.asarray(embedding, dtype=np.float64)
    signs = np.sign(np.sum(embedding * reference, axis=0))
    return embedding * signs
