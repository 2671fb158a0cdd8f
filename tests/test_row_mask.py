"""The row mask: padded positions of sequence outputs left out, checked against numpy on captured outputs.

Each test keeps the raw outputs of the tracked layers with its own forward hooks, picks
the real rows itself from the mask it gave (every real position for ``timestepwise``, the
last real position of each sequence for ``last_timestep``) and compares the tracker's
covariance with ``np.cov`` of those rows (SPEC §4: 1e-6 relative Frobenius).
"""

import numpy as np
import pytest
import torch
from torch import nn

from delve import CheckLayerSat
from tests.reference import OutputCapture, np_cov, rel_err

TOL = 1e-6
BATCH, STEPS = 5, 7


def padding_mask(lengths, steps, side):
    """(B, T) bool: ``lengths[i]`` real positions, the padding on the ``side`` given."""
    positions = torch.arange(steps).unsqueeze(0)
    lengths = torch.tensor(lengths).unsqueeze(1)
    return positions < lengths if side == "right" else positions >= steps - lengths


def real_rows(out, mask, method, batch_first=True):
    """The rows SPEC'd for ``out`` under ``mask``, in numpy, from the test's own copy of the output."""
    out = np.asarray(out, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if not batch_first:
        out = np.swapaxes(out, 0, 1)
    if method == "timestepwise":
        return out[mask]
    rows = [out[i, np.flatnonzero(mask[i])[-1]] for i in range(len(mask)) if mask[i].any()]
    return np.stack(rows)


class Tagger(nn.Module):
    """A token projection, a recurrent layer and a pooled head: sequence outputs and one that is not."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.proj = nn.Linear(4, 6)
        self.gru = nn.GRU(6, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        if not self.batch_first:
            h = h.transpose(0, 1)
        seq, _ = self.gru(h)
        return self.head(seq.mean(1 if self.batch_first else 0))  # (B, 3): no time axis


def tokens(generator, steps=STEPS):
    scales = torch.tensor([2.0, 1.0, 0.5, 0.1])
    return 0.3 + torch.randn(BATCH, steps, 4, generator=generator) * scales


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["timestepwise", "last_timestep"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
def test_masked_sequence_outputs_match_numpy_on_the_real_rows(batch_first, method, side):
    torch.manual_seed(0)
    model = Tagger(batch_first)
    tracker = CheckLayerSat("unused", "csv", model, stats=["cov"], nosave=True, timeseries_method=method)
    capture = OutputCapture(dict(tracker.layers))
    generator = torch.Generator().manual_seed(1)
    # One sequence with no real position: no row at all, in either method.
    masks = [padding_mask([7, 3, 0, 5, 1], STEPS, side), padding_mask([2, 7, 6, 4, 3], STEPS, side)]
    for mask in masks:
        with tracker.row_mask(mask):
            model(tokens(generator))
    values = tracker.add_saturations()
    tracker.close()
    proj = np.concatenate([real_rows(out, m, method) for out, m in zip(capture.take("proj", "train"), masks)])
    gru = np.concatenate(
        [real_rows(out, m, method, batch_first) for out, m in zip(capture.take("gru", "train"), masks)]
    )
    head = np.concatenate(capture.take("head", "train"))  # (B, 3) outputs are unaffected
    assert len(proj) == (sum(m.sum() for m in masks) if method == "timestepwise" else 2 * BATCH - 1)
    for name, rows in (("proj", proj), ("gru", gru), ("head", head)):
        assert rel_err(values[f"train-covariance-matrix_{name}"], np_cov(rows)) < TOL, name


def test_padding_holding_nan_does_not_skip_the_batch():
    # Whatever a model computes at padded positions is no data: a NaN there must neither
    # poison the covariance nor make the accumulator skip the batch.
    torch.manual_seed(2)
    layer = nn.Linear(4, 6)
    tracker = CheckLayerSat("unused", "csv", layer, stats=["cov", "trc"], nosave=True, timeseries_method="timestepwise")
    mask = padding_mask([7, 2, 5, 4, 6], STEPS, "right")
    x = tokens(torch.Generator().manual_seed(3))
    x[~mask] = float("nan")
    with torch.no_grad(), tracker.row_mask(mask.to(torch.int64)):  # 0/1 integers, as tokenizers give
        out = layer(x)
    values = tracker.add_saturations()
    assert tracker.accumulator("Module-0-Linear").skipped_batches == 0
    tracker.close()
    expected = np_cov(out[mask].double().numpy())
    assert rel_err(values["train-covariance-matrix_Module-0-Linear"], expected) < TOL
    assert values["train-covariance-trace_Module-0-Linear"] == pytest.approx(np.trace(expected), rel=TOL)


def test_outputs_of_another_length_are_not_masked():
    # A decoder's outputs have their own length: the encoder's mask says nothing about them.
    torch.manual_seed(4)
    model = nn.ModuleDict({"encoder": nn.Linear(4, 5), "decoder": nn.Linear(4, 5)})
    tracker = CheckLayerSat("unused", "csv", model, stats=["cov"], nosave=True, timeseries_method="timestepwise")
    generator = torch.Generator().manual_seed(5)
    mask = padding_mask([7, 1, 4, 6, 2], STEPS, "left")
    with torch.no_grad(), tracker.row_mask(mask):
        encoded = model["encoder"](tokens(generator))
        decoded = model["decoder"](tokens(generator, steps=STEPS + 2))
    values = tracker.add_saturations()
    tracker.close()
    assert rel_err(values["train-covariance-matrix_encoder"], np_cov(encoded[mask].double().numpy())) < TOL
    assert rel_err(values["train-covariance-matrix_decoder"], np_cov(decoded.reshape(-1, 5).double().numpy())) < TOL


def test_max_samples_counts_sequences_and_the_mask_follows_the_cut():
    # max_samples counts samples of the batch dimension: with 5 sequences a batch and
    # max_samples=7, the first batch whole and the first 2 sequences of the second.
    torch.manual_seed(6)
    layer = nn.Linear(4, 3)
    tracker = CheckLayerSat(
        "unused", "csv", layer, stats=["cov"], nosave=True, timeseries_method="timestepwise", max_samples=7
    )
    generator = torch.Generator().manual_seed(7)
    masks = [padding_mask([3, 7, 1, 4, 5], STEPS, "right"), padding_mask([6, 2, 7, 7, 7], STEPS, "left")]
    outputs = []
    with torch.no_grad():
        for mask in masks + masks:
            with tracker.row_mask(mask):
                outputs.append(layer(tokens(generator)))
    values = tracker.add_saturations()
    tracker.close()
    rows = np.concatenate([outputs[0][masks[0]].numpy(), outputs[1][:2][masks[1][:2]].numpy()])
    assert rel_err(values["train-covariance-matrix_Module-0-Linear"], np_cov(rows)) < TOL


def test_embed_samples_are_the_first_real_rows():
    # 8 batches of ~20 real tokens among 40 positions: the embedding keeps the first 1000
    # real rows of the epoch, in order, centred on the epoch's mean and projected.
    torch.manual_seed(8)
    layer = nn.Linear(4, 3)
    tracker = CheckLayerSat(
        "unused", "csv", layer, stats=["embed", "cov"], nosave=True, timeseries_method="timestepwise"
    )
    generator = torch.Generator().manual_seed(9)
    steps, real = 40, []
    with torch.no_grad():
        for _ in range(60):
            lengths = torch.randint(0, steps + 1, (BATCH,), generator=generator).tolist()
            mask = padding_mask(lengths, steps, "left")
            with tracker.row_mask(mask):
                out = layer(tokens(generator, steps))
            real.append(out[mask].double().numpy())
    values, samples = tracker.compute_statistics()
    tracker.close()
    rows = np.concatenate(real)
    assert len(rows) > 1000
    cov = np_cov(rows)
    assert rel_err(values["train-covariance-matrix_Module-0-Linear"], cov) < TOL
    vectors = np.linalg.eigh(cov)[1][:, ::-1][:, :2]
    expected = (rows[:1000] - rows.mean(0)) @ vectors
    got = samples["train-embedded-sample_Module-0-Linear"]
    assert got.shape == (1000, 2)
    signs = np.sign(np.sum(got * expected, axis=0))  # an eigenvector's sign is arbitrary
    np.testing.assert_allclose(got * signs, expected, rtol=1e-4, atol=1e-5)


def test_row_masks_nest_and_end_with_their_block():
    torch.manual_seed(10)
    layer = nn.Linear(4, 3)
    tracker = CheckLayerSat("unused", "csv", layer, stats=["cov"], nosave=True, timeseries_method="timestepwise")
    generator = torch.Generator().manual_seed(11)
    outer, inner = padding_mask([7, 1, 2, 3, 4], STEPS, "right"), padding_mask([5, 5, 5, 6, 7], STEPS, "left")
    with torch.no_grad():
        with tracker.row_mask(outer):
            first = layer(tokens(generator))
            with tracker.row_mask(inner):
                second = layer(tokens(generator))
            third = layer(tokens(generator))
        fourth = layer(tokens(generator))
    values = tracker.add_saturations()
    tracker.close()
    rows = np.concatenate([first[outer], second[inner], third[outer], fourth.reshape(-1, 3)])
    assert rel_err(values["train-covariance-matrix_Module-0-Linear"], np_cov(rows)) < TOL


def test_a_bad_mask_is_refused_naming_it():
    tracker = CheckLayerSat("unused", "csv", nn.Linear(4, 3), nosave=True)
    with pytest.raises(ValueError, match=r"mask must be \(batch, time\).*\(5,\)"):
        with tracker.row_mask(torch.ones(5)):
            pass
    with pytest.raises(TypeError, match="mask must be a .*got list"):
        with tracker.row_mask([[1, 0]]):
            pass
    tracker.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_recording_never_waits_for_the_device(caplog):
    # With CUDA's synchronisation debug mode set to error, anything in the hooks that
    # waits for the device raises; the tracker would log it and skip the batch.
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6)).cuda()
    outputs = {0: [], 2: []}
    for i in outputs:
        model[i].register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out.detach().double().cpu()))
    generator = torch.Generator().manual_seed(13)
    batches = [(tokens(generator), padding_mask(lengths, STEPS, side))
               for lengths, side in (([7, 0, 3, 5, 1], "left"), ([2, 7, 6, 4, 3], "right"))]
    results = {}
    for method in ("timestepwise", "last_timestep"):
        tracker = CheckLayerSat("unused", "csv", model, stats=["cov", "embed"], nosave=True, timeseries_method=method)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with caplog.at_level("ERROR", logger="delve"):
                for x, mask in batches:
                    x, mask = x.cuda(), mask.cuda()
                    with tracker.row_mask(mask):
                        model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results[method] = tracker.add_saturations()
        tracker.close()
    assert not caplog.records
    for method, values in results.items():
        for i in outputs:
            kept = outputs[i][: len(batches)] if method == "timestepwise" else outputs[i][len(batches):]
            rows = np.concatenate([real_rows(out, mask, method) for out, (_, mask) in zip(kept, batches)])
            assert rel_err(values[f"train-covariance-matrix_{i}"], np_cov(rows)) < TOL
