import numpy as np
import pytest
import torch

from delve import TorchCovarianceMatrix, covariance
from delve.torch_utils import TorchCovarianceMatrix as FromTorchUtils
from tests.reference import np_cov, rel_err


def batches(rows, sizes):
    start = 0
    for size in sizes:
        yield rows[start : start + size]
        start += size


@pytest.mark.parametrize("float64_products", [False, True])
def test_epoch_covariance_over_uneven_batches(float64_products):
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((1000, 12)) @ rng.standard_normal((12, 12))).astype(np.float32)
    acc = TorchCovarianceMatrix(float64_products=float64_products)
    for part in batches(rows, [1, 7, 300, 2, 690]):
        acc.update(torch.from_numpy(part))
    assert acc.count == 1000
    assert acc.fix().dtype == torch.float64
    assert rel_err(acc.fix().numpy(), np_cov(rows)) < 1e-6
    np.testing.assert_allclose(acc.mean.numpy(), rows.astype(np.float64).mean(0), atol=1e-6 * rows.std())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_mean_keeps_its_digits(dtype):
    # |mean| = 1e4 * std: the textbook one-pass formula loses ~8 digits here.
    rng = np.random.default_rng(1)
    rows = (1e4 + rng.standard_normal((4000, 16)) @ rng.standard_normal((16, 16)) / 4).astype(dtype)
    acc = TorchCovarianceMatrix()
    for part in np.array_split(rows, 9):
        acc.update(torch.from_numpy(part))
    assert rel_err(acc.fix().numpy(), np_cov(rows)) < 1e-6


def test_mean_drifting_between_batches():
    rng = np.random.default_rng(2)
    parts = [(rng.standard_normal((200, 5)) + shift).astype(np.float32) for shift in (-3e3, 0.0, 5e3, 1e2)]
    acc = TorchCovarianceMatrix()
    for part in parts:
        acc.update(torch.from_numpy(part))
    assert rel_err(acc.fix().numpy(), np_cov(np.concatenate(parts))) < 1e-6


def test_uncentred_second_moment():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((500, 4)) + 2.0
    acc = TorchCovarianceMatrix()
    acc.update(torch.from_numpy(rows))
    expected = rows.T @ rows / len(rows)
    assert rel_err(acc.fix(center=False).numpy(), expected) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    rows = torch.randn(600, 8, generator=torch.Generator().manual_seed(4)).to(dtype)
    acc = TorchCovarianceMatrix()
    for part in rows.split(100):
        acc.update(part)
    reference = np_cov(rows.to(torch.float64).numpy())
    assert rel_err(acc.fix().numpy(), reference) < 1e-6


def test_reset_forgets_rows_but_not_dimension():
    rng = np.random.default_rng(5)
    first, second = rng.standard_normal((100, 3)), rng.standard_normal((80, 3)) * 5
    acc = TorchCovarianceMatrix()
    acc.update(torch.from_numpy(first))
    acc.reset()
    assert acc.count == 0 and acc.dim == 3
    acc.update(torch.from_numpy(second))
    assert rel_err(acc.fix().numpy(), np_cov(second)) < 1e-10


def test_merge_equals_one_pass():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((300, 6)) + 100, rng.standard_normal((50, 6)) * 3
    left, right = TorchCovarianceMatrix(), TorchCovarianceMatrix()
    left.update(torch.from_numpy(a))
    right.update(torch.from_numpy(b))
    left.merge(right)
    assert left.count == 350
    assert rel_err(left.fix().numpy(), np_cov(np.concatenate([a, b]))) < 1e-10
    assert right.count == 50  # the merged-in accumulator is left as it was


def test_non_finite_batches_are_skipped_and_counted():
    rng = np.random.default_rng(7)
    good = [rng.standard_normal((40, 4)) for _ in range(3)]
    bad_nan, bad_inf = good[0].copy(), good[1].copy()
    bad_nan[3, 1] = np.nan
    bad_inf[0, 0] = np.inf
    acc = TorchCovarianceMatrix()
    for part in (bad_nan, good[0], bad_inf, good[1], good[2]):
        acc.update(torch.from_numpy(part))
    assert acc.skipped_batches == 2
    assert acc.count == 120
    assert rel_err(acc.fix().numpy(), np_cov(np.concatenate(good))) < 1e-10


def test_first_batch_non_finite_does_not_poison_later_ones():
    rng = np.random.default_rng(8)
    rows = rng.standard_normal((60, 3)) + 50
    acc = TorchCovarianceMatrix()
    acc.update(torch.full((10, 3), float("nan")))
    acc.update(torch.from_numpy(rows))
    assert rel_err(acc.fix().numpy(), np_cov(rows)) < 1e-9


def test_input_errors():
    acc = TorchCovarianceMatrix()
    with pytest.raises(ValueError, match="rows, features"):
        acc.update(torch.zeros(3, 4, 5))
    acc.update(torch.zeros(0, 4))  # an empty batch is a no-op
    assert acc.dim is None
    acc.update(torch.randn(5, 4))
    with pytest.raises(ValueError, match="changed from 4 to 5"):
        acc.update(torch.randn(5, 5))
    with pytest.raises(RuntimeError, match="never called"):
        TorchCovarianceMatrix().fix()


def test_state_stays_usable_after_inference_mode_and_autocast():
    acc = TorchCovarianceMatrix()
    rows = torch.randn(64, 5, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        acc.update(rows[:32])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acc.update(rows[32:])
    assert rel_err(acc.fix().numpy(), np_cov(rows.numpy())) < 1e-6


def test_explicit_device_and_legacy_import_path():
    assert FromTorchUtils is TorchCovarianceMatrix
    acc = TorchCovarianceMatrix(device="cpu")
    acc.update(torch.randn(10, 2))
    assert acc.fix().device.type == "cpu"


def test_devices_without_float64_keep_the_state_on_the_cpu():
    # Apple's MPS has no float64: an explicit request is refused when the accumulator is
    # built, and with device=None MPS activations are accumulated on the CPU.
    with pytest.raises(ValueError, match=r"'mps' has no float64 arithmetic.*'cpu'"):
        TorchCovarianceMatrix(device="mps")
    assert covariance.float64_home(torch.device("mps")) == torch.device("cpu")
    assert covariance.float64_home(torch.device("cpu")) == torch.device("cpu")
    assert covariance.float64_home(torch.device("cuda", 1)) == torch.device("cuda", 1)
