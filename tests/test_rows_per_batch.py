"""rows_per_batch: a uniform draw of each batch's rows, checked against numpy on the rows it kept.

Which rows the tracker draws is its own business (its generator, its seed); what is
checked is what any correct draw must give. The draw itself (:func:`delve.activations.draw_rows`)
is tested on rows that carry their own index: the rows drawn are distinct rows of the
batch, real ones while enough exist, and every row is drawn about ``k / rows`` of the
time (a bound from the binomial standard deviation). Through the tracker, a spy on the
accumulator keeps the rows it was handed; the test matches each of them to a row of its
own copy of the layer output, and compares the covariance with ``np.cov`` of exactly
those rows (SPEC §4: 1e-6 relative Frobenius).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from delve import CheckLayerSat, TorchCovarianceMatrix
from delve.activations import Rows, draw_rows
from delve.config import TrackerConfig
from tests.reference import OutputCapture, conv_rows, np_cov, recurrent_rows, rel_err

TOL = 1e-6


# ------------------------------------------------------------------ the draw alone
def indexed_rows(leading, features=3):
    """A ``(*leading, features)`` tensor whose row ``i`` (in row-major order) holds ``i`` everywhere."""
    count = math.prod(leading)
    return torch.arange(count, dtype=torch.float32).repeat_interleave(features).view(*leading, features)


def drawn_indices(rows: Rows) -> np.ndarray:
    values = rows.data.numpy()
    assert (values == values[:, :1]).all()  # whole rows were taken, not mixtures of rows
    return values[:, 0].astype(int)


@pytest.mark.parametrize(
    "rows",
    [
        Rows(indexed_rows((40,)), 40),
        Rows(indexed_rows((4, 10)), 4),  # (B, T, F): timestepwise
        Rows(indexed_rows((2, 5, 4)).permute(0, 2, 1, 3), 2),  # a strided view, as channelwise rows are
    ],
    ids=["matrix", "sequence", "strided"],
)
def test_a_draw_is_k_distinct_rows_of_the_batch(rows):
    generator = torch.Generator().manual_seed(3)
    flat = rows.data.reshape(-1, rows.data.shape[-1])[:, 0].numpy().astype(int)
    for _ in range(20):
        drawn = draw_rows(rows, 7, generator)
        assert drawn.data.shape == (7, 3) and drawn.samples == rows.samples and drawn.valid is None
        index = drawn_indices(drawn)
        assert len(set(index)) == 7 and set(index) <= set(flat)


def test_a_batch_of_at_most_k_rows_is_used_whole_without_a_copy():
    rows = Rows(indexed_rows((3, 4)), 3)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert draw_rows(rows, 12, generator) is rows
    assert draw_rows(rows, 50, generator) is rows
    assert torch.equal(generator.get_state(), state)  # nothing drawn, nothing consumed


def frequency_bound(draws, p):
    """Five binomial standard deviations: a fair draw exceeds it with probability below 1e-6 per row."""
    return 5 * math.sqrt(draws * p * (1 - p))


def test_every_row_is_drawn_about_k_over_rows_of_the_time():
    rows, k, draws = Rows(indexed_rows((5, 6)), 5), 8, 3000
    generator = torch.Generator().manual_seed(1)
    counts = np.zeros(30)
    for _ in range(draws):
        np.add.at(counts, drawn_indices(draw_rows(rows, k, generator)), 1)
    p = k / 30
    assert np.abs(counts - draws * p).max() <= frequency_bound(draws, p)
    assert counts.sum() == draws * k


def test_under_a_mask_only_real_rows_are_drawn_and_each_about_equally_often():
    valid = torch.zeros(4, 6, dtype=torch.bool)
    valid[0, :5] = valid[1, :2] = valid[3, 1:] = True  # 12 real rows of 24
    rows, k, draws = Rows(indexed_rows((4, 6)), 4, valid), 5, 3000
    real = set(np.flatnonzero(valid.numpy().reshape(-1)))
    generator = torch.Generator().manual_seed(2)
    counts = np.zeros(24)
    for _ in range(draws):
        drawn = draw_rows(rows, k, generator)
        assert drawn.valid.all()
        index = drawn_indices(drawn)
        assert len(set(index)) == k and set(index) <= real
        np.add.at(counts, index, 1)
    p = k / len(real)
    assert counts[sorted(real)].min() > 0 and not counts[sorted(set(range(24)) - real)].any()
    assert np.abs(counts[sorted(real)] - draws * p).max() <= frequency_bound(draws, p)


def test_with_fewer_real_rows_than_k_every_real_row_is_drawn_and_the_padding_stays_masked():
    valid = torch.zeros(3, 5, dtype=torch.bool)
    valid[0, 0] = valid[2, 2:] = True  # 4 real rows of 15
    drawn = draw_rows(Rows(indexed_rows((3, 5)), 3, valid), 6, torch.Generator().manual_seed(0))
    index, flags = drawn_indices(drawn), drawn.valid.numpy()
    assert len(set(index)) == 6 and flags.sum() == 4
    assert set(index[flags]) == set(np.flatnonzero(valid.numpy().reshape(-1)))


def test_a_draw_reads_no_tensor_value_on_the_host(monkeypatch):
    # On a GPU, reading a value inside the hook would make the training step wait for it.
    valid = torch.rand(6, 9, generator=torch.Generator().manual_seed(0)) < 0.5
    batches = [Rows(indexed_rows((6, 9)), 6), Rows(indexed_rows((6, 9)), 6, valid)]
    generator = torch.Generator().manual_seed(0)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host during the draw")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            patch.setattr(torch.Tensor, name, refuse)
        drawn = [draw_rows(rows, 10, generator) for rows in batches]
    assert [len(d.data) for d in drawn] == [10, 10]


def test_the_same_seed_draws_the_same_rows():
    rows = Rows(indexed_rows((50,)), 50)
    first = draw_rows(rows, 9, torch.Generator().manual_seed(5)).data
    assert torch.equal(first, draw_rows(rows, 9, torch.Generator().manual_seed(5)).data)


# ------------------------------------------------------------------ through the tracker
class Spy:
    """Keeps, in numpy float64, the real rows every accumulator is handed."""

    def __init__(self, monkeypatch):
        self.handed = {}
        original = TorchCovarianceMatrix.update_rows

        def update_rows(accumulator, x, valid=None):
            rows = x.detach().double().reshape(-1, x.shape[-1]).numpy()
            flags = np.ones(len(rows), bool) if valid is None else valid.reshape(-1).numpy()
            self.handed.setdefault(id(accumulator), []).append((rows, flags))
            return original(accumulator, x, valid)

        monkeypatch.setattr(TorchCovarianceMatrix, "update_rows", update_rows)

    def merges(self, accumulator):
        """The ``(rows, flags)`` of every merge into ``accumulator``."""
        return self.handed.get(id(accumulator), [])

    def rows(self, accumulator):
        """Every real row handed to ``accumulator``."""
        return np.concatenate([rows[flags] for rows, flags in self.merges(accumulator)])


def rows_per_output(rows, outputs):
    """How many of ``rows`` are rows of each output: each must be a distinct row of exactly one of them."""
    population = np.concatenate(outputs)
    owner = np.repeat(np.arange(len(outputs)), [len(out) for out in outputs])
    matches = [np.flatnonzero((population == row).all(1)) for row in rows]
    assert all(len(found) == 1 for found in matches)  # float rows of random data are unique
    index = [int(found[0]) for found in matches]
    assert len(set(index)) == len(rows)
    return np.bincount(owner[index], minlength=len(outputs)).tolist()


class Layers(nn.Module):
    """A Linear on (B, F), a channelwise Conv2d on (B, C, H, W), a time-major timestepwise LSTM."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(6, width)
        self.conv = nn.Conv2d(3, width, 3)
        self.lstm = nn.LSTM(4, width)

    def forward(self, flat, image, sequence):
        return self.fc(flat), self.conv(image), self.lstm(sequence)


