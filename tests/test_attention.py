"""nn.MultiheadAttention as a tracked layer, checked against numpy on the attention outputs the test captured.

The test's own forward hook on each attention module keeps the first element of its
result (what its ``out_proj`` computed) and the key padding mask of the call; the
expected rows are picked from them with numpy (every real position for
``timestepwise``, each sequence's last real one for ``last_timestep``).
"""

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from delve import CheckLayerSat
from delve.activations import RowOptions
from delve.layers import feature_width
from tests.reference import np_cov, rel_err

TOL = 1e-6
D_MODEL, HEADS, BATCH, STEPS = 16, 4, 5, 6
LENGTHS = [6, 2, 4, 5, 3]


def key_padding(lengths=LENGTHS, steps=STEPS):
    """(B, T) bool, True at padding (PyTorch's convention), the real positions first."""
    return torch.arange(steps).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)


def real_rows(out, real, method):
    """The expected rows of a batch-first output under a (B, T) mask of real positions, in numpy."""
    out = np.asarray(out, dtype=np.float64)
    real = np.asarray(real, dtype=bool)
    if method == "timestepwise":
        return out[real]
    return np.stack([out[i, np.flatnonzero(real[i])[-1]] for i in range(len(real)) if real[i].any()])


class AttentionCapture:
    """Our own hooks on attention modules: the attention output, batch first, in float64."""

    def __init__(self, modules):
        self.outputs = {name: [] for name in modules}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            out = output[0].detach()
            if out.is_nested:  # nn.TransformerEncoder dropped the padding itself
                out = out.to_padded_tensor(0.0)
            elif not module.batch_first:
                out = out.transpose(0, 1)
            self.outputs[name].append(out.double().numpy())

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def encoder(batch_first, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def sequences(generator, batch_first, steps=STEPS):
    x = 0.5 + torch.randn(BATCH, steps, D_MODEL, generator=generator) * torch.linspace(0.2, 2.0, D_MODEL)
    return x if batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("method", ["timestepwise", "last_timestep"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "key_padding_mask"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
def test_encoder_self_attention_matches_numpy(batch_first, padded, method, caplog):
    model = encoder(batch_first)
    tracker = CheckLayerSat("unused", "csv", model, stats=["cov", "lsat"], nosave=True, timeseries_method=method)
    names = ["layers-0-self_attn-out_proj", "layers-0-linear1", "layers-0-linear2"]
    assert list(tracker.layers)[:3] == names and len(tracker.layers) == 6
    attention = {f"layers-{i}-self_attn-out_proj": model.layers[i].self_attn for i in range(2)}
    capture = AttentionCapture(attention)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    mask = key_padding() if padded else None
    real = ~mask if padded else torch.ones(BATCH, STEPS, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="delve"):
        for _ in range(2):  # training steps: the weights move between the batches
            out = model(sequences(generator, batch_first), src_key_padding_mask=mask)
            optimizer.zero_grad()
            out.pow(2).mean().backward()
            optimizer.step()
        values = tracker.add_saturations()
    tracker.close()
    capture.remove()
    assert not caplog.records  # in particular, no "saw no forward pass" for out_proj
    for name, outputs in capture.outputs.items():
        rows = np.concatenate([real_rows(out, real, method) for out in outputs])
        assert rel_err(values[f"train-covariance-matrix_{name}"], np_cov(rows)) < TOL, name
    # The out_proj Linear inside is not hooked a second time: only the test's hooks were on it.
    assert all(not layer.self_attn.out_proj._forward_hooks for layer in model.layers)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("method", ["timestepwise", "last_timestep"])
def test_evaluation_under_no_grad_takes_the_fast_path_and_is_still_measured(method):
    # batch_first, an even number of heads, evaluation, no_grad and a key padding mask
    # whose padding is at the end: PyTorch's conditions for its fused paths. Without
    # hooks the layers run as one fused kernel that calls no submodule (the profiler
    # shows it); with the tracker attached the encoder still drops the padding itself
    # (its layers receive nested tensors), and every layer is measured on the real tokens.
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2).eval()
    generator = torch.Generator().manual_seed(3)
    x, mask = sequences(generator, True), key_padding()

    def fused_calls(module):
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            module(x, src_key_padding_mask=mask)
        return sum(event.count for event in prof.key_averages() if "transformer_encoder_layer_fwd" in event.key)

    assert fused_calls(copy.deepcopy(model)) == 2  # the fast path, with no hook anywhere

    tracker = CheckLayerSat("unused", "csv", model, stats=["cov"], nosave=True, timeseries_method=method)
    outputs = {}

    def keep(name):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            outputs[name] = out
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in tracker.layers.items()]
    assert fused_calls(model) == 0
    values = tracker.add_saturations()
    tracker.close()
    for handle in handles:
        handle.remove()
    assert set(outputs) == set(tracker.layers)
    for name, out in outputs.items():
        assert out.is_nested  # the padding was dropped by the encoder's own fast path
        padded = out.to_padded_tensor(0.0).double().numpy()
        rows = real_rows(padded, ~mask, method)
        assert rel_err(values[f"eval-covariance-matrix_{name}"], np_cov(rows)) < TOL, name


@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
def test_a_plain_self_attention_leaves_its_key_padding_out(mask_dtype):
    torch.manual_seed(4)
    attention = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    tracker = CheckLayerSat("unused", "csv", attention, stats=["cov"], nosave=True, timeseries_method="timestepwise")
    assert list(tracker.layers) == ["Module-0-MultiheadAttention"]
    capture = AttentionCapture({"attention": attention})
    padding = key_padding()
    # A float mask is added to the attention scores: -inf marks the padding.
    given = padding if mask_dtype == "bool" else torch.zeros(BATCH, STEPS).masked_fill(padding, float("-inf"))
    x = sequences(torch.Generator().manual_seed(5), True)
    attention(x, x, x, key_padding_mask=given, need_weights=False)
    values = tracker.add_saturations()
    tracker.close()
    rows = real_rows(capture.outputs["attention"][0], ~padding, "timestepwise")
    assert rel_err(values["train-covariance-matrix_Module-0-MultiheadAttention"], np_cov(rows)) < TOL


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
def test_cross_attention_used_directly_is_tracked(batch_first):
    # query != key: the key padding mask is about the keys, so every query position is
    # a row, unless the tracker's row mask (about the queries) says otherwise.
    torch.manual_seed(6)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.cross = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=batch_first, kdim=8, vdim=8)

        def forward(self, query, memory, memory_padding):
            return self.cross(query, memory, memory, key_padding_mask=memory_padding)[0]

    model = Decoder()
    tracker = CheckLayerSat("unused", "csv", model, stats=["cov"], nosave=True, timeseries_method="timestepwise")
    assert list(tracker.layers) == ["cross-out_proj"]
    capture = AttentionCapture({"cross": model.cross})
    generator = torch.Generator().manual_seed(7)
    memory = torch.randn(BATCH, STEPS + 3, 8, generator=generator)
    memory = memory if batch_first else memory.transpose(0, 1)
    memory_padding = key_padding([9, 4, 6, 2, 7], STEPS + 3)
    queries_real = ~key_padding([6, 6, 3, 1, 5])
    with torch.no_grad():
        model(sequences(generator, batch_first), memory, memory_padding)
        with tracker.row_mask(queries_real):
            model(sequences(generator, batch_first), memory, memory_padding)
    values = tracker.add_saturations()
    tracker.close()
    first, second = capture.outputs["cross"]
    rows = np.concatenate([first.reshape(-1, D_MODEL), real_rows(second, queries_real, "timestepwise")])
    assert rel_err(values["train-covariance-matrix_cross-out_proj"], np_cov(rows)) < TOL


def test_attention_width_is_known_at_construction():
    # The tracked layer is the attention itself, and the memory guard sees its embed_dim
    # before any batch: a too-small budget is refused at once.
    model = encoder(True)
    tracker = CheckLayerSat("unused", "csv", model, nosave=True)
    assert tracker.layers["layers-0-self_attn-out_proj"] is model.layers[0].self_attn
    assert feature_width(model.layers[0].self_attn, RowOptions()) == D_MODEL
    tracker.close()
    with pytest.raises(MemoryError, match=r"layer 'layers-0-self_attn-out_proj' has 16 features"):
        CheckLayerSat("unused", "csv", model, nosave=True, layer_filter=lambda layers: {
            name: layer for name, layer in layers.items() if "self_attn" in name
        }, max_accumulator_bytes=100)
