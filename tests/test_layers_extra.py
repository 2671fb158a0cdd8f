"""Conv1d/3d, transposed convolutions, GRU and RNN: the tracker against numpy float64 references.

Each test captures the raw layer outputs with a forward hook of its own, reshapes them
with numpy by the rules of SPEC §3, and compares the tracker's per-epoch lsat / idim /
trc (both the values ``add_saturations`` returns and the CSV file) with the statistics
of ``np.cov(rows, bias=True)``, over several epochs, in train and eval mode.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from delve import CheckLayerSat
from tests.reference import OutputCapture, conv_rows, np_stats, recurrent_rows

THRESH = 0.9
EPOCHS = 3
STATS = ["lsat", "idim", "trc"]


class Holder(nn.Module):
    """One layer under the name ``layer``, fed whatever the test gives it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _loss(output):
    if isinstance(output, tuple):
        output = output[0]
    if isinstance(output, nn.utils.rnn.PackedSequence):
        output = output.data
    return output.float().pow(2).mean()


def run_epochs(model, make_input, tmp_path, epochs=EPOCHS, train_batches=3, eval_batches=2, **tracker_kwargs):
    """Train/eval ``model`` for a few epochs under a CSV tracker and our own capture.

    Returns ``(captured, returned, csv)``: the raw outputs per (epoch, mode) as our hook
    saw them, the dicts ``add_saturations`` returned, and the CSV table.
    """
    gen = torch.Generator().manual_seed(0)
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "csv", model, stats=STATS, sat_threshold=THRESH, **tracker_kwargs)
    capture = OutputCapture(dict(tracker.layers))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    captured, returned = [], []
    for _ in range(epochs):
        model.train()
        for _ in range(train_batches):
            loss = _loss(model(make_input(gen)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # the weights move, so every epoch has its own statistics
        model.eval()
        with torch.no_grad():
            for _ in range(eval_batches):
                model(make_input(gen))
        captured.append(
            {(name, mode): capture.take(name, mode) for name in tracker.layers for mode in ("train", "eval")}
        )
        returned.append(tracker.add_saturations())
    tracker.close()
    capture.remove()
    csv = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    return tracker, captured, returned, csv


def check_against_reference(tracker, captured, returned, csv, to_rows):
    """Every (epoch, layer, mode) stat equals the numpy statistics of ``to_rows(raw outputs)``."""
    assert list(csv.index) == list(range(len(returned)))
    for epoch, outputs in enumerate(captured):
        expected_keys = set()
        for (name, mode), raws in outputs.items():
            assert raws, f"no {mode} output captured for {name}"
            rows = np.concatenate([to_rows(raw) for raw in raws])
            ref = np_stats(rows, THRESH)
            ratios = np.cumsum(ref["eig"]) / ref["eig"].sum()
            # The data must not sit on the threshold, or idim would depend on the last bit.
            assert np.min(np.abs(ratios - THRESH)) > 1e-6
            keys = {
                "lsat": f"{mode}-saturation_{name}",
                "idim": f"{mode}-intrinsic-dimensionality_{name}",
                "trc": f"{mode}-covariance-trace_{name}",
            }
            expected_keys |= set(keys.values())
            for source in (returned[epoch], csv.loc[epoch]):
                assert source[keys["idim"]] == ref["idim"]
                assert source[keys["lsat"]] == pytest.approx(ref["lsat"], rel=1e-12)
                assert source[keys["trc"]] == pytest.approx(ref["trc"], rel=1e-6)
        assert set(returned[epoch]) == expected_keys
    assert set(csv.columns) == set(returned[0])


# ----------------------------------------------------------------------------- convolutions
# name -> (layer, input shape without batch)
CONV_LAYERS = {
    "Conv1d": (lambda: nn.Conv1d(3, 5, 3), (3, 11)),
    "Conv3d": (lambda: nn.Conv3d(2, 4, 3), (2, 5, 4, 5)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (3, 6)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), (2, 2, 3)),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (2, 2, 2, 2)),
}


