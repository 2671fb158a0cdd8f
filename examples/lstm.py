"""Layer saturation of an LSTM classifier fed variable-length sequences.

    python examples/lstm.py
    python examples/lstm.py --timeseries-method timestepwise

The data are synthetic: each class is a sum of two sine waves with class-specific
frequencies, observed for a random number of steps and with noise. The sequences of a
batch are padded and packed (:func:`torch.nn.utils.rnn.pack_padded_sequence`), so the
LSTM returns a ``PackedSequence``; delve reads the last *valid* step of every sequence
(``last_timestep``) or every valid step (``timestepwise``), never the padding.
"""

from __future__ import annotations

import argparse
import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from delve import CheckLayerSat


class SequenceClassifier(nn.Module):
    """An LSTM over packed sequences, then a linear read-out of the last hidden state."""

    def __init__(self, features: int, hidden: int, classes: int):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(padded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.head(h_n[-1])


def make_batch(
    batch_size: int, classes: int, features: int, min_len: int, max_len: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(padded sequences (B, T, F), lengths (B,), labels (B,))``."""
    labels = torch.randint(0, classes, (batch_size,), generator=generator)
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator)
    sequences = []
    for label, length in zip(labels.tolist(), lengths.tolist()):
        t = torch.arange(length, dtype=torch.float32).unsqueeze(1)
        phase = 2 * math.pi * torch.rand(1, features, generator=generator)
        slow, fast = 0.1 + 0.05 * label, 0.5 + 0.1 * label
        signal = torch.sin(slow * t + phase) + 0.5 * torch.sin(fast * t + phase)
        sequences.append(signal + 0.3 * torch.randn(length, features, generator=generator))
    return pad_sequence(sequences, batch_first=True), lengths, labels


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batches", type=int, default=40, help="training batches per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32, help="LSTM hidden size")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--features", type=int, default=3)
    parser.add_argument("--min-len", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=30)
    parser.add_argument("--timeseries-method", choices=["last_timestep", "timestepwise"], default="last_timestep")
    parser.add_argument("--savefile", default="runs/lstm", help="output path without extension")
    parser.add_argument("--save-to", nargs="+", default=["csv"], help="writer keys (csv, plot, tensorboard …)")
    parser.add_argument("--verbose", action="store_true", help="show one saturation bar per layer")
    args = parser.parse_args(argv)
    if not 1 <= args.min_len <= args.max_len:
        parser.error(f"need 1 <= --min-len <= --max-len, got {args.min_len} and {args.max_len}")

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = SequenceClassifier(args.features, args.hidden, args.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    test_batches = [
        make_batch(args.batch_size, args.classes, args.features, args.min_len, args.max_len, generator)
        for _ in range(max(args.batches // 4, 1))
    ]
    tracker = CheckLayerSat(
        args.savefile,
        save_to=args.save_to,
        modules=model,
        stats=["lsat", "idim"],
        timeseries_method=args.timeseries_method,
        verbose=args.verbose,
    )
    with tracker:
        for epoch in range(args.epochs):
            model.train()
            for _ in range(args.batches):
                padded, lengths, labels = make_batch(
                    args.batch_size, args.classes, args.features, args.min_len, args.max_len, generator
                )
                loss = loss_fn(model(padded, lengths), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            correct = seen = 0
            with torch.no_grad():
                for padded, lengths, labels in test_batches:
                    correct += (model(padded, lengths).argmax(1) == labels).sum().item()
                    seen += len(labels)
            tracker.add_scalar("train-loss", loss.item())
            tracker.add_scalar("test-accuracy", correct / seen)
            values = tracker.add_saturations()
            print(
                f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {correct / seen:.3f}, "
                f"LSTM saturation {values['train-saturation_lstm']:.3f}"
            )
    print(f"wrote {args.savefile}.csv")
    return args.savefile


if __name__ == "__main__":
    main()
