"""The demo training: a small CNN on synthetic images, tracked by delve, writing CSV and plots."""

from __future__ import annotations

import logging
import os
from typing import Sequence, Union

import torch
from torch import nn

from delve.tracker import CheckLayerSat

logger = logging.getLogger(__name__)


class DemoNet(nn.Module):
    """A small convolutional classifier whose widths leave room to see saturation move."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of 1×16×16 images."""
        return self.classifier(self.features(x))


def synthetic_images(samples: int, classes: int = 4, generator: torch.Generator = None):
    """Return (images, labels): each class is a noisy mix of a few fixed 16×16 patterns."""
    patterns = torch.randn(classes, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, classes, (samples,), generator=generator)
    weights = torch.randn(samples, 3, 1, 1, 1, generator=generator)
    images = (weights * patterns[labels]).sum(1) + 0.3 * torch.randn(samples, 1, 16, 16, generator=generator)
    return images, labels


def run_demo(
    savefile: str = "runs/demo",
    epochs: int = 8,
    batches: int = 16,
    batch_size: int = 32,
    save_to: Union[str, Sequence[str]] = "plot",
    seed: int = 0,
) -> str:
    """Train :class:`DemoNet` for a few epochs with a tracker attached; return the CSV path.

    Parameters
    ----------
    savefile : str
        Where the outputs go (``{savefile}.csv``, plots next to it).
    epochs, batches, batch_size : int
        Size of the training run.
    save_to : str or sequence of str
        Writer keys.
    seed : int
        Seed of the data and the initialisation.

    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DemoNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    test_x, test_y = synthetic_images(256, generator=generator)
    tracker = CheckLayerSat(savefile, list(save_to) if not isinstance(save_to, str) else save_to, model,
                            stats=["lsat", "idim"], average_sat=True)
    with tracker:
        for epoch in range(epochs):
            model.train()
            for _ in range(batches):
                x, y = synthetic_images(batch_size, generator=generator)
                loss = loss_fn(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                logits = model(test_x)
                accuracy = (logits.argmax(1) == test_y).float().mean().item()
            tracker.add_scalar("train-loss", loss.item())
            tracker.add_scalar("test-accuracy", accuracy)
            tracker.add_saturations()
            logger.info("epoch %d: loss %.3f, test accuracy %.3f", epoch, loss.item(), accuracy)
    return os.path.abspath(savefile + ".csv")
