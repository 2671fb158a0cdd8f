"""Training under torch.autocast: low-precision activations, float64 statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import CheckLayerSat
from tests.reference import conv_rows, np_cov, np_stats, rel_err


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.head(torch.relu(self.fc(h.flatten(1))))


def _sgd_step(model: nn.Module, lr: float) -> None:
    # A plain update: torch.optim's first step costs seconds of imports on a small machine.
    with torch.no_grad():
        for param in model.parameters():
            param -= lr * param.grad


def _rows(name, output):
    """The test's own conversion of a layer output to rows (channelwise for the conv)."""
    out = output.detach().double().numpy()
    return conv_rows(out, "channelwise") if name == "conv" else out


def test_training_under_bfloat16_autocast(tmp_path):
    torch.manual_seed(0)
    model = Net()
    names = ("conv", "fc", "head")
    captured = {name: [] for name in names}
    dtypes = set()

    def capture(name):
        def hook(module, inputs, output):
            dtypes.add(output.dtype)
            captured[name].append(_rows(name, output))

        return hook

    for name in names:
        getattr(model, name).register_forward_hook(capture(name))
    savefile = str(tmp_path / "amp")
    tracker = CheckLayerSat(savefile, "csv", model, stats=["cov", "trc", "idim"])

    expected = []
    for epoch in range(2):
        for step in range(3):
            gen = torch.Generator().manual_seed(10 * epoch + step)
            x = torch.randn(6, 2, 6, 6, generator=gen) + 2.0
            target = torch.randn(6, 3, generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (model(x).float() - target).pow(2).mean()
            model.zero_grad()
            loss.backward()
            _sgd_step(model, lr=0.01)
        values = tracker.add_saturations()
        refs = {}
        for name in names:
            ref = np_stats(np.concatenate(captured[name]))
            got = values[f"train-covariance-matrix_{name}"]
            assert got.dtype == np.float64
            assert rel_err(got, ref["cov"]) < 1e-6, (epoch, name)
            assert values[f"train-intrinsic-dimensionality_{name}"] == ref["idim"], (epoch, name)
            refs[name] = ref
            captured[name].clear()
        expected.append(refs)
    tracker.close()
    assert dtypes == {torch.bfloat16}  # the hooks really saw bfloat16 outputs

    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1]
    for epoch, refs in enumerate(expected):
        for name, ref in refs.items():
            assert table.loc[epoch, f"train-covariance-trace_{name}"] == pytest.approx(ref["trc"], rel=1e-6)
            assert table.loc[epoch, f"train-intrinsic-dimensionality_{name}"] == ref["idim"]


def test_float16_model(tmp_path):
    torch.manual_seed(1)
    layer = nn.Linear(5, 4).to(torch.float16)
    outputs = []
    layer.register_forward_hook(lambda m, i, o: outputs.append(o.detach().double().numpy()))
    tracker = CheckLayerSat(str(tmp_path / "half"), "csv", layer, stats=["cov"], nosave=True)
    with torch.no_grad():
        for _ in range(4):
            layer((torch.randn(16, 5) * 3 + 1).to(torch.float16))
    got = tracker.add_saturations()["train-covariance-matrix_Module-0-Linear"]
    assert rel_err(got, np_cov(np.concatenate(outputs))) < 1e-6
    tracker.close()
