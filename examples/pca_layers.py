"""How much of each layer's width does a trained classifier need? Ask its PCA layers.

A small convolutional network with a PCA layer after its convolution and after its
hidden dense layer is trained on synthetic 8×8 images. Each evaluation projects the
two layers' inputs onto the eigenspace of the epoch's training data; afterwards the
network is evaluated at several thresholds, and with random directions of the same
dimension instead of the eigendirections. Runs in a few seconds on a CPU:

    python examples/pca_layers.py
"""

import numpy as np
import torch
from torch import nn

from delve.pca_layers import (
    Conv2DPCALayer,
    LinearPCALayer,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
)

CLASSES = 5


def synthetic_images(samples: int, generator: torch.Generator):
    """Each class is a fixed random 8×8 pattern plus noise."""
    templates = torch.randn(CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, CLASSES, (samples,), generator=generator)
    images = templates[labels] + 2.0 * torch.randn(samples, 1, 8, 8, generator=generator)
    return images, labels


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)  # the random directions come from numpy
    generator = torch.Generator().manual_seed(1)
    train_x, train_y = synthetic_images(1024, generator)
    test_x, test_y = synthetic_images(512, generator)

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        Conv2DPCALayer(16, threshold=0.99, verbose=False),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        LinearPCALayer(32, threshold=0.99),
        nn.Linear(32, CLASSES),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(4):
        model.train()  # PCA layers: identity, recording this epoch's inputs
        for batch in torch.randperm(len(train_x)).split(128):
            optimizer.zero_grad()
            loss_fn(model(train_x[batch]), train_y[batch]).backward()
            optimizer.step()
        acc = accuracy(model, test_x, test_y)  # first eval pass: eigenspaces of this epoch
        print(
            f"epoch {epoch}: test accuracy {acc:.3f}, kept directions conv {model[2].in_dim}/16, "
            f"dense {model[7].in_dim}/32"
        )

    print("\nthreshold   kept (conv, dense)   accuracy   with random directions")
    for threshold in (0.5, 0.8, 0.9, 0.99, 0.999):
        _, in_dims, _, _ = change_all_pca_layer_thresholds(threshold, model)
        acc = accuracy(model, test_x, test_y)
        change_all_pca_layer_thresholds_and_inject_random_directions(threshold, model)
        random_acc = accuracy(model, test_x, test_y)
        print(f"{threshold:9}   {str(tuple(in_dims)):18}   {acc:8.3f}   {random_acc:8.3f}")
    change_all_pca_layer_thresholds(0.99, model)  # back to the eigenspaces


if __name__ == "__main__":
    main()
