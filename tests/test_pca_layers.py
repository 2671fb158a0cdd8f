"""PCA layers against an independent float64 numpy PCA of the data the test fed them."""

from __future__ import annotations

import copy
import io
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import CheckLayerSat
from delve.pca_layers import (
    Conv2DPCALayer,
    LinearPCALayer,
    change_all_pca_layer_centering,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
    rvs,
)
from tests.reference import OutputCapture, np_stats

# ----------------------------------------------------------------- references


def ref_idim(eigenvalues: np.ndarray, thresh: float) -> int:
    """Smallest k whose leading eigenvalues explain `thresh` of the total (SPEC §5)."""
    eig = np.clip(eigenvalues, 0, None)
    total = eig.sum()
    if total <= 0:
        return 0
    running = 0.0
    for k, value in enumerate(eig, start=1):
        running += value
        if running / total >= thresh - 1e-12:
            return k
    return len(eig)


def ref_pca(rows, centering: bool, thresh: float):
    """Mean, descending eigenvalues and eigenvectors, and k, computed two-pass in float64."""
    rows = np.asarray(rows, dtype=np.float64)
    n = rows.shape[0]
    if centering:
        mu = rows.mean(0)
        matrix = np.cov(rows, rowvar=False, bias=True)
    else:
        mu = np.zeros(rows.shape[1])
        matrix = rows.T @ rows / n
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    return mu, values, vectors, ref_idim(values, thresh)


def ref_project(x, mu, basis, keepdim: bool):
    """(x − μ)VVᵀ + μ or (x − μ)V on the rows of x."""
    x = np.asarray(x, dtype=np.float64)
    scores = (x - mu) @ basis
    return scores @ basis.T + mu if keepdim else scores


def align_signs(basis, like):
    """Flip the columns of `basis` to point the way the columns of `like` do (eigenvectors have no sign)."""
    signs = np.sign(np.sum(basis * like, axis=0))
    signs[signs == 0] = 1
    return basis * signs


class LowRank:
    """A distribution of rows with len(scales) clear directions, plus tiny isotropic noise.

    Every call draws new rows from the same distribution (same subspace, same mean).
    """

    def __init__(self, rng, d, scales, mean_in_span=(4.0, -2.0, 1.0), mean_out=0.0, noise=1e-3):
        self.rng, self.d, self.noise = rng, d, noise
        self.scales = np.asarray(scales, dtype=np.float64)
        rank = len(scales)
        self.basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
        self.mean = self.basis @ np.resize(np.asarray(mean_in_span, dtype=np.float64), rank)
        if mean_out:
            outside = rng.standard_normal(d)
            outside -= self.basis @ (self.basis.T @ outside)
            self.mean = self.mean + mean_out * outside / np.linalg.norm(outside)

    def __call__(self, n):
        latent = self.rng.standard_normal((n, len(self.scales))) * self.scales
        return latent @ self.basis.T + self.mean + self.noise * self.rng.standard_normal((n, self.d))


def batches(rows, size, dtype=torch.float32):
    return [torch.tensor(rows[i : i + size], dtype=dtype) for i in range(0, len(rows), size)]


