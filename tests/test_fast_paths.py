"""Every fast path of the accumulator and the reshaping, against float64 numpy references.

The float32 products (row blocks, lower block triangle, the channels-first layout, the
moving shift) must stay within SPEC §4: 1e-6 relative Frobenius error against a
two-pass float64 covariance, also when |mean| = 1e4 · std.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import delve.gram as gram
from delve import CheckLayerSat, TorchCovarianceMatrix
from delve.activations import first_rows
from delve.layers import to_data_matrix, to_data_rows
from delve.metrics import layer_statistics
from delve.precision import FULL_PRECISION
from tests.reference import OutputCapture, np_cov, rel_err

TOL = 1e-6


def _rows(rng, n, d, mean_scale=0.0, scale=1.0):
    """Correlated rows whose per-feature means are ``mean_scale`` times the feature std.

    The distribution depends on ``d`` and ``mean_scale`` only (not on ``rng``), so that
    successive calls draw batches of one data set.
    """
    fixed = np.random.default_rng(1000 + d)
    mix = (fixed.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)) * scale
    std = np.sqrt((mix**2).sum(0))
    mean = mean_scale * std * fixed.choice([-1.0, 1.0], d)
    return rng.standard_normal((n, d)) @ mix + mean


@pytest.fixture(params=gram.PRODUCTS.candidates)
def product(request, monkeypatch):
    """Force one Gram product for the whole test: every candidate must meet SPEC §4 on its own."""
    monkeypatch.setenv(gram.PRODUCTS.env, request.param)
    return request.param


def _accumulate(parts, **kwargs):
    acc = TorchCovarianceMatrix(**kwargs)
    for part in parts:
        acc.update_rows(part) if part.dim() != 2 else acc.update(part)
    return acc


# ------------------------------------------------------------------ float32 products


@pytest.mark.parametrize("d", [16, 32, 40, 72, 136, 520])
@pytest.mark.parametrize("mean_scale", [0.0, 1e4])
def test_float32_products_every_block_split(d, mean_scale, product):
    # 16..520 features cover one block, two, four (72: boundaries off multiples of 16)
    # and eight; 9000 rows make two row blocks of the product.
    rng = np.random.default_rng(d)
    n = 9000 if d < 200 else 700
    rows = _rows(rng, n, d, mean_scale).astype(np.float32)
    acc = _accumulate(torch.from_numpy(p) for p in np.array_split(rows, 3))
    assert acc.count == n
    assert rel_err(acc.fix().numpy(), np_cov(rows)) < TOL
    np.testing.assert_allclose(acc.mean.numpy(), rows.astype(np.float64).mean(0), rtol=1e-9, atol=1e-7 * rows.std())


def test_many_rows_few_features_keep_their_digits():
    # A long sum of float32 products loses digits row by row: these row counts are
    # where a single product went past the contract (and the few-feature float64 path).
    rng = np.random.default_rng(1)
    for d, n in ((3, 70000), (8, 70000), (24, 60000)):
        rows = _rows(rng, n, d, mean_scale=1e4).astype(np.float32)
        acc = _accumulate([torch.from_numpy(rows)])
        assert rel_err(acc.fix().numpy(), np_cov(rows)) < TOL, (d, n)


def test_rounding_does_not_grow_with_the_batch(product):
    # One batch of 600k rows: a single float32 product over all of them would drift
    # towards SPEC's limit. Products over row blocks summed in float64 keep the error of
    # one block, whatever the machine's kernels make that error: the reference is the
    # error of single-block batches of the same data, measured here.
    rng = np.random.default_rng(11)
    rows = _rows(rng, 600_000, 16, mean_scale=1e4).astype(np.float32)
    acc = _accumulate([torch.from_numpy(rows)])
    error = rel_err(acc.fix().numpy(), np_cov(rows))
    blocks = np.array_split(rows[: 4 * 8192], 4)
    one_block = max(rel_err(_accumulate([torch.from_numpy(b)]).fix().numpy(), np_cov(b)) for b in blocks)
    assert error < TOL
    assert error <= 2 * one_block, (error, one_block)


def test_many_batches_with_a_drifting_mean(product):
    # 40 batches: the shift moves every few batches while the mean walks by 30 std.
    rng = np.random.default_rng(2)
    parts = [_rows(rng, 300, 48, 1e4).astype(np.float32) + np.float32(0.75 * i) for i in range(40)]
    acc = _accumulate(torch.from_numpy(p) for p in parts)
    assert rel_err(acc.fix().numpy(), np_cov(np.concatenate(parts))) < TOL


def test_float64_inputs_and_float64_products_are_exact():
    rng = np.random.default_rng(3)
    rows = _rows(rng, 5000, 40, 1e4)
    exact = _accumulate(torch.from_numpy(p) for p in np.array_split(rows, 4))
    assert rel_err(exact.fix().numpy(), np_cov(rows)) < 1e-11
    rows32 = rows.astype(np.float32)
    wide = _accumulate((torch.from_numpy(p) for p in np.array_split(rows32, 4)), float64_products=True)
    assert rel_err(wide.fix().numpy(), np_cov(rows32)) < 1e-11


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, product):
    rng = np.random.default_rng(4)
    rows = torch.from_numpy(_rows(rng, 3000, 36, 2.0).astype(np.float32)).to(dtype)
    acc = _accumulate(rows.split(700))
    assert rel_err(acc.fix().numpy(), np_cov(rows.double().numpy())) < TOL


# ------------------------------------------------------------------ layouts


def test_channels_first_maps_without_reshaping(product):
    rng = np.random.default_rng(5)
    maps = [torch.from_numpy(_rows(rng, 6 * 40, 20 * 33, 1e4).astype(np.float32)).view(6, 40, 20, 33) for _ in range(3)]
    acc = TorchCovarianceMatrix()
    for m in maps:
        acc.update_rows(m.movedim(1, -1))  # a strided view: features are not adjacent
    reference = np_cov(np.concatenate([m.permute(0, 2, 3, 1).reshape(-1, 40).double().numpy() for m in maps]))
    assert rel_err(acc.fix().numpy(), reference) < TOL


def test_non_contiguous_inputs(product):
    rng = np.random.default_rng(6)
    base = torch.from_numpy(_rows(rng, 2400, 96, 1e4).astype(np.float32))
    views = [
        base[:800, ::2],  # strided columns
        base[800:1600].T.contiguous().T[:, :48],  # column-major
        base[1600:, 1::2].unsqueeze(0).expand(2, 800, 48)[1],  # an expanded view
    ]
    acc = _accumulate(views)
    reference = np_cov(np.concatenate([v.double().numpy() for v in views]))
    assert rel_err(acc.fix().numpy(), reference) < TOL


def test_uneven_row_blocks_and_feature_counts(product):
    # Row counts that do not divide into blocks are padded with zero rows internally.
    rng = np.random.default_rng(7)
    parts = [torch.from_numpy(_rows(rng, n, 33, 50.0).astype(np.float32)) for n in (1, 8193, 17001, 5)]
    acc = _accumulate(parts)
    assert acc.count == 1 + 8193 + 17001 + 5
    assert rel_err(acc.fix().numpy(), np_cov(np.concatenate([p.numpy() for p in parts]))) < TOL


@pytest.mark.parametrize("layout", ["rows", "channels-first"])
def test_masked_rows_under_every_product(product, layout):
    # Padding rows get zero weight in the centred copy, whichever product multiplies it;
    # 24 × 700 rows make three row blocks, so the streamed product runs block by block.
    rng = np.random.default_rng(12)
    data = _rows(rng, 24 * 700, 40, mean_scale=1e4).astype(np.float32).reshape(24, 700, 40)
    valid = rng.random((24, 700)) < 0.7
    data[~valid] = np.nan  # padding may hold anything
    x = torch.from_numpy(data)
    if layout == "channels-first":
        x = x.movedim(-1, 1).contiguous().movedim(1, -1)  # features strided, as a conv map's rows
    acc = TorchCovarianceMatrix()
    acc.update_rows(x, torch.from_numpy(valid))
    assert acc.count == valid.sum() and acc.skipped_batches == 0
    assert rel_err(acc.fix().numpy(), np_cov(data[valid])) < TOL


# ------------------------------------------------------------------ state handling


@pytest.fixture(params=["host", "device"])
def skip_decided_on(request, monkeypatch):
    """Decide to skip a non-finite batch on the host (the CPU's way) or on the device (a GPU's)."""
    if request.param == "device":
        monkeypatch.setattr(gram, "host_value", lambda value: None)
    return request.param


@pytest.mark.parametrize("d", [64, 520])
def test_non_finite_batch_among_float32_batches_is_skipped(d, product, skip_decided_on):
    rng = np.random.default_rng(8)
    parts = [_rows(rng, 500, d, 1e4).astype(np.float32) for _ in range(11)]
    bad = parts[4].copy()
    bad[17, 5] = np.nan
    bad2 = parts[6].copy()
    bad2[0, d - 1] = np.inf
    acc = _accumulate(torch.from_numpy(p) for p in [*parts[:4], bad, *parts[4:6], bad2, *parts[6:]])
    assert acc.skipped_batches == 2 and acc.count == 11 * 500
    assert rel_err(acc.fix().numpy(), np_cov(np.concatenate(parts))) < TOL


def test_first_batch_with_a_nan_does_not_decentre_the_next_ones(skip_decided_on):
    # The first batch sets the shift the next ones are centred on; its NaN must not
    # turn that shift into 0 for a feature whose mean is 1e4 standard deviations.
    rng = np.random.default_rng(12)
    parts = [_rows(rng, 400, 32, 1e4).astype(np.float32) for _ in range(4)]
    first = parts[0].copy()
    first[3, 7] = np.nan
    acc = _accumulate(torch.from_numpy(p) for p in [first, *parts[1:]])
    assert acc.skipped_batches == 1
    assert rel_err(acc.fix().numpy(), np_cov(np.concatenate(parts[1:]))) < TOL


def test_merge_and_state_assignment_round_trip():
    rng = np.random.default_rng(9)
    a, b = (_rows(rng, n, 40, 1e4).astype(np.float32) for n in (3000, 700))
    b += np.float32(3.0)
    left, right = _accumulate([torch.from_numpy(a)]), _accumulate([torch.from_numpy(b)])
    empty = TorchCovarianceMatrix()
    empty.merge(left).merge(right)
    union = np_cov(np.concatenate([a, b]))
    assert empty.count == 3700
    assert rel_err(empty.fix().numpy(), union) < TOL
    # Rebuild an accumulator from its public state, then keep feeding it.
    state = empty.state_tensors()
    copy = TorchCovarianceMatrix.from_state({k: v.clone() for k, v in state.items()})
    assert rel_err(copy.fix().numpy(), union) < TOL
    c = _rows(rng, 500, 40, 1e4).astype(np.float32)
    copy.update(torch.from_numpy(c))
    assert rel_err(copy.fix().numpy(), np_cov(np.concatenate([a, b, c]))) < TOL
    assert np.allclose(copy.fix().numpy(), copy.fix().numpy().T, rtol=0, atol=0)  # exactly symmetric


def test_update_reads_no_tensor_value_on_the_host(monkeypatch):
    # On a GPU, any .item()/bool()/int() of a device tensor inside the hook would stall
    # the training loop. Python-level reads are refused here while batches are added.
    # The one read the CPU allows itself (the scale, free there) is switched to what a
    # GPU does.
    acc = TorchCovarianceMatrix()
    rows = torch.randn(4000, 70)
    acc.update(rows[:100])  # the first batch allocates; it may read shapes only either way

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host during update")

    with monkeypatch.context() as patch:
        patch.setattr(gram, "host_value", lambda value: None)
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse)
        for i in range(1, 40):
            acc.update_rows(rows[i * 100 : (i + 1) * 100].view(10, 10, 70))
    assert rel_err(acc.fix().numpy(), np_cov(rows.double().numpy())) < TOL


@pytest.mark.parametrize("exponent", [-70, 0, 70])
def test_the_cpu_and_gpu_centred_copies_agree_to_the_bit(monkeypatch, exponent):
    # The CPU reads the power-of-two scale and multiplies by a Python number; a GPU
    # keeps it on the device. Both round (x − s)·c once, so the state is the same.
    rng = np.random.default_rng(5)
    rows = torch.from_numpy(_rows(rng, 3000, 40, mean_scale=1e4, scale=2.0**exponent).astype(np.float32))
    monkeypatch.setenv(gram.PRODUCTS.env, "full")  # the same product both times
    on_cpu = _accumulate(rows.split(600))
    monkeypatch.setattr(gram, "host_value", lambda value: None)
    like_gpu = _accumulate(rows.split(600))
    assert torch.equal(on_cpu.scatter, like_gpu.scatter)
    assert rel_err(on_cpu.fix().numpy(), np_cov(rows.double().numpy())) < TOL


def test_update_rows_input_rules():
    acc = TorchCovarianceMatrix()
    with pytest.raises(ValueError, match=r"\(\.\.\., features\).*\(5,\)"):
        acc.update_rows(torch.randn(5))
    acc.update_rows(torch.randn(0, 3, 40))  # no rows: nothing happens
    assert acc.dim is None
    acc.update_rows(torch.randn(2, 3, 40))
    with pytest.raises(ValueError, match="changed from 40 to 41"):
        acc.update_rows(torch.randn(2, 3, 41))
    with pytest.raises(ValueError, match="rows, features"):
        acc.update(torch.randn(2, 3, 40))  # update() itself keeps to matrices
    assert acc.count == 6


def test_workspace_is_reused_and_released():
    gram.release_workspace()
    acc = TorchCovarianceMatrix()
    big, small = torch.randn(5000, 64), torch.randn(300, 64)
    acc.update(big)
    kept = gram.workspace_bytes()
    assert kept >= 5000 * 64 * 4
    acc.update(small)
    assert gram.workspace_bytes() == kept  # no second buffer for a smaller batch
    gram.release_workspace()
    assert gram.workspace_bytes() == 0
    acc.update(small)
    assert rel_err(acc.fix().numpy(), np_cov(torch.cat([big, small, small]).double().numpy())) < TOL


# ------------------------------------------------------------------ reshaping


def test_rows_are_views_with_the_rows_of_the_matrix():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, 3)
    out = conv(torch.randn(4, 3, 10, 10)).detach()
    rows, batch = to_data_rows(conv, out)
    assert batch == 4 and rows.shape == (4, 8, 8, 24)
    assert rows.data_ptr() == out.data_ptr()  # no copy of the feature map
    matrix, _ = to_data_matrix(conv, out)
    np.testing.assert_array_equal(rows.reshape(-1, 24).numpy(), matrix.numpy())
    lstm = nn.LSTM(5, 7)
    seq = lstm(torch.randn(6, 3, 5))[0].detach()
    rows, batch = to_data_rows(lstm, seq, timeseries_method="timestepwise")
    assert batch == 3 and rows.data_ptr() == seq.data_ptr()
    np.testing.assert_array_equal(rows.reshape(-1, 7).numpy(), seq.reshape(-1, 7).numpy())
    # Only the leading rows are copied for the embedding samples.
    np.testing.assert_array_equal(first_rows(rows, 5).numpy(), seq.reshape(-1, 7)[:5].numpy())
    np.testing.assert_array_equal(
        first_rows(to_data_rows(conv, out)[0], 70).numpy(), out.permute(0, 2, 3, 1).reshape(-1, 24)[:70].numpy()
    )


def test_packed_timestepwise_rows_are_the_valid_steps():
    lstm = nn.LSTM(4, 6, batch_first=True)
    lengths = torch.tensor([7, 3, 5])
    x = torch.randn(3, 7, 4)
    packed_out = lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))  # as a hook sees it
    rows, batch = to_data_rows(lstm, packed_out, timeseries_method="timestepwise")
    assert batch == 3 and rows.shape == (15, 6)
    padded = lstm(x)[0].detach()
    valid = np.concatenate([padded[i, : lengths[i]].numpy() for i in range(3)])
    assert rel_err(np_cov(rows.detach().numpy()), np_cov(valid)) < 1e-5
    limited, batch = to_data_rows(lstm, packed_out, timeseries_method="timestepwise", limit=2)
    assert batch == 2 and limited.shape[0] == 7 + 3


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 40, 3, padding=1)
        self.conv_last = nn.Conv2d(40, 36, 1)
        self.fc = nn.Linear(36, 64)
        self.lstm = nn.LSTM(64, 20)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.conv_last(h.contiguous(memory_format=torch.channels_last))
        h = self.fc(h.mean((2, 3)) + 1e3)  # a large mean in fc's output
        out, _ = self.lstm(h.view(4, -1, 64))
        return out.sum()


def test_tracker_fast_paths_match_the_outputs_seen_by_the_test():
    torch.manual_seed(1)
    net = _Net()
    tracker = CheckLayerSat("unused", "csv", net, stats=["cov"], nosave=True, timeseries_method="timestepwise")
    capture = OutputCapture(tracker.layers)
    optim = torch.optim.SGD(net.parameters(), lr=1e-3)
    for _epoch in range(2):
        for _ in range(5):
            optim.zero_grad()
            net(torch.randn(8, 3, 12, 12)).backward()
            optim.step()
        values = tracker.add_saturations()
        for name, layer in tracker.layers.items():
            outputs = capture.take(name, "train")
            if isinstance(layer, nn.Conv2d):
                rows = [o.transpose(0, 2, 3, 1).reshape(-1, o.shape[1]) for o in outputs]
            else:
                rows = [o.reshape(-1, o.shape[-1]) for o in outputs]
            got = values[f"train-covariance-matrix_{name}"]
            assert rel_err(got, np_cov(np.concatenate(rows))) < TOL, name
    capture.remove()
    tracker.close()


def test_one_eigenvalue_decomposition_per_layer_and_mode(monkeypatch):
    calls = {"eigvalsh": 0, "eigh": 0}
    real_eigvalsh, real_eigh = torch.linalg.eigvalsh, torch.linalg.eigh

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(torch.linalg, "eigvalsh", counting("eigvalsh", real_eigvalsh))
    monkeypatch.setattr(torch.linalg, "eigh", counting("eigh", real_eigh))
    rng = np.random.default_rng(10)
    rows = _rows(rng, 400, 20)
    cov = np_cov(rows)
    values = layer_statistics(torch.from_numpy(cov), ["lsat", "idim", "det", "trc", "dtrc", "erank", "pr"])
    assert calls == {"eigvalsh": 1, "eigh": 0}
    eig = np.clip(np.sort(np.linalg.eigvalsh(cov))[::-1], 0, None)
    p = eig / eig.sum()
    assert values["erank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert values["pr"] == pytest.approx(eig.sum() ** 2 / (eig**2).sum(), rel=1e-10)
    assert values["det"] == pytest.approx(np.prod(eig), rel=1e-8)
    layer_statistics(torch.from_numpy(cov), ["lsat", "embed"], samples=torch.from_numpy(rows[:10]))
    assert calls == {"eigvalsh": 1, "eigh": 1}


# ------------------------------------------------------------------ matmul precision


def _precision_state():
    return (
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.mkldnn.matmul.fp32_precision,
        torch.get_float32_matmul_precision(),
    )


@pytest.fixture
def user_precision():
    """Let a test set the process-wide matmul precision; put the default back after it.

    Request it before ``monkeypatch``, so that it is torn down after the patches are undone.
    """
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.mkldnn.matmul.fp32_precision = "none"


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_products_run_at_full_precision_and_the_setting_is_put_back(user_precision, monkeypatch, precision):
    # "high" is TF32 for float32 products on recent GPUs (10 mantissa bits), "medium"
    # bf16 on CPUs that have it: TF32 rounding alone costs a covariance 2e-5 to 8e-5 relative error.
    user_precision(precision)
    before = _precision_state()
    assert before[0] == "tf32"
    during = []
    products = gram.centred_gram

    def spy(*args):
        during.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return products(*args)

    monkeypatch.setattr(gram, "centred_gram", spy)
    rng = np.random.default_rng(21)
    rows = _rows(rng, 6000, 48, mean_scale=1e4).astype(np.float32)
    acc = _accumulate(torch.from_numpy(p) for p in np.array_split(rows, 4))
    assert during and all(d == ("ieee", "ieee") for d in during)
    assert _precision_state() == before
    assert rel_err(acc.fix().numpy(), np_cov(rows)) < TOL


def test_precision_before_the_per_backend_settings(user_precision, monkeypatch):
    # torch releases before the per-backend fp32_precision attributes have only the
    # process-wide float32_matmul_precision.
    user_precision("high")
    monkeypatch.setattr(FULL_PRECISION, "backends", ())
    during = []
    products = gram.centred_gram

    def spy(*args):
        during.append(torch.get_float32_matmul_precision())
        return products(*args)

    monkeypatch.setattr(gram, "centred_gram", spy)
    rows = torch.randn(2000, 24)
    acc = _accumulate(rows.split(500))
    assert during == ["highest"] * 4
    assert torch.get_float32_matmul_precision() == "high"
    assert rel_err(acc.fix().numpy(), np_cov(rows.double().numpy())) < TOL
    monkeypatch.undo()
    assert _precision_state()[2] == "high"


def test_precision_is_put_back_after_concurrent_updates(user_precision):
    # Accumulators of several DataParallel replicas multiply at once: the setting is
    # raised by the first and put back by the last, whatever the interleaving.
    import threading

    user_precision("high")
    before = _precision_state()
    rows = torch.randn(8, 3000, 40)
    accs = [TorchCovarianceMatrix() for _ in range(8)]
    start = threading.Barrier(8)

    def work(i):
        start.wait()
        for part in rows[i].split(300):
            accs[i].update(part)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _precision_state() == before
    assert FULL_PRECISION.users == 0
    for i, acc in enumerate(accs):
        assert rel_err(acc.fix().numpy(), np_cov(rows[i].double().numpy())) < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tf32_does_not_reach_the_gram_products_on_cuda(user_precision):
    user_precision("high")
    rng = np.random.default_rng(22)
    rows = _rows(rng, 20000, 256).astype(np.float32)
    acc = _accumulate([torch.from_numpy(p).cuda() for p in np.array_split(rows, 5)])
    assert rel_err(acc.fix().cpu().numpy(), np_cov(rows)) < TOL
