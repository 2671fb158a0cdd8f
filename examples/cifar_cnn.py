"""Layer saturation of a small CNN trained on CIFAR-10.

    python examples/cifar_cnn.py                  # CIFAR-10 through torchvision (downloaded once)
    python examples/cifar_cnn.py --synthetic      # random class patterns, runs in seconds

Every epoch adds one row to ``{savefile}.csv``: the train/test loss and accuracy, and
the saturation and intrinsic dimensionality of every convolution and linear layer, for
the training forwards (``train-…``) and the test forwards (``eval-…``).
"""

from __future__ import annotations

import argparse
import itertools
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from delve import CheckLayerSat

CLASSES = 10


class CifarNet(nn.Module):
    """Three convolution blocks and a two-layer classifier for 3×32×32 images."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * width, 128), nn.ReLU(), nn.Linear(128, CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def cifar10_loaders(data_dir: str, batch_size: int) -> Tuple[DataLoader, DataLoader]:
    """Return the CIFAR-10 train and test loaders (torchvision is needed only here)."""
    import torchvision
    from torchvision import transforms

    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    train = torchvision.datasets.CIFAR10(data_dir, train=True, download=True, transform=train_tf)
    test = torchvision.datasets.CIFAR10(data_dir, train=False, download=True, transform=test_tf)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=2),
        DataLoader(test, batch_size=batch_size, num_workers=2),
    )


def synthetic_loaders(batch_size: int, batches: int, seed: int = 0) -> Tuple[DataLoader, DataLoader]:
    """Return loaders of random CIFAR-shaped images: each class is a fixed smooth pattern plus noise."""
    generator = torch.Generator().manual_seed(seed)
    # Coarse colour blobs, so that small convolutions can tell the classes apart.
    coarse = torch.randn(CLASSES, 3, 4, 4, generator=generator)
    patterns = nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)

    def make(samples: int) -> TensorDataset:
        labels = torch.randint(0, CLASSES, (samples,), generator=generator)
        images = patterns[labels] + torch.randn(samples, 3, 32, 32, generator=generator)
        return TensorDataset(images, labels)

    train = make(batch_size * batches)
    test = make(max(batch_size * batches // 4, batch_size))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(test, batch_size=batch_size)


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device) -> Tuple[float, float]:
    """Return the mean loss and the accuracy of the model on a loader."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            total_loss += loss_fn(logits, labels).item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return total_loss / seen, correct / seen


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true", help="use random images instead of CIFAR-10")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=None,
                        help="training batches per epoch (default: the whole set; 50 with --synthetic)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    parser.add_argument("--data-dir", default="data", help="where CIFAR-10 is stored")
    parser.add_argument("--savefile", default="runs/cifar_cnn", help="output path without extension")
    parser.add_argument("--save-to", nargs="+", default=["csv"], help="writer keys (csv, plot, tensorboard …)")
    parser.add_argument("--verbose", action="store_true", help="show one saturation bar per layer")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.synthetic:
        train_loader, test_loader = synthetic_loaders(args.batch_size, args.batches or 50)
    else:
        train_loader, test_loader = cifar10_loaders(args.data_dir, args.batch_size)

    model = CifarNet(args.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    # The whole model is handed over: every Conv2d and Linear is tracked. A conv layer's
    # output counts one sample per pixel (conv_method='channelwise'), so its feature
    # dimension is its number of channels.
    tracker = CheckLayerSat(
        args.savefile,
        save_to=args.save_to,
        modules=model,
        stats=["lsat", "idim"],
        average_sat=True,
        verbose=args.verbose,
    )
    with tracker:
        for epoch in range(args.epochs):
            model.train()
            running, seen = 0.0, 0
            for images, labels in itertools.islice(train_loader, args.batches):
                images, labels = images.to(device), labels.to(device)
                loss = loss_fn(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                running += loss.item() * len(labels)
                seen += len(labels)
            test_loss, test_accuracy = evaluate(model, test_loader, loss_fn, device)
            tracker.add_scalar("train-loss", running / seen)
            tracker.add_scalar("test-loss", test_loss)
            tracker.add_scalar("test-accuracy", test_accuracy)
            values = tracker.add_saturations()
            print(
                f"epoch {epoch}: train loss {running / seen:.3f}, test accuracy {test_accuracy:.3f}, "
                f"mean saturation {values['average-train-sat']:.3f}"
            )
    print(f"wrote {args.savefile}.csv")
    return args.savefile


if __name__ == "__main__":
    main()