def layer_inputs(generator):
    shift = 3.0  # a mean far from zero, where one-pass formulas lose digits
    return (
        shift + torch.randn(24, 6, generator=generator),
        shift + torch.randn(2, 3, 6, 6, generator=generator),  # 2·4·4 = 32 channelwise rows
        torch.randn(7, 3, 4, generator=generator),  # (T, B): 21 timestepwise rows
    )


def reference_rows(name, output):
    if name == "conv":
        return conv_rows(output, "channelwise")
    if name == "lstm":
        return recurrent_rows(output, False, "timestepwise")
    return output


ROWS_PER_CALL = {"fc": 24, "conv": 32, "lstm": 21}


def expected_merges(batches, k, enough):
    """The rows of each merge: a draw of ``enough`` rows or more at once, smaller ones once ``enough`` are held."""
    if k >= enough:
        return [k] * batches
    merges, held = [], 0
    for _ in range(batches):
        held += k
        if held >= enough:
            merges.append(held)
            held = 0
    return merges + ([held] if held else [])


# Width 5: every draw is merged at once. Width 40: draws under 10 rows are held back
# and merged in chunks of at least 10, the last one when the accumulator is read.
@pytest.mark.parametrize("width, k", [(5, 1), (5, 20), (40, 1), (40, 3), (40, 12)])
def test_the_covariance_is_that_of_k_distinct_rows_of_every_batch(monkeypatch, width, k):
    spy = Spy(monkeypatch)
    torch.manual_seed(0)
    model = Layers(width)
    tracker = CheckLayerSat(
        "unused", "csv", model, stats=["cov"], nosave=True, timeseries_method="timestepwise", rows_per_batch=k
    )
    capture = OutputCapture(dict(tracker.layers))
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        model(*layer_inputs(generator))
    for name in ("fc", "conv", "lstm"):
        accumulator = tracker.accumulator(name)  # merges what is held back
        outputs = [reference_rows(name, out) for out in capture.take(name, "train")]
        assert rows_per_output(spy.rows(accumulator), outputs) == [k] * 5
        assert accumulator.count == 5 * k
        assert [len(rows) for rows, _ in spy.merges(accumulator)] == expected_merges(5, k, width // 4)
        assert rel_err(accumulator.fix().numpy(), np_cov(spy.rows(accumulator))) <= TOL
    tracker.close()


def test_k_at_least_the_rows_of_a_batch_is_the_exact_covariance():
    torch.manual_seed(0)
    model = Layers(5)
    tracker = CheckLayerSat(
        "unused", "csv", model, stats=["cov"], nosave=True, timeseries_method="timestepwise",
        rows_per_batch=max(ROWS_PER_CALL.values()),
    )
    capture = OutputCapture(dict(tracker.layers))
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        model(*layer_inputs(generator))
    for name in ("fc", "conv", "lstm"):
        rows = np.concatenate([reference_rows(name, out) for out in capture.take(name, "train")])
        assert tracker.accumulator(name).count == 3 * ROWS_PER_CALL[name] == len(rows)
        assert rel_err(tracker.accumulator(name).fix().numpy(), np_cov(rows)) <= TOL
    tracker.close()


@pytest.mark.parametrize("width", [5, 40])
def test_under_a_row_mask_only_real_positions_are_drawn(monkeypatch, width):
    spy = Spy(monkeypatch)
    torch.manual_seed(0)
    model = nn.Linear(4, width)
    tracker = CheckLayerSat(
        "unused", "csv", model, stats=["cov"], nosave=True, timeseries_method="timestepwise", rows_per_batch=6
    )
    name = list(tracker.layers)[0]
    capture = OutputCapture(dict(tracker.layers))
    generator = torch.Generator().manual_seed(1)
    steps = torch.arange(8)
    # 4 + 7 + 2 = 13 and 8 + 1 + 5 = 14 real positions of 24: enough for 6 each.
    masks = [steps < torch.tensor([[4], [7], [2]]), steps >= torch.tensor([[0], [7], [3]])]
    for mask in masks:
        with tracker.row_mask(mask):
            model(1.0 + torch.randn(3, 8, 4, generator=generator))
    accumulator = tracker.accumulator(name)
    assert all(flags.all() for _, flags in spy.merges(accumulator))
    real = [out[mask.numpy()] for out, mask in zip(capture.take(name, "train"), masks)]
    assert rows_per_output(spy.rows(accumulator), real) == [6, 6]
    assert accumulator.count == 12
    assert rel_err(accumulator.fix().numpy(), np_cov(spy.rows(accumulator))) <= TOL
    tracker.close()


@pytest.mark.parametrize("width", [5, 40])
def test_with_fewer_real_positions_than_k_all_of_them_count_and_nothing_else(width):
    torch.manual_seed(0)
    model = nn.Linear(4, width)
    tracker = CheckLayerSat(
        "unused", "csv", model, stats=["cov"], nosave=True, timeseries_method="timestepwise", rows_per_batch=10
    )
    capture = OutputCapture(dict(tracker.layers))
    generator = torch.Generator().manual_seed(1)
    mask = torch.arange(8) < torch.tensor([[3], [0], [4]])  # 7 real positions of 24
    for _ in range(2):
        with tracker.row_mask(mask):
            model(torch.randn(3, 8, 4, generator=generator))
    name = list(tracker.layers)[0]
    real = np.concatenate([out[mask.numpy()] for out in capture.take(name, "train")])
    assert tracker.accumulator(name).count == len(real) == 14
    assert rel_err(tracker.accumulator(name).fix().numpy(), np_cov(real)) <= TOL
    tracker.close()


def test_rows_held_back_are_copies_and_enter_the_epoch_they_were_drawn_in():
    # Draws of 2 rows of a 64-wide layer are held back until 16 are there; the in-place
    # ReLU after the layer changes its output after the hook has seen it.
    model = nn.Sequential(nn.Linear(3, 64), nn.ReLU(inplace=True))
    tracker = CheckLayerSat("unused", "csv", model, stats=["cov"], nosave=True, rows_per_batch=2)
    capture = OutputCapture(dict(tracker.layers))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(2, 3, generator=generator))  # used whole
    rows = np.concatenate(capture.take("0", "train"))
    assert (rows < 0).any()
    (cov,) = tracker.add_saturations().values()
    assert rel_err(cov, np_cov(rows)) <= TOL
    model(torch.randn(2, 3, generator=generator))
    assert tracker.accumulator("0").count == 2  # a new epoch: nothing of the last one
    tracker.close()