@pytest.mark.parametrize("method", ["channelwise", "mean", "max", "median", "flatten"])
@pytest.mark.parametrize("kind", sorted(CONV_LAYERS))
def test_convolutions_match_numpy(kind, method, tmp_path):
    torch.manual_seed(1)
    factory, shape = CONV_LAYERS[kind]
    model = Holder(factory())
    # An offset mean and per-channel scales give spectra well away from flat.
    scale = torch.linspace(0.3, 2.0, shape[0]).view(-1, *([1] * (len(shape) - 1)))

    def make_input(gen):
        return 4.0 + scale * torch.randn(6, *shape, generator=gen)

    tracker, captured, returned, csv = run_epochs(model, make_input, tmp_path, conv_method=method)
    assert list(tracker.layers) == ["layer"]
    check_against_reference(tracker, captured, returned, csv, lambda out: conv_rows(out, method))


def test_channelwise_width_is_the_channel_count(tmp_path):
    # ConvTranspose2d(2, 7, ...) has 7 output channels: saturation is idim / 7.
    torch.manual_seed(9)
    model = Holder(nn.ConvTranspose2d(2, 7, 3, stride=2))
    tracker, captured, returned, csv = run_epochs(
        model, lambda gen: torch.randn(4, 2, 3, 3, generator=gen), tmp_path, epochs=1
    )
    check_against_reference(tracker, captured, returned, csv, lambda out: conv_rows(out, "channelwise"))
    values = returned[0]
    assert values["train-saturation_layer"] * 7 == values["train-intrinsic-dimensionality_layer"]


def _pair_mean(x, axes):
    """Average non-overlapping pairs along ``axes`` (a factor-2 linear / area downsampling)."""
    for axis in axes:
        shape = list(x.shape)
        shape[axis : axis + 1] = [shape[axis] // 2, 2]
        x = x.reshape(shape).mean(axis + 1)
    return x


@pytest.mark.parametrize(
    "layer, shape, strategy, size, reference",
    [
        # 'bilinear' asked for a 1-d map means linear interpolation: factor 2 averages pairs.
        (lambda: nn.Conv1d(2, 4, 1), (2, 16), "bilinear", 8, lambda o: _pair_mean(o, [2])),
        # 'bicubic' asked for a 3-d map means trilinear: factor 2 averages 2x2x2 blocks.
        (lambda: nn.Conv3d(2, 3, 1), (2, 8, 8, 8), "bicubic", 4, lambda o: _pair_mean(o, [2, 3, 4])),
        # nearest with factor 2 keeps every other position.
        (lambda: nn.Conv3d(2, 3, 1), (2, 8, 8, 8), "nearest", 4, lambda o: o[:, :, ::2, ::2, ::2]),
        # The transposed convolution doubles 4 to 8; 'area' brings it back to 4.
        (lambda: nn.ConvTranspose1d(2, 3, 2, stride=2), (2, 4), "area", 4, lambda o: _pair_mean(o, [2])),
        # Maps no larger than the limit are left alone.
        (lambda: nn.Conv1d(2, 3, 1), (2, 6), "nearest", 6, lambda o: o),
    ],
)
def test_interpolation_of_1d_and_3d_maps(layer, shape, strategy, size, reference, tmp_path):
    torch.manual_seed(2)
    model = Holder(layer())
    tracker, captured, returned, csv = run_epochs(
        model,
        lambda gen: 1.0 + torch.randn(5, *shape, generator=gen),
        tmp_path,
        epochs=2,
        interpolation_strategy=strategy,
        interpolation_downsampling=size,
    )
    check_against_reference(tracker, captured, returned, csv, lambda out: conv_rows(reference(out), "channelwise"))


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(2, 3, 2), (2, 9)),
        (nn.Conv2d(2, 3, 2), (2, 5, 6)),
        (nn.Conv3d(2, 3, 2), (2, 4, 3, 4)),
        (nn.ConvTranspose2d(2, 3, 2), (2, 4, 4)),
    ],
)
def test_unbatched_convolution_input_is_one_sample(layer, shape, tmp_path):
    # PyTorch accepts (C, *spatial) without a batch dimension; the output has no batch
    # dimension either and must not be read as a batch of C maps.
    torch.manual_seed(3)
    tracker, captured, returned, csv = run_epochs(
        Holder(layer), lambda gen: torch.randn(*shape, generator=gen), tmp_path, epochs=2
    )
    check_against_reference(
        tracker, captured, returned, csv, lambda out: conv_rows(out[None], "channelwise")
    )
    assert returned[0]["train-saturation_layer"] * 3 == returned[0]["train-intrinsic-dimensionality_layer"]


