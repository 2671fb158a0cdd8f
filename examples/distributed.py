"""Layer saturation of a CNN trained with DistributedDataParallel, measured on every process's data.

    torchrun --nproc_per_node 2 examples/distributed.py --synthetic   # CPU processes (gloo), seconds
    torchrun --nproc_per_node 4 examples/distributed.py               # one GPU per process (NCCL), CIFAR-10

Each process trains on its own shard of the data (a DistributedSampler). At every epoch
end every process calls ``add_saturations()``: the processes' covariances are merged
exactly, so each statistic describes the samples of all processes, and only rank 0
writes ``{savefile}.csv`` (one row per epoch: the losses and accuracy over all
processes, then the saturation and intrinsic dimensionality of every layer).
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from delve import CheckLayerSat

CLASSES = 10


class SmallCNN(nn.Module):
    """Two convolutions and a two-layer classifier for 3×32×32 images."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width, 64)
        self.fc2 = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def synthetic_datasets(samples: int) -> Tuple[Dataset, Dataset]:
    """Return train and test sets of coloured class patterns plus noise, the same on every process."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(CLASSES, 3, 4, 4, generator=generator)
    patterns = nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)

    def make(count: int) -> TensorDataset:
        labels = torch.randint(0, CLASSES, (count,), generator=generator)
        return TensorDataset(patterns[labels] + torch.randn(count, 3, 32, 32, generator=generator), labels)

    return make(samples), make(max(samples // 4, 1))


def cifar10_datasets(data_dir: str) -> Tuple[Dataset, Dataset]:
    """Return the CIFAR-10 train and test sets (torchvision is needed only here)."""
    import torchvision
    from torchvision import transforms

    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]
    )
    # One process downloads, the others wait for it.
    if dist.get_rank() == 0:
        torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
    dist.barrier()
    return (
        torchvision.datasets.CIFAR10(data_dir, train=True, transform=normalize),
        torchvision.datasets.CIFAR10(data_dir, train=False, transform=normalize),
    )


def run_epoch(model, loader, loss_fn, device, optimizer=None) -> Tuple[float, float]:
    """Train (with an optimizer) or evaluate on this process's shard; return loss and accuracy over all processes."""
    model.train(optimizer is not None)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, samples
    with torch.set_grad_enabled(optimizer is not None):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = loss_fn(logits, labels)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            totals[0] += loss.detach() * len(labels)
            totals[1] += (logits.argmax(1) == labels).sum()
            totals[2] += len(labels)
    dist.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    return loss_sum / seen, correct / seen


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true", help="use random images instead of CIFAR-10")
    parser.add_argument("--samples", type=int, default=2048, help="training images with --synthetic")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    parser.add_argument("--data-dir", default="data", help="where CIFAR-10 is stored")
    parser.add_argument("--savefile", default="runs/distributed", help="output path without extension")
    args = parser.parse_args(argv)

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address.
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    try:
        train, test = synthetic_datasets(args.samples) if args.synthetic else cifar10_datasets(args.data_dir)
        # Each process gets its own shard; the samplers pad the last shards to equal sizes.
        train_sampler = DistributedSampler(train, shuffle=True, seed=0)
        train_loader = DataLoader(train, batch_size=args.batch_size, sampler=train_sampler)
        test_loader = DataLoader(test, batch_size=args.batch_size, sampler=DistributedSampler(test, shuffle=False))

        torch.manual_seed(0)  # DDP copies rank 0's weights to the others anyway
        model = DistributedDataParallel(SmallCNN(args.width).to(device), device_ids=[local_rank] if cuda else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        # Built after the process group, on every process: the tracker then knows that
        # only rank 0 writes. Passing the DDP wrapper is fine: layers keep their own names.
        tracker = CheckLayerSat(args.savefile, "csv", model, stats=["lsat", "idim"])
        with tracker:
            for epoch in range(args.epochs):
                train_sampler.set_epoch(epoch)
                train_loss, _ = run_epoch(model, train_loader, loss_fn, device, optimizer)
                test_loss, test_accuracy = run_epoch(model, test_loader, loss_fn, device)
                tracker.add_scalar("train-loss", train_loss)
                tracker.add_scalar("test-loss", test_loss)
                tracker.add_scalar("test-accuracy", test_accuracy)
                values = tracker.add_saturations()  # on every process: the merge is collective
                if dist.get_rank() == 0:
                    saturations = [v for k, v in values.items() if k.startswith("train-saturation")]
                    print(
                        f"epoch {epoch}: train loss {train_loss:.3f}, test accuracy {test_accuracy:.3f}, "
                        f"mean train saturation {sum(saturations) / len(saturations):.3f}"
                    )
        if dist.get_rank() == 0:
            print(f"wrote {args.savefile}.csv")
    finally:
        dist.destroy_process_group()
    return args.savefile


if __name__ == "__main__":
    main()