def test_max_samples_counts_samples_of_the_batch_dimension_the_rows_are_drawn_from():
    model = nn.Linear(4, 3)
    tracker = CheckLayerSat(
        "unused", "csv", model, nosave=True, timeseries_method="timestepwise", max_samples=5, rows_per_batch=6
    )
    for _ in range(3):
        model(torch.randn(3, 4, 4))  # 3 sequences, 12 rows each
    # 3 sequences, then the 2 left of the budget (8 rows), then none: 6 + 6 rows drawn.
    assert tracker.accumulator(list(tracker.layers)[0]).count == 12
    tracker.close()


def test_the_embedding_samples_are_the_drawn_rows():
    model = nn.Linear(4, 3)
    tracker = CheckLayerSat("unused", "csv", model, stats=["embed"], nosave=True, rows_per_batch=7)
    capture = OutputCapture(dict(tracker.layers))
    # (3 features: draws are merged at once; the embedding rows are offered before any is held back)
    for _ in range(2):
        model(torch.randn(50, 4) * torch.tensor([3.0, 1.0, 0.5, 2.0]))
    _, samples = tracker.compute_statistics()
    (embedded,) = samples.values()
    assert embedded.shape == (14, 2)
    (name,) = tracker.layers
    accumulator = tracker.accumulator(name)
    values, vectors = np.linalg.eigh(accumulator.fix().numpy())
    top = vectors[:, ::-1][:, :2]
    # Every embedded point is the projection of a row of the batches (up to the sign of each
    # direction; samples are kept in float32)...
    outputs = np.concatenate(capture.take(name, "train"))
    projected = (outputs - accumulator.mean.numpy()) @ top
    scale = np.abs(projected).max()
    for point in embedded:
        gaps = np.abs(np.abs(projected) - np.abs(point)).max(axis=1)
        assert gaps.min() <= 1e-5 * scale
    # ...and they are the rows the covariance was made of: centred, with the top two
    # eigenvalues as their variances.
    np.testing.assert_allclose(embedded.mean(0), 0.0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.cov(embedded, rowvar=False, bias=True), np.diag(values[::-1][:2]),
                               rtol=1e-5, atol=1e-5 * values.max())
    capture.remove()
    tracker.close()


