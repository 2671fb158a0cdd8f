"""Property-based tests: the accumulator's result does not depend on how the rows arrive."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from delve import TorchCovarianceMatrix
from tests.reference import np_cov, rel_err

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def datasets(draw, max_rows=40, max_dim=5):
    """A float64 data matrix with uneven column scales and a mean far from zero."""
    rows = draw(st.integers(2, max_rows))
    dim = draw(st.integers(1, max_dim))
    seed = draw(st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e3]))
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-1, 1, size=dim)
    data = rng.standard_normal((rows, dim)) * scales + offset * scales
    return data


@st.composite
def splits(draw, rows):
    """Cut ``range(rows)`` into consecutive non-empty batches, then shuffle the batches."""
    cuts = draw(st.sets(st.integers(1, rows - 1), max_size=min(rows - 1, 8))) if rows > 1 else set()
    bounds = [0, *sorted(cuts), rows]
    batches = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    return draw(st.permutations(batches))


def _accumulate(data, batches, **kwargs):
    acc = TorchCovarianceMatrix(**kwargs)
    for start, stop in batches:
        acc.update(torch.from_numpy(data[start:stop]))
    return acc


@SETTINGS
@given(st.data())
def test_any_split_and_order_of_updates(data):
    rows = data.draw(datasets())
    batches = data.draw(splits(rows.shape[0]))
    acc = _accumulate(rows, batches, float64_products=True)
    whole = _accumulate(rows, [(0, rows.shape[0])], float64_products=True)
    assert acc.count == rows.shape[0]
    assert rel_err(acc.fix().numpy(), np_cov(rows)) < 1e-9
    assert rel_err(acc.fix().numpy(), whole.fix().numpy()) < 1e-9
    np.testing.assert_allclose(acc.mean.numpy(), rows.mean(0), rtol=1e-9, atol=1e-9 * np.abs(rows).max())


@SETTINGS
@given(st.data())
def test_any_merge_tree(data):
    rows = data.draw(datasets())
    batches = data.draw(splits(rows.shape[0]))
    # One accumulator per batch, plus empty ones that must change nothing.
    parts = [_accumulate(rows, [b], float64_products=True) for b in batches]
    parts += [TorchCovarianceMatrix(float64_products=True) for _ in range(data.draw(st.integers(0, 2)))]
    # Merge a random pair until one is left: every binary merge tree, in any order.
    while len(parts) > 1:
        i = data.draw(st.integers(0, len(parts) - 1))
        j = data.draw(st.integers(0, len(parts) - 2))
        j = j + 1 if j >= i else j
        parts[i].merge(parts[j])
        del parts[j]
    (merged,) = parts
    assert merged.count == rows.shape[0]
    assert rel_err(merged.fix().numpy(), np_cov(rows)) < 1e-9
    # merge() must not have disturbed what a merged accumulator goes on to see.
    merged.update(torch.from_numpy(rows))
    assert rel_err(merged.fix().numpy(), np_cov(np.concatenate([rows, rows]))) < 1e-9


@SETTINGS
@given(st.data())
def test_merge_leaves_its_argument_untouched_and_copies_are_independent(data):
    rows = data.draw(datasets())
    batches = data.draw(splits(rows.shape[0]))
    source = _accumulate(rows, batches, float64_products=True)
    before = {k: v.clone() for k, v in source.state_tensors().items()}
    target = TorchCovarianceMatrix(float64_products=True).merge(source)
    target.merge(source)  # the same rows twice
    for key, value in source.state_tensors().items():
        assert torch.equal(value, before[key]), key
    assert target.count == 2 * rows.shape[0]
    assert rel_err(target.fix().numpy(), np_cov(np.concatenate([rows, rows]))) < 1e-9
    copy = TorchCovarianceMatrix.from_state({k: v.clone() for k, v in source.state_tensors().items()})
    assert rel_err(copy.fix().numpy(), np_cov(rows)) < 1e-9
    copy.reset()
    assert source.count == rows.shape[0]
    assert rel_err(source.fix().numpy(), np_cov(rows)) < 1e-9


@SETTINGS
@given(st.data())
def test_default_float32_products_stay_within_the_contract(data):
    # The default path computes Gram products in float32 on shifted data; the
    # contract is 1e-6 relative to the float64 two-pass reference.
    rows = data.draw(datasets(max_rows=60, max_dim=6)).astype(np.float32)
    batches = data.draw(splits(rows.shape[0]))
    acc = _accumulate(rows, batches)
    assert rel_err(acc.fix().numpy(), np_cov(rows.astype(np.float64))) < 1e-6
