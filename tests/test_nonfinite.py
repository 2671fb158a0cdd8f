"""Batches with NaN/Inf activations are skipped whole, counted, reported, and harmless."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import CheckLayerSat
from delve.writers import AbstractWriter
from tests.reference import np_stats, rel_err

LAYERS = ("0", "2")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _finite(seed: int, rows: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 5, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5]) + 1.0


def _poisoned(seed: int, value: float) -> torch.Tensor:
    x = _finite(seed)
    x[3, 2] = value  # one bad entry poisons every output row it reaches
    return x


# Epoch 0 starts with a bad batch (before any state exists) and has two; epoch 1 has one.
EPOCHS = [
    [_poisoned(1, float("nan")), _finite(2), _finite(3), _poisoned(4, float("inf")), _finite(5)],
    [_finite(6), _poisoned(7, float("-inf")), _finite(8)],
]


class EmbedRecorder(AbstractWriter):
    """Keeps the embeddings the tracker hands to writers."""

    def __init__(self):
        self.embeds = {}

    def add_scalar(self, name, value, **kwargs):
        pass

    def add_scalars(self, prefix, value_dict, sample_value_dict=None, **kwargs):
        self.embeds = dict(sample_value_dict or {})


def test_nonfinite_batches_are_skipped_counted_and_reported(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="delve")
    model = _model()
    outputs = {name: [] for name in LAYERS}
    for name in LAYERS:
        model[int(name)].register_forward_hook(
            lambda module, inputs, output, name=name: outputs[name].append(output.detach().double().numpy())
        )
    savefile = str(tmp_path / "nonfinite")
    recorder = EmbedRecorder()
    tracker = CheckLayerSat(savefile, ["csv", recorder], model, stats=["idim", "trc", "cov", "embed"], verbose=True)

    expected_table = []
    for epoch, batches in enumerate(EPOCHS):
        caplog.clear()
        for batch in batches:
            model(batch)
        values = tracker.add_saturations()
        skipped = {}
        expected_row = {}
        for name in LAYERS:
            finite = [o for o in outputs[name] if np.isfinite(o).all()]
            skipped[name] = len(batches) - len(finite)
            rows = np.concatenate(finite)
            ref = np_stats(rows)
            got = values[f"train-covariance-matrix_{name}"]
            assert np.isfinite(got).all()
            assert rel_err(got, ref["cov"]) < 1e-6
            assert values[f"train-intrinsic-dimensionality_{name}"] == ref["idim"]
            assert values[f"train-covariance-trace_{name}"] == pytest.approx(ref["trc"], rel=1e-6)
            expected_row[f"train-intrinsic-dimensionality_{name}"] = ref["idim"]
            expected_row[f"train-covariance-trace_{name}"] = ref["trc"]
            # The embedding holds the finite batches' rows only, centred and projected
            # (an eigenvector's sign is arbitrary).
            embed = recorder.embeds[f"train-embedded-sample_{name}"]
            vectors = np.linalg.eigh(ref["cov"])[1][:, ::-1]
            expected = (rows - rows.mean(0)) @ vectors[:, :2]
            assert embed.shape == expected.shape
            np.testing.assert_allclose(np.abs(embed), np.abs(expected), rtol=1e-4, atol=1e-4)
            outputs[name].clear()
        expected_table.append(expected_row)
        # tanh maps ±inf to ±1: the second layer sees fewer bad batches than the first.
        assert skipped == ({"0": 2, "2": 1} if epoch == 0 else {"0": 1, "2": 0})

        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert all(r.name.startswith("delve") for r in caplog.records)
        if epoch == 0:
            # Once per layer, with the count, through the delve logger.
            assert warnings == [
                f"layer {name} (train): {skipped[name]} batch(es) with NaN/Inf activations were skipped"
                for name in LAYERS
            ]
        else:
            # No second warning; the verbose log carries the epoch's count.
            assert warnings == []
            assert [m for m in infos if "NaN/Inf" in m] == [
                "epoch 1 layer 0 (train): 1 batch(es) with NaN/Inf activations skipped"
            ]
    tracker.close()

    # The CSV holds the statistics of the finite batches, not NaN or values polluted by the bad ones.
    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert np.isfinite(table.to_numpy()).all()
    assert list(table.index) == list(range(len(EPOCHS)))
    assert sorted(table.columns) == sorted(expected_table[0])
    for epoch, row in enumerate(expected_table):
        for key, value in row.items():
            assert table.loc[epoch, key] == pytest.approx(value, rel=1e-6), (epoch, key)