# ------------------------------------------------------------------ settings and randomness
@pytest.mark.parametrize("bad", [0, -4, 2.5, "64", True])
def test_a_bad_rows_per_batch_fails_at_construction_naming_it(bad):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"rows_per_batch .*got {repr(bad)}"):
        CheckLayerSat("unused", "csv", model, nosave=True, rows_per_batch=bad)
    with pytest.raises(ValueError, match="rows_per_batch"):
        TrackerConfig(savefile="unused", nosave=True, rows_per_batch=bad)


def test_rows_per_batch_is_a_setting_like_the_others():
    tracker = CheckLayerSat("unused", "csv", nn.Linear(2, 2), nosave=True, rows_per_batch=np.int64(128))
    assert tracker.rows_per_batch == 128 and type(tracker.config.rows_per_batch) is int
    assert CheckLayerSat("unused", "csv", nn.Linear(2, 2), nosave=True).rows_per_batch is None
    tracker.close()


def train(tracked, steps=4):
    """A few SGD steps of a model with dropout, which consumes the global random stream."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 2))
    tracker = CheckLayerSat("unused", "csv", model, nosave=True, rows_per_batch=5) if tracked else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 6)).pow(2).mean().backward()
        optimizer.step()
    if tracker is not None:
        assert tracker.accumulator("0").count == steps * 5
        tracker.close()
    return [p.detach().clone() for p in model.parameters()], torch.random.get_rng_state()


def test_the_global_random_stream_is_untouched():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    tracker = CheckLayerSat("unused", "csv", model, nosave=True, rows_per_batch=4)
    x = torch.randn(20, 6)
    state = torch.random.get_rng_state()
    model(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert tracker.accumulator("0").count == 4
    tracker.close()
    # So training is the same, random numbers and all, with and without the tracker.
    (tracked, tracked_state), (plain, plain_state) = train(True), train(False)
    assert all(torch.equal(a, b) for a, b in zip(tracked, plain))
    assert torch.equal(tracked_state, plain_state)


def test_two_trackers_draw_the_same_rows():
    covariances = []
    for _ in range(2):
        model = nn.Linear(5, 4)
        torch.nn.init.eye_(model.weight)
        torch.nn.init.zeros_(model.bias)
        tracker = CheckLayerSat("unused", "csv", model, stats=["cov"], nosave=True, rows_per_batch=3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(4):
            model(torch.randn(30, 5, generator=generator))
        covariances.append(tracker.accumulator("Module-0-Linear").fix())
        tracker.close()
    assert torch.equal(*covariances)