def test_include_conv_false_drops_every_convolution(tmp_path):
    class Everything(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(1, 2, 1)
            self.c2 = nn.Conv2d(1, 2, 1)
            self.c3 = nn.Conv3d(1, 2, 1)
            self.t1 = nn.ConvTranspose1d(1, 2, 1)
            self.t2 = nn.ConvTranspose2d(1, 2, 1)
            self.t3 = nn.ConvTranspose3d(1, 2, 1)
            self.gru = nn.GRU(2, 3)
            self.rnn = nn.RNN(2, 3)
            self.lstm = nn.LSTM(2, 3)
            self.head = nn.Linear(3, 2)

    torch.manual_seed(10)
    model = Everything()
    with CheckLayerSat(str(tmp_path / "all"), "csv", model) as tracker:
        assert list(tracker.layers) == ["c1", "c2", "c3", "t1", "t2", "t3", "gru", "rnn", "lstm", "head"]
    capture = OutputCapture({"head": model.head})
    with CheckLayerSat(str(tmp_path / "noconv"), "csv", model, include_conv=False, stats=["lsat", "trc"]) as tracker:
        assert list(tracker.layers) == ["gru", "rnn", "lstm", "head"]
        model.c3(torch.randn(2, 1, 2, 2, 2))
        model.head(torch.randn(4, 3))
        values = tracker.add_saturations()
    assert list(values) == ["train-saturation_head", "train-covariance-trace_head"]
    ref = np_stats(np.concatenate(capture.take("head", "train")))
    assert values["train-saturation_head"] == ref["lsat"]
    assert values["train-covariance-trace_head"] == pytest.approx(ref["trc"], rel=1e-6)
    only_conv = nn.Sequential(nn.Conv1d(1, 2, 1), nn.ConvTranspose3d(2, 2, 1))
    with pytest.raises(ValueError, match="include_conv=False"):
        CheckLayerSat(str(tmp_path / "x"), "csv", only_conv, include_conv=False)


# ------------------------------------------------------------------------- recurrent layers
RECURRENT = {"GRU": nn.GRU, "RNN": nn.RNN}
LENGTHS = [5, 2, 4, 1, 3, 5]


class Packed(nn.Module):
    """Feeds the recurrent layer a PackedSequence of varying lengths."""

    def __init__(self, layer, batch_first):
        super().__init__()
        self.layer = layer
        self.batch_first = batch_first

    def forward(self, x):
        packed = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=self.batch_first, enforce_sorted=False)
        return self.layer(packed)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method", ["last_timestep", "timestepwise"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("kind", sorted(RECURRENT))
def test_recurrent_layers_match_numpy(kind, batch_first, method, packed, tmp_path):
    torch.manual_seed(4)
    layer = RECURRENT[kind](3, 6, batch_first=batch_first)
    model = Packed(layer, batch_first) if packed else Holder(layer)
    shape = (len(LENGTHS), 5, 3) if batch_first else (5, len(LENGTHS), 3)

    def make_input(gen):
        return 0.5 + torch.randn(*shape, generator=gen) * torch.tensor([1.5, 0.7, 0.2])

    tracker, captured, returned, csv = run_epochs(model, make_input, tmp_path, timeseries_method=method)
    check_against_reference(
        tracker, captured, returned, csv, lambda out: recurrent_rows(out, batch_first, method)
    )