def as_rows(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) -> (B·H·W, C), float64: every pixel is a sample of the channels."""
    x = images.detach().to(torch.float64).numpy()
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def to_images(rows: np.ndarray, b: int, h: int, w: int) -> np.ndarray:
    return rows.reshape(b, h, w, -1).transpose(0, 3, 1, 2)


def train_phase(layer, data):
    layer.train()
    for batch in data:
        assert layer(batch) is batch  # training mode is the identity
    layer.eval()


# ------------------------------------------------------------- LinearPCALayer


@pytest.mark.parametrize("keepdim", [True, False])
@pytest.mark.parametrize("centering", [True, False])
def test_linear_projection_matches_reference_over_two_training_phases(keepdim, centering):
    rng = np.random.default_rng(0)
    layer = LinearPCALayer(10, threshold=0.99, keepdim=keepdim, centering=centering)
    for _phase in range(2):
        # A new subspace each phase: the second fit must not remember the first phase.
        source = LowRank(rng, 10, [5.0, 3.0, 2.0])
        rows = source(300)
        train_phase(layer, batches(rows, 64))
        x = torch.tensor(source(50), dtype=torch.float32)
        out = layer(x)

        train_rows = np.concatenate([b.double().numpy() for b in batches(rows, 64)])
        mu, values, vectors, k = ref_pca(train_rows, centering, 0.99)
        assert k == 3 and ref_idim(values, 0.99) != ref_idim(values, 0.5)  # the data leave no doubt about k
        assert layer.in_dim == 3 and layer.fs_dim == 10 and layer.sat == pytest.approx(30.0)
        assert layer.pca_computed
        np.testing.assert_allclose(layer.mean.numpy(), train_rows.mean(0), rtol=0, atol=1e-5)
        np.testing.assert_allclose(layer.eigenvalues.numpy(), values, rtol=0, atol=1e-4 * values[0])
        basis = align_signs(vectors[:, :k], layer.components.numpy())
        expected = ref_project(x.double().numpy(), mu, basis, keepdim)
        assert out.dtype == torch.float32 and out.shape == (50, 10 if keepdim else 3)
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=2e-4)
        if not keepdim:  # scores come in descending eigenvalue order
            spread = out.double().numpy().var(0)
            assert spread[0] > spread[1] > spread[2]


def test_linear_keeps_the_training_mean_when_centering():
    rng = np.random.default_rng(1)
    source = LowRank(rng, 6, [3.0, 1.0], mean_out=50.0)  # the mean lies far off the subspace
    rows = source(200)
    layer = LinearPCALayer(6)
    train_phase(layer, batches(rows, 50, torch.float64))
    x = torch.tensor(source(20), dtype=torch.float64)
    mu, _, vectors, k = ref_pca(rows, True, 0.99)
    assert k == 2
    expected = ref_project(x.numpy(), mu, vectors[:, :k], True)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=0, atol=1e-9)
    # Every output lies in the affine subspace through the training mean.
    out = layer(x).numpy() - mu
    np.testing.assert_allclose(out - out @ vectors[:, :k] @ vectors[:, :k].T, 0, atol=1e-9)


def test_accumulation_window_rule():
    rng = np.random.default_rng(2)
    source = LowRank(rng, 8, [4.0, 2.0, 1.0, 0.5], noise=0.1)
    parts = [source(64) for _ in range(4)]
    layer = LinearPCALayer(8, threshold=0.9, keepdim=True)
    x = torch.tensor(source(16))

    layer.train()
    layer(torch.tensor(parts[0]))
    layer(torch.tensor(parts[1]))
    first_k = layer.in_dim  # reading in_dim fits on what was seen, the window stays open
    mu, values, _, k = ref_pca(np.concatenate(parts[:2]), True, 0.9)
    assert first_k == k
    np.testing.assert_allclose(layer.eigenvalues.numpy(), values, rtol=1e-10, atol=1e-12)
    layer(torch.tensor(parts[2]))  # still the same phase: no eval pass in between
    layer.eval()
    out = layer(x)
    mu, _, vectors, k = ref_pca(np.concatenate(parts[:3]), True, 0.9)
    np.testing.assert_allclose(out.numpy(), ref_project(x.numpy(), mu, vectors[:, :k], True), atol=1e-9)
    assert layer.sample_count.item() == 192

    assert torch.equal(layer(x), out)  # more eval passes: same projection
    layer.train()
    layer(torch.tensor(parts[3]))  # first training pass after eval opens a new window
    layer.eval()
    mu, _, vectors, k = ref_pca(parts[3], True, 0.9)
    np.testing.assert_allclose(layer(x).numpy(), ref_project(x.numpy(), mu, vectors[:, :k], True), atol=1e-9)
    assert layer.sample_count.item() == 64


def test_eval_before_any_training_is_the_identity(caplog):
    layer = LinearPCALayer(5).eval()
    x = torch.randn(3, 5)
    with caplog.at_level(logging.WARNING, logger="delve.pca_layers"):
        assert torch.equal(layer(x), x)
        layer(x)
    assert sum("no training data" in r.message for r in caplog.records) == 1
    assert layer.in_dim is None and layer.sat is None and not layer.pca_computed


def test_threshold_change_recomputes_the_projection():
    rng = np.random.default_rng(3)
    variances = np.array([40, 20, 10, 5, 2.5, 1.2, 0.2, 0.1])
    source = LowRank(rng, 8, np.sqrt(variances), mean_in_span=tuple(rng.standard_normal(8)), noise=0)
    rows = source(800)
    layer = LinearPCALayer(8, threshold=0.4)
    train_phase(layer, batches(rows, 100))
    x = torch.tensor(source(30), dtype=torch.float32)
    train_rows = np.concatenate([b.double().numpy() for b in batches(rows, 100)])

    seen = []
    for thresh in (0.4, 0.8, 0.97, 1.0):
        layer.threshold = thresh
        mu, _, vectors, k = ref_pca(train_rows, True, thresh)
        seen.append(k)
        assert layer.threshold == thresh and layer.in_dim == k
        np.testing.assert_allclose(
            layer(x).double().numpy(), ref_project(x.numpy(), mu, vectors[:, :k], True), rtol=0, atol=2e-4
        )
    assert seen == sorted(seen) and len(set(seen)) == 4 and seen[-1] == 8
    np.testing.assert_allclose(layer(x).numpy(), x.numpy(), atol=1e-4)  # the full space changes nothing


def test_centering_change_recomputes_the_eigenspace():
    rng = np.random.default_rng(4)
    source = LowRank(rng, 7, [3.0, 2.0, 1.0], mean_out=4.0)
    rows = source(400)
    x = torch.tensor(source(25))
    layer = LinearPCALayer(7, threshold=0.995, keepdim=True, centering=True)
    train_phase(layer, batches(rows, 80, torch.float64))
    outputs = {}
    for centering in (True, False, True):
        layer.centering = centering
        mu, values, vectors, k = ref_pca(rows, centering, 0.995)
        assert layer.centering is centering and layer.in_dim == k
        np.testing.assert_allclose(layer.eigenvalues.numpy(), values, rtol=0, atol=1e-9 * values[0])
        outputs[centering] = layer(x).numpy()
        np.testing.assert_allclose(outputs[centering], ref_project(x.numpy(), mu, vectors[:, :k], True), atol=1e-8)
    # Uncentred, the mean off the subspace is one more direction of the second moment.
    assert ref_pca(rows, False, 0.995)[3] == 4 and ref_pca(rows, True, 0.995)[3] == 3


def test_linear_layer_on_sequences_uses_every_position():
    rng = np.random.default_rng(5)
    source = LowRank(rng, 9, [2.0, 1.0])
    rows = source(6 * 7)
    layer = LinearPCALayer(9, keepdim=False)
    layer(torch.tensor(rows).reshape(6, 7, 9))
    layer.eval()
    x = torch.tensor(source(8)).reshape(2, 4, 9)
    out = layer(x)
    mu, _, vectors, k = ref_pca(rows, True, 0.99)
    basis = align_signs(vectors[:, :k], layer.components.numpy())
    assert out.shape == (2, 4, 2)
    np.testing.assert_allclose(
        out.reshape(8, 2).numpy(), ref_project(x.reshape(8, 9).numpy(), mu, basis, False), atol=1e-9
    )


def test_non_finite_training_batches_are_left_out(caplog):
    rng = np.random.default_rng(6)
    rows = LowRank(rng, 6, [2.0, 1.0])(128)
    bad = torch.tensor(rows[:10]).clone()
    bad[3, 2] = float("nan")
    layer = LinearPCALayer(6)
    layer(torch.tensor(rows[:64]))
    layer(bad)
    layer(torch.tensor(rows[64:]))
    layer.eval()
    x = torch.tensor(rows[:5])
    with caplog.at_level(logging.WARNING, logger="delve.pca_layers"):
        out = layer(x)
    mu, _, vectors, k = ref_pca(rows, True, 0.99)
    np.testing.assert_allclose(out.numpy(), ref_project(x.numpy(), mu, vectors[:, :k], True), atol=1e-9)
    assert any("NaN/Inf" in r.message for r in caplog.records)


def test_gradients_flow_to_the_input_and_the_layer_has_no_parameters():
    rng = np.random.default_rng(7)
    rows = LowRank(rng, 5, [2.0, 1.0])(100)
    layer = LinearPCALayer(5)
    assert list(layer.parameters()) == []
    x = torch.tensor(rows[:4], requires_grad=True)
    layer(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 1.0)  # identity while training
    layer(torch.tensor(rows))
    layer.eval()
    x = torch.tensor(rows[:4], requires_grad=True)
    layer(x).sum().backward()
    # The four rows of the training-mode pass were recorded too.
    _, _, vectors, k = ref_pca(np.concatenate([rows[:4], rows]), True, 0.99)
    projection = vectors[:, :k] @ vectors[:, :k].T
    np.testing.assert_allclose(x.grad.numpy(), np.tile(projection.sum(1), (4, 1)), atol=1e-9)


def test_checkpoint_recomputation_is_not_recorded_again():
    # Inside a checkpointed segment the layer's forward runs a second time during
    # backward; the fit must rest on the rows of the forward passes only, once each.
    from torch.utils.checkpoint import checkpoint

    rng = np.random.default_rng(8)
    rows = LowRank(rng, 6, [3.0, 1.0])(120)
    layer = LinearPCALayer(6)
    layer.train()
    for batch in batches(rows, 40):
        x = batch.clone().requires_grad_(True)
        # pow saves its input for backward, so the segment (the layer with it) is recomputed.
        checkpoint(lambda t: layer(t).pow(2), x, use_reentrant=False).sum().backward()
    layer.eval()
    layer(torch.zeros(1, 6))  # the first evaluation pass fits
    assert int(layer.sample_count) == 120
    mu, values, _, _ = ref_pca(np.concatenate([b.double().numpy() for b in batches(rows, 40)]), True, 0.99)
    np.testing.assert_allclose(layer.mean.numpy(), mu, rtol=0, atol=1e-5)
    np.testing.assert_allclose(layer.eigenvalues.numpy(), values, rtol=0, atol=1e-4 * values[0])


# ------------------------------------------------------------- Conv2DPCALayer


@pytest.mark.parametrize("centering", [True, False])
@pytest.mark.parametrize("keepdim", [True, False])
def test_conv_projection_matches_channelwise_reference(centering, keepdim):
    rng = np.random.default_rng(8)
    b, c, h, w = 4, 8, 5, 6
    layer = Conv2DPCALayer(c, threshold=0.99, centering=centering, verbose=False, keepdim=keepdim)
    source = LowRank(rng, c, [4.0, 2.0, 1.5])
    data = [torch.tensor(to_images(source(b * h * w), b, h, w), dtype=torch.float32) for _ in range(3)]
    train_phase(layer, data)
    x = torch.tensor(to_images(source(2 * h * w), 2, h, w), dtype=torch.float32)
    out = layer(x)

    train_rows = np.concatenate([as_rows(t) for t in data])
    mu, _, vectors, k = ref_pca(train_rows, centering, 0.99)
    assert k == 3 and layer.in_dim == 3 and layer.fs_dim == c and layer.sat == pytest.approx(37.5)
    basis = align_signs(vectors[:, :k], layer.components.numpy())
    expected = to_images(ref_project(as_rows(x), mu, basis, keepdim), 2, h, w)
    assert out.shape == (2, c if keepdim else k, h, w) and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=2e-4)
    # The layer's 1×1 convolution is the projection.
    weight = layer.weight.numpy()[:, :, 0, 0]
    np.testing.assert_allclose(weight, (basis @ basis.T if keepdim else basis.T), atol=1e-6)


def test_conv_downsampling_samples_the_feature_map_before_recording():
    rng = np.random.default_rng(9)
    b, c, h, w = 3, 6, 8, 8
    even = to_images(LowRank(rng, c, [3.0, 2.0])(b * h * w), b, h, w)
    odd = to_images(LowRank(rng, c, [3.0, 2.0, 2.0, 1.0])(b * h * w), b, h, w)
    images = even.copy()
    images[:, :, 1::2, :] = odd[:, :, 1::2, :]  # odd rows carry two more directions
    images[:, :, :, 1::2] = odd[:, :, :, 1::2]
    data = torch.tensor(images)
    layer = Conv2DPCALayer(c, downsampling=4, centering=True, verbose=False)
    train_phase(layer, [data])

    # Nearest resizing 8 -> 4 keeps the even rows and columns.
    sampled = as_rows(data[:, :, ::2, ::2])
    mu, _, vectors, k = ref_pca(sampled, True, 0.99)
    assert k == 2 and ref_pca(as_rows(data), True, 0.99)[3] > 2
    assert layer.in_dim == 2
    x = data[:1]  # the projection itself works on the full map
    expected = to_images(ref_project(as_rows(x), mu, vectors[:, :k], True), 1, h, w)
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-9)


# ------------------------------------------------------ whole-network functions


class TwoPCANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = LinearPCALayer(10)
        self.conv = Conv2DPCALayer(8, centering=True, verbose=False)

    def forward(self, x, images):
        return self.lin(x), self.conv(images)


def fitted_two_pca_net(rng):
    net = TwoPCANet()
    sources = LowRank(rng, 10, [5.0, 3.0, 2.0]), LowRank(rng, 8, [4.0, 2.0, 1.5])
    rows, pixels = sources[0](256), sources[1](4 * 25)
    net.train()
    net(torch.tensor(rows), torch.tensor(to_images(pixels, 4, 5, 5)))
    net.eval()
    return net, rows, pixels, sources


def test_change_all_thresholds_and_centering_report_every_layer():
    rng = np.random.default_rng(10)
    net, rows, pixels, _ = fitted_two_pca_net(rng)
    sat, in_dims, fs_dims, names = change_all_pca_layer_thresholds(0.5, net)
    expected = [ref_pca(rows, True, 0.5)[3], ref_pca(pixels, True, 0.5)[3]]
    assert names == ["lin", "conv"] and fs_dims == [10, 8] and in_dims == expected
    assert sat == pytest.approx([100 * expected[0] / 10, 100 * expected[1] / 8])
    assert net.lin.threshold == net.conv.threshold == 0.5

    sat, in_dims, fs_dims, names = change_all_pca_layer_centering(False, net, downsampling=3)
    expected = [ref_pca(rows, False, 0.5)[3], ref_pca(pixels, False, 0.5)[3]]
    assert in_dims == expected and not net.lin.centering and not net.conv.centering
    assert net.conv.downsampling == 3


def test_random_directions_replace_both_projections():
    rng = np.random.default_rng(11)
    net, rows, pixels, sources = fitted_two_pca_net(rng)
    x = torch.tensor(sources[0](20))
    images = torch.tensor(to_images(sources[1](25), 1, 5, 5))
    before = [t.clone() for t in net(x, images)]
    old = [net.lin.projection.clone(), net.conv.weight.clone()]

    np.random.seed(0)
    sat, in_dims, fs_dims, names = change_all_pca_layer_thresholds_and_inject_random_directions(
        0.99, net, include_names=True
    )
    assert in_dims == [3, 3] and fs_dims == [10, 8] and names == ["lin", "conv"]
    assert sat == pytest.approx([30.0, 37.5])
    after = net(x, images)
    for layer, data, inputs, out, prev, old_p in zip(
        (net.lin, net.conv), (rows, pixels), (x.numpy(), as_rows(images)), after, before, old
    ):
        basis = layer.components.numpy()
        k = basis.shape[1]
        p = layer.projection.numpy()
        assert layer.random_directions.item() and layer.in_dim == k
        np.testing.assert_allclose(basis.T @ basis, np.eye(k), atol=1e-12)  # orthonormal directions
        np.testing.assert_allclose(p, basis @ basis.T, atol=1e-12)
        np.testing.assert_allclose(p @ p, p, atol=1e-12)  # still a projection ...
        assert np.linalg.matrix_rank(p, tol=1e-8) == k  # ... of the same rank
        assert np.abs(p - old_p.reshape(p.shape).numpy()).max() > 0.05  # onto another subspace
        assert (out - prev).abs().max() > 0.05
        mu = data.mean(0)
        expected = ref_project(inputs, mu, basis, True)
        if layer is net.conv:
            # The convolution's weight was replaced, not only a side copy of the projection.
            np.testing.assert_allclose(layer.weight.numpy()[:, :, 0, 0], p, atol=0)
            expected = to_images(expected, 1, 5, 5)
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-9)

    assert len(change_all_pca_layer_thresholds_and_inject_random_directions(0.99, net)) == 3
    # A new threshold goes back to the eigenvectors.
    change_all_pca_layer_thresholds(0.99, net)
    np.testing.assert_allclose(net.lin.projection.numpy(), old[0].numpy(), atol=1e-12)
    assert not net.lin.random_directions.item()


# ---------------------------------------------------------------- state


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("inject", [False, True])
def test_state_dict_restores_a_fitted_layer_without_data(inject):
    rng = np.random.default_rng(12)
    source = LowRank(rng, 10, [5.0, 3.0, 2.0, 1.0])
    rows = source(200)
    x = torch.tensor(source(10), dtype=torch.float32)
    layer = LinearPCALayer(10, threshold=0.9, keepdim=False)
    train_phase(layer, batches(rows, 50))
    layer.centering = False
    if inject:
        layer.inject_random_directions(random_state=3)
    expected = layer(x)
    if not inject:  # the uncentred eigenspace of the training rows, by the numpy reference
        train_rows = np.concatenate([b.double().numpy() for b in batches(rows, 50)])
        _, _, vectors, k = ref_pca(train_rows, False, 0.9)
        assert layer.in_dim == k
        basis = align_signs(vectors[:, :k], layer.components.numpy())
        np.testing.assert_allclose(expected.double().numpy(), ref_project(x.numpy(), 0.0, basis, False), atol=2e-4)

    fresh = LinearPCALayer(10, keepdim=False)  # default threshold and centering, never trained
    fresh.load_state_dict(roundtrip(layer.state_dict()))
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    assert fresh.threshold == 0.9 and fresh.centering is False and fresh.in_dim == layer.in_dim
    assert fresh.random_directions.item() is inject
    for name, value in layer.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(fresh.state_dict()[name], value), name

    # Loaded with the other keepdim: the same subspace, in the input space.
    other = LinearPCALayer(10, keepdim=True)
    other.load_state_dict(roundtrip(layer.state_dict()))
    basis = layer.components.numpy()
    ref = ref_project(x.numpy(), np.zeros(10), basis, True)
    np.testing.assert_allclose(other.eval()(x).numpy(), ref, atol=1e-5)


def test_conv_state_dict_and_deepcopy_restore_the_layer():
    rng = np.random.default_rng(13)
    pixels = LowRank(rng, 6, [3.0, 1.0])(3 * 16)
    data = torch.tensor(to_images(pixels, 3, 4, 4), dtype=torch.float32)
    layer = Conv2DPCALayer(6, threshold=0.95, verbose=False)
    train_phase(layer, [data])
    layer.inject_random_directions(random_state=0)
    expected = layer(data)
    fresh = Conv2DPCALayer(6, verbose=False)
    fresh.load_state_dict(roundtrip(layer.state_dict()))
    assert torch.equal(fresh.eval()(data), expected)

    # A copy taken mid-phase carries the data seen so far.
    pending = Conv2DPCALayer(6, verbose=False)
    pending(data[:2])
    clone = copy.deepcopy(pending)
    pending(data[2:])
    clone(data[2:])
    out = clone.eval()(data)
    assert torch.equal(out, pending.eval()(data))
    _, _, vectors, k = ref_pca(as_rows(data), False, 0.99)
    assert clone.in_dim == k
    expected = to_images(ref_project(as_rows(data), 0.0, vectors[:, :k], True), 3, 4, 4)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=2e-4)


# ----------------------------------------------------------------------- rvs


@pytest.mark.parametrize("dim", [1, 2, 3, 5, 16])
def test_rvs_is_a_rotation(dim):
    for seed in range(10):
        q = rvs(dim, random_state=seed)
        assert q.shape == (dim, dim) and q.dtype == np.float64
        np.testing.assert_allclose(q.T @ q, np.eye(dim), atol=1e-12)
        assert np.linalg.det(q) == pytest.approx(1.0, abs=1e-10)


def test_rvs_is_random_reproducible_and_uniform():
    assert rvs().shape == (3, 3)
    assert np.array_equal(rvs(4, random_state=7), rvs(4, random_state=7))
    assert not np.allclose(rvs(4, random_state=7), rvs(4, random_state=8))
    np.random.seed(5)
    first = rvs(4)
    np.random.seed(5)
    assert np.array_equal(rvs(4), first)
    # Uniform on the rotations: every entry has mean 0 and mean square 1/dim.
    generator = np.random.default_rng(0)
    draws = np.stack([rvs(3, random_state=generator) for _ in range(3000)])
    np.testing.assert_allclose(draws.mean(0), 0, atol=0.05)
    np.testing.assert_allclose((draws**2).mean(0), 1 / 3, atol=0.03)


@pytest.mark.parametrize("dim", [0, -2, 2.5, True, "3"])
def test_rvs_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        rvs(dim)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_input_dtype_is_kept(dtype, kind):
    rng = np.random.default_rng(14)
    rows = LowRank(rng, 6, [4.0, 2.0])(4 * 36)
    if kind == "linear":
        layer = LinearPCALayer(6)
        data = torch.tensor(rows, dtype=dtype)
        x = data[:12]
    else:
        layer = Conv2DPCALayer(6, centering=True, verbose=False)
        data = torch.tensor(to_images(rows, 4, 6, 6), dtype=dtype)
        x = data[:1]
    if dtype == torch.float64:
        layer.double()
    train_phase(layer, [data])
    out = layer(x)
    assert out.dtype == dtype

    train_rows = data.double().numpy() if kind == "linear" else as_rows(data)
    mu, _, vectors, k = ref_pca(train_rows, True, 0.99)
    x_rows = x.double().numpy() if kind == "linear" else as_rows(x)
    expected = ref_project(x_rows, mu, vectors[:, :k], True)
    got = out.double().numpy() if kind == "linear" else as_rows(out)
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-10}[dtype]
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)


def test_autocast_model_output_keeps_the_activation_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), LinearPCALayer(8, threshold=0.9))
    seen = {"train": [], "eval": []}
    model[0].register_forward_hook(lambda m, i, o: seen["train" if m.training else "eval"].append(o.detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            model(torch.randn(64, 3) @ torch.randn(3, 5))
        model.eval()
        out = model(torch.randn(4, 5))
    assert seen["eval"][0].dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    mu, _, vectors, k = ref_pca(torch.cat(seen["train"]).double().numpy(), True, 0.9)
    assert model[1].in_dim == k
    expected = ref_project(seen["eval"][0].double().numpy(), mu, vectors[:, :k], True)
    np.testing.assert_allclose(out.detach().double().numpy(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_layer_matches_reference():
    rng = np.random.default_rng(15)
    rows = LowRank(rng, 10, [5.0, 3.0, 2.0])(256)
    layer = LinearPCALayer(10).cuda()
    train_phase(layer, [t.cuda() for t in batches(rows, 64)])
    x = torch.tensor(rows[:8], dtype=torch.float32)
    out = layer(x.cuda())
    assert out.device.type == "cuda" and layer.projection.device.type == "cuda"
    train_rows = np.concatenate([b.double().numpy() for b in batches(rows, 64)])
    mu, _, vectors, k = ref_pca(train_rows, True, 0.99)
    np.testing.assert_allclose(out.double().cpu().numpy(), ref_project(x.numpy(), mu, vectors[:, :k], True), atol=2e-4)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LinearPCALayer(0), "feature size must be an integer >= 1, got 0"),
        (lambda: LinearPCALayer(4, threshold=0), r"threshold must lie in \(0, 1\], got 0"),
        (lambda: LinearPCALayer(4, threshold=1.5), r"threshold must lie in \(0, 1\], got 1.5"),
        (lambda: LinearPCALayer(4, threshold=True), "threshold must be a number in"),
        (lambda: LinearPCALayer(4, keepdim="yes"), "keepdim must be True or False, got 'yes'"),
        (lambda: LinearPCALayer(4, centering=None), "centering must be True or False, got None"),
        (lambda: Conv2DPCALayer(4, downsampling=0), "downsampling must be an integer >= 1 or None, got 0"),
        (lambda: Conv2DPCALayer(2.0), "feature size must be an integer >= 1, got 2.0"),
    ],
)
def test_bad_construction_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_settings_and_inputs_raise_clearly():
    layer = LinearPCALayer(4)
    with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\], got -0.1"):
        layer.threshold = -0.1
    with pytest.raises(ValueError, match="centering must be True or False"):
        layer.centering = 1
    with pytest.raises(ValueError, match=r"last axis has 4 features, got shape \(2, 5\)"):
        layer(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\)"):
        Conv2DPCALayer(3, verbose=False)(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\], got 2"):
        change_all_pca_layer_thresholds(2, nn.Sequential(layer))
    with pytest.raises(ValueError, match="'nonsense' is not a torch device"):
        change_all_pca_layer_thresholds_and_inject_random_directions(0.9, nn.Sequential(layer), device="nonsense")
    with pytest.raises(TypeError, match="network must be a torch.nn.Module"):
        change_all_pca_layer_centering(True, [layer])


# --------------------------------------------------------------- tracker


def test_tracker_on_a_model_with_a_pca_layer_matches_numpy(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(16)
    model = nn.Sequential(nn.Linear(6, 10), LinearPCALayer(10, threshold=0.9), nn.Linear(10, 4))
    capture = OutputCapture({name: model.get_submodule(name) for name in ("0", "1", "2")})
    savefile = str(tmp_path / "run")
    tracker = CheckLayerSat(savefile, "csv", model, stats=["lsat", "idim", "trc"], sat_threshold=0.99)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    source = LowRank(rng, 6, [3.0, 2.0, 1.0, 0.5, 0.2])
    expected = []
    for _epoch in range(2):
        capture.clear()
        model.train()
        for _ in range(3):
            x = torch.tensor(source(32), dtype=torch.float32)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for _ in range(2):
                model(torch.tensor(source(32), dtype=torch.float32))
        tracker.add_saturations()

        # The PCA layer projected the eval data on the eigenspace of this epoch's training data.
        captured = {key: np.concatenate(arrays) for key, arrays in capture.outputs.items()}
        mu, _, vectors, k = ref_pca(captured[("0", "train")], True, 0.9)
        assert model[1].in_dim == k < 6
        projected = ref_project(captured[("0", "eval")], mu, vectors[:, :k], True)
        np.testing.assert_allclose(captured[("1", "eval")], projected, atol=1e-4)

        row = {}
        for mode in ("train", "eval"):
            for name in ("0", "2"):
                ref = np_stats(captured[(name, mode)], 0.99)
                row[f"{mode}-saturation_{name}"] = ref["lsat"]
                row[f"{mode}-intrinsic-dimensionality_{name}"] = ref["idim"]
                row[f"{mode}-covariance-trace_{name}"] = ref["trc"]
        expected.append(row)
        # After the PCA layer, eval data has at most k directions.
        assert row["eval-intrinsic-dimensionality_2"] <= k
    tracker.close()
    capture.remove()

    table = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1]
    assert set(table.columns) == set(expected[0])  # the PCA layer itself is not a tracked layer
    for epoch, row in enumerate(expected):
        for key, value in row.items():
            if "trace" in key:
                assert table.loc[epoch, key] == pytest.approx(value, rel=1e-6)
            else:
                assert table.loc[epoch, key] == value, key
