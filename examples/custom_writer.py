"""A writer of your own: every epoch as one line of JSON, next to the usual CSV.

Subclass :class:`delve.writers.AbstractWriter`, accept ``**kwargs`` in the two add
methods, and hand an instance to the tracker in ``save_to``. Run it as is (a few
seconds on a CPU)::

    python examples/custom_writer.py                 # writes runs/custom.jsonl and runs/custom.csv
    python examples/custom_writer.py --out runs/other --epochs 3
"""

import argparse
import json
import math
import os

import numpy as np
import torch
from torch import nn

from delve import CheckLayerSat
from delve.writers import AbstractWriter


class JSONLinesWriter(AbstractWriter):
    """Write ``{savepath}.jsonl``: one JSON object per epoch, ``{"epoch": 3, "loss": 0.2, ...}``.

    Only numbers are written (arrays such as ``cov`` or ``spectrum`` are skipped); NaN
    becomes ``null`` so that every line is strict JSON.
    """

    def __init__(self, savepath):
        self.path = savepath + ".jsonl"
        self.pending = {}  # epoch -> {key: value}, written at the next save
        self.file_mode = "w"  # a new run replaces the file; after a save or a resume, append

    def _put(self, key, value, step):
        if np.ndim(value) != 0:
            return
        value = float(value)
        self.pending.setdefault(int(step or 0), {})[key] = None if math.isnan(value) else value

    def add_scalar(self, name, value, global_step=None, **kwargs):
        self._put(name, value, global_step)

    def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
        # kwargs also carries sample_value_dict (the `embed` arrays): not needed here.
        for key, value in value_dict.items():
            self._put(prefix + key, value, global_step)

    def save(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, self.file_mode, encoding="utf-8") as handle:
            for epoch in sorted(self.pending):
                handle.write(json.dumps({"epoch": epoch, **self.pending[epoch]}) + "\n")
        self.pending.clear()
        self.file_mode = "a"

    def resume_from_saved_state(self, initial_epoch):
        # Keep the lines of the epochs before initial_epoch; the run continues after them.
        kept = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as handle:
                kept = [line for line in handle if line.strip() and json.loads(line)["epoch"] < initial_epoch]
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        self.file_mode = "a"


def main(out: str = "runs/custom", epochs: int = 5) -> str:
    """Train a small regression network on synthetic data; return the path of the JSON lines."""
    torch.manual_seed(0)
    x = torch.randn(512, 16) @ torch.diag(torch.linspace(2.0, 0.05, 16))  # a few dominant directions
    y = x[:, :3].sum(1, keepdim=True) + 0.1 * torch.randn(512, 1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    writer = JSONLinesWriter(out)
    tracker = CheckLayerSat(out, [writer, "csv"], model, stats=["lsat", "idim"], average_sat=True)
    for _ in range(epochs):
        for batch in range(0, len(x), 64):
            loss = nn.functional.mse_loss(model(x[batch : batch + 64]), y[batch : batch + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        tracker.add_scalar("loss", loss.item())
        tracker.add_saturations()
    tracker.close()
    return writer.path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/custom", help="output path without extension")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    path = main(args.out, args.epochs)
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            print(f"epoch {record['epoch']}: loss {record['loss']:.3f}, "
                  f"average train saturation {record['average-train-sat']:.2f}")
    print(f"wrote {path}")
