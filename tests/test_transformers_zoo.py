"""Hugging Face models as people train them, tiny and randomly initialised (nothing is downloaded).

Every projection (``nn.Linear`` and GPT-2's ``Conv1D``) must be tracked under its module
path, and one padded batch per model must give, for every tracked layer, the covariance
numpy computes from the outputs the test captured itself, on the real tokens only.
"""

import logging
import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTModel,
)
from transformers.pytorch_utils import Conv1D

from delve import CheckLayerSat
from delve.layers import layer_type
from tests.reference import OutputCapture, np_cov, rel_err

TOL = 1e-6
VOCAB, BATCH, STEPS = 64, 3, 6
PROJECTIONS = (nn.Linear, Conv1D)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared machine: more threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4))


def bert():
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    return BertModel(config)


def t5():
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    return T5ForConditionalGeneration(config)


def llama():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def vit():
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48,
    )
    return ViTModel(config)


def padding_mask(lengths, side="right", steps=STEPS):
    positions = torch.arange(steps).unsqueeze(0)
    lengths = torch.tensor(lengths).unsqueeze(1)
    return (positions < lengths if side == "right" else positions >= steps - lengths).to(torch.int64)


def token_batch(generator, mask):
    return {"input_ids": torch.randint(1, VOCAB, tuple(mask.shape), generator=generator), "attention_mask": mask}


def projection_names(model):
    """Every nn.Linear / Conv1D of the model, named by its path, counted by the test itself."""
    return [path.replace(".", "-") for path, module in model.named_modules() if isinstance(module, PROJECTIONS)]


def expected_rows(out, mask, method="timestepwise"):
    """The rows of one captured output in numpy: real positions of (B, T, F) outputs, the rest as they are."""
    out = np.asarray(out, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if out.ndim == 2 or mask is None or out.shape[:2] != mask.shape:
        return out.reshape(-1, out.shape[-1]) if method == "timestepwise" or out.ndim == 2 else out[:, -1]
    if method == "timestepwise":
        return out[mask]
    return np.stack([out[i, np.flatnonzero(mask[i])[-1]] for i in range(len(mask)) if mask[i].any()])


ZOO = {
    "gpt2": (gpt2, 4 * 2 + 1),  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block, and lm_head
    "bert": (bert, 6 * 2 + 1),  # query, key, value, attention output, intermediate, output; the pooler
    "t5": (t5, 6 * 2 + 10 * 2 + 1),  # encoder blocks: q k v o wi wo; decoder blocks add the cross q k v o
    "llama": (llama, 7 * 2 + 1),  # q k v o, gate up down, and lm_head
    "vit": (vit, 6 * 2 + 1),  # q k v o, fc1 fc2 per block, and the pooler
}


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_every_projection_is_tracked_and_measured_on_the_real_tokens(kind):
    factory, count = ZOO[kind]
    torch.manual_seed(0)
    model = factory().eval()
    projections = projection_names(model)
    assert len(projections) == count
    tracker = CheckLayerSat("unused", "csv", model, stats=["cov"], nosave=True, timeseries_method="timestepwise")
    tracked = list(tracker.layers)
    # ViT's patch embedding is a Conv2d, tracked as a convolution; nothing else is extra.
    assert [name for name in tracked if name in projections] == projections
    assert set(tracked) - set(projections) <= {"embeddings-patch_embeddings-projection"}
    capture = OutputCapture(dict(tracker.layers))
    generator = torch.Generator().manual_seed(1)
    if kind == "vit":
        mask = None
        inputs = {"pixel_values": torch.randn(4, 3, 16, 16, generator=generator)}
    else:
        mask = padding_mask([6, 2, 4])
        inputs = token_batch(generator, mask)
        if kind == "t5":  # a decoder input of its own length: the encoder's mask does not concern it
            inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (BATCH, 4), generator=generator)
    with torch.no_grad(), tracker.row_mask(mask):
        model(**inputs)
    values = tracker.add_saturations()
    tracker.close()
    capture.remove()
    masked = 0
    for name in projections:
        (out,) = capture.take(name, "eval")
        rows = expected_rows(out, mask)
        masked += len(rows) < out.size // out.shape[-1]
        assert rel_err(values[f"eval-covariance-matrix_{name}"], np_cov(rows)) < TOL, name
    if mask is not None:
        assert masked >= 6  # the test is about padding: many layers did lose rows to it


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["timestepwise", "last_timestep"])
def test_gpt2_block_projections_under_a_row_mask(method, side):
    torch.manual_seed(2)
    model = gpt2()
    tracker = CheckLayerSat("unused", "csv", model, stats=["cov"], nosave=True, timeseries_method=method)
    blocks = [f"transformer-h-{i}-{part}" for i in range(2) for part in ("attn-c_attn", "attn-c_proj", "mlp-c_fc",
                                                                          "mlp-c_proj")]
    assert list(tracker.layers) == blocks + ["lm_head"]
    assert all(isinstance(tracker.layers[name], Conv1D) for name in blocks)
    capture = OutputCapture({"c_fc": model.transformer.h[1].mlp.c_fc})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    masks = [padding_mask([6, 1, 3], side), padding_mask([4, 5, 2], side)]
    for mask in masks:  # training steps: dropout on, weights moving
        batch = token_batch(generator, mask)
        with tracker.row_mask(batch["attention_mask"]):
            loss = model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    values = tracker.add_saturations()
    tracker.close()
    rows = np.concatenate([expected_rows(out, mask, method) for out, mask in zip(capture.take("c_fc", "train"), masks)])
    assert len(rows) == (sum(int(m.sum()) for m in masks) if method == "timestepwise" else 2 * BATCH)
    assert rel_err(values["train-covariance-matrix_transformer-h-1-mlp-c_fc"], np_cov(rows)) < TOL


def test_a_subclass_of_conv1d_is_covered_by_its_declaration():
    class Scaled(Conv1D):
        pass

    assert layer_type(Scaled(5, 3)) is layer_type(Conv1D(5, 3)) is not None
    tracker = CheckLayerSat("unused", "csv", nn.Sequential(Scaled(5, 3)), nosave=True)
    assert list(tracker.layers) == ["0"]
    tracker.close()


class MyProj(nn.Module):
    """A projection of a type nobody declared."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.weight


def test_construction_names_what_is_left_out(caplog):
    model = gpt2()
    model.add_module("adapters", nn.ModuleList([MyProj() for _ in range(3)]))
    tracked_types = (nn.Linear, Conv1D)
    # The test's own count: modules holding weights of their own that are no projection.
    expected = Counter(
        ("nn." if type(m).__module__.startswith("torch.nn.") else "") + type(m).__name__
        for m in model.modules()
        if list(m.parameters(recurse=False)) and not isinstance(m, tracked_types)
    )
    assert expected == {"nn.LayerNorm": 5, "nn.Embedding": 2, "MyProj": 3}
    with caplog.at_level(logging.INFO, logger="delve"):
        tracker = CheckLayerSat("unused", "csv", model, nosave=True)
    tracker.close()
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("tracking 9 layer(s); modules with weights left out: ")
    counts = dict(re.findall(r"([\w.]+) ×(\d+)", lines[0]))
    assert {name: int(n) for name, n in counts.items()} == expected