@pytest.mark.parametrize("kind", sorted(RECURRENT))
def test_bidirectional_stacked_recurrent_width(kind, tmp_path):
    # Feature size is hidden_size x num_directions; the output of the top layer is tracked.
    torch.manual_seed(5)
    layer = RECURRENT[kind](3, 4, num_layers=2, bidirectional=True)
    tracker, captured, returned, csv = run_epochs(
        Holder(layer), lambda gen: torch.randn(4, 7, 3, generator=gen), tmp_path, timeseries_method="timestepwise"
    )
    check_against_reference(tracker, captured, returned, csv, lambda out: recurrent_rows(out, False, "timestepwise"))
    values = returned[-1]
    assert values["eval-saturation_layer"] * 8 == values["eval-intrinsic-dimensionality_layer"]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_max_samples_counts_sequences_of_a_time_major_gru(packed, tmp_path):
    # 6 sequences per batch and max_samples=8: the first batch whole, then the first 2
    # sequences of the second; nothing after. Time-major, so the batch is dim 1.
    torch.manual_seed(6)
    layer = nn.GRU(2, 4)
    model = Packed(layer, False) if packed else Holder(layer)
    tracker, captured, returned, csv = run_epochs(
        model,
        lambda gen: torch.randn(5, len(LENGTHS), 2, generator=gen),
        tmp_path,
        train_batches=3,
        eval_batches=3,
        max_samples=8,
        timeseries_method="timestepwise",
    )

    def limited(raws):
        kept = []
        for raw, take in zip(raws, (6, 2, 0)):
            if isinstance(raw, nn.utils.rnn.PackedSequence):
                padded, lengths = pad_packed_sequence(raw, batch_first=True)
                padded = padded.detach().double().numpy()
                kept += [padded[i, :n] for i, n in enumerate(lengths.tolist()[:take])]
            else:
                kept.append(np.swapaxes(raw, 0, 1)[:take].reshape(-1, raw.shape[-1]))
        return np.concatenate(kept)

    for epoch, outputs in enumerate(captured):
        for mode in ("train", "eval"):
            ref = np_stats(limited(outputs[("layer", mode)]), THRESH)
            assert returned[epoch][f"{mode}-intrinsic-dimensionality_layer"] == ref["idim"]
            assert csv.loc[epoch, f"{mode}-covariance-trace_layer"] == pytest.approx(ref["trc"], rel=1e-6)


def test_unbatched_sequence_is_one_sequence(tmp_path):
    # A (T, F) input to a GRU is a single sequence: last_timestep gives one row per pass.
    torch.manual_seed(7)
    tracker, captured, returned, csv = run_epochs(
        Holder(nn.GRU(2, 3)), lambda gen: torch.randn(6, 2, generator=gen), tmp_path, train_batches=8, eval_batches=8
    )
    check_against_reference(tracker, captured, returned, csv, lambda out: out[-1:])


def test_activations_that_move_between_epochs_stay_exact(tmp_path):
    # Weights change between epochs; here the bias jumps by 10^3 standard deviations.
    # Each epoch must still match its float64 reference (SPEC §4: rel. error <= 1e-6),
    # whatever the previous epoch's mean was.
    torch.manual_seed(8)
    layer = nn.Conv1d(3, 4, 1)
    savefile = str(tmp_path / "drift")
    tracker = CheckLayerSat(savefile, "csv", layer, stats=["cov", "trc"], nosave=True)
    capture = OutputCapture(dict(tracker.layers))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for epoch in range(3):
            layer.bias += 1000.0 * (epoch + 1)
            for _ in range(4):
                layer(torch.randn(8, 3, 5, generator=gen))
            values = tracker.add_saturations()
            rows = np.concatenate([conv_rows(out, "channelwise") for out in capture.take("Module-0-Conv1d", "train")])
            ref = np_stats(rows)
            got = values["train-covariance-matrix_Module-0-Conv1d"]
            assert np.linalg.norm(got - ref["cov"]) / np.linalg.norm(ref["cov"]) < 1e-6
            assert values["train-covariance-trace_Module-0-Conv1d"] == pytest.approx(ref["trc"], rel=1e-6)
    tracker.close()
