"""CheckLayerSat end to end: every recorded statistic against numpy on captured outputs."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from delve import CheckLayerSat, SaturationTracker
from delve.metrics import STATMAP
from delve.writers import AbstractWriter
from tests.reference import OutputCapture, conv_rows, np_stats

STATS = ["idim", "lsat", "trc", "dtrc", "det"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(10, 8)
        self.linear2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


def assert_matches(values, name, mode, rows, stats=STATS, thresh=0.99):
    ref = np_stats(np.concatenate(rows), thresh)
    for stat in stats:
        key = f"{mode}-{STATMAP[stat]}_{name}"
        if stat == "idim":
            assert values[key] == ref["idim"], key
        elif stat == "det":
            assert values[key] == pytest.approx(ref["det"], rel=1e-5, abs=1e-30), key
        else:
            assert values[key] == pytest.approx(ref[stat], rel=1e-6), key


def train_eval_epochs(model, tracker, capture, make_batch, epochs=3, train_batches=4, eval_batches=2, lr=0.05):
    """Run epochs with SGD steps between batches; yield (values, captured outputs) per epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for _ in range(train_batches):
            out = model(make_batch())
            out = out[0] if isinstance(out, tuple) else out
            loss = out.float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for _ in range(eval_batches):
                model(make_batch())
        model.train()
        yield tracker.add_saturations(), capture


def test_linear_layers_epoch_statistics_both_modes():
    torch.manual_seed(0)
    model = MLP()
    tracker = CheckLayerSat("unused", "csv", model, stats=STATS, nosave=True)
    capture = OutputCapture(tracker.layers)
    assert list(tracker.layers) == ["linear1", "linear2"]
    for values, cap in train_eval_epochs(model, tracker, capture, lambda: torch.randn(16, 10) * 3 + 1):
        for name in tracker.layers:
            for mode in ("train", "eval"):
                assert_matches(values, name, mode, cap.take(name, mode))
    tracker.close()


def test_reset_covariance_false_accumulates_over_epochs():
    torch.manual_seed(1)
    model = MLP()
    tracker = CheckLayerSat("unused", "csv", model, stats=["trc", "idim"], nosave=True, reset_covariance=False)
    capture = OutputCapture(tracker.layers)
    seen = []
    for values, cap in train_eval_epochs(model, tracker, capture, lambda: torch.randn(8, 10), eval_batches=0):
        seen.extend(cap.take("linear1", "train"))
        assert_matches(values, "linear1", "train", seen, stats=["trc", "idim"])


@pytest.mark.parametrize("method", ["channelwise", "mean", "max", "median", "flatten"])
def test_conv2d_methods(method):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2))
    tracker = CheckLayerSat("unused", "csv", model, stats=STATS, conv_method=method, nosave=True)
    capture = OutputCapture(tracker.layers)

    batches = lambda: torch.randn(6, 3, 7, 7)  # noqa: E731
    for values, cap in train_eval_epochs(model, tracker, capture, batches, epochs=2, train_batches=3):
        for name in ("0", "2"):
            for mode in ("train", "eval"):
                assert_matches(values, name, mode, [conv_rows(o, method) for o in cap.take(name, mode)])


def test_conv_interpolation_resizes_large_maps():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    tracker = CheckLayerSat(
        "unused", "csv", [conv], stats=["trc", "idim"], interpolation_strategy="bilinear",
        interpolation_downsampling=5, nosave=True,
    )
    rows = []
    for _ in range(3):
        out = conv(torch.randn(4, 2, 12, 12))
        small = torch.nn.functional.interpolate(out.detach(), size=(5, 5), mode="bilinear")
        rows.append(small.permute(0, 2, 3, 1).reshape(-1, 4).double().numpy())
    values = tracker.add_saturations()
    assert_matches(values, "Module-0-Conv2d", "train", rows, stats=["trc", "idim"])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["last_timestep", "timestepwise"])
def test_lstm_padded_sequences(batch_first, method):
    torch.manual_seed(4)
    lstm = nn.LSTM(4, 6, batch_first=batch_first)
    tracker = CheckLayerSat("unused", "csv", [lstm], stats=STATS, timeseries_method=method, nosave=True)
    rows = []
    for _ in range(3):
        x = torch.randn(5, 7, 4)  # (batch, time, features)
        out, _ = lstm(x if batch_first else x.transpose(0, 1))
        out = out.detach().double().numpy()
        bt = out if batch_first else out.transpose(1, 0, 2)
        rows.append(bt[:, -1] if method == "last_timestep" else bt.reshape(-1, 6))
    assert_matches(tracker.add_saturations(), "Module-0-LSTM", "train", rows)


@pytest.mark.parametrize("method", ["last_timestep", "timestepwise"])
def test_lstm_packed_sequences_use_valid_steps_only(method):
    torch.manual_seed(5)
    lstm = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
    tracker = CheckLayerSat("unused", "csv", [lstm], stats=STATS, timeseries_method=method, nosave=True)
    rows = []
    for _ in range(3):
        seqs = [torch.randn(n, 3) for n in (6, 2, 4, 5)]
        lstm(pack_sequence(seqs, enforce_sorted=False))
        with torch.no_grad():  # reference: each sequence alone, no padding at all
            for seq in seqs:
                alone = lstm(seq.unsqueeze(0))[0][0].double().numpy()
                rows.append(alone[-1:] if method == "last_timestep" else alone)
    assert_matches(tracker.add_saturations(), "Module-0-LSTM", "train", rows)


def test_log_interval_and_max_samples():
    torch.manual_seed(6)
    layer = nn.Linear(4, 4)
    tracker = CheckLayerSat("unused", "csv", layer, stats=["trc", "idim"], log_interval=2, max_samples=25,
                            nosave=True)
    for _epoch in range(2):
        batches = [torch.randn(10, 4) * (i + 1) for i in range(8)]
        outputs = [layer(b).detach().double().numpy() for b in batches]
        # passes 2, 4, 6, 8 are due; 25 samples stop after 10 + 10 + 5 (the third is cut)
        expected = [outputs[1], outputs[3], outputs[5][:5]]
        assert_matches(tracker.add_saturations(), "Module-0-Linear", "train", expected, stats=["trc", "idim"])


def test_stop_and_resume():
    layer = nn.Linear(3, 2)
    tracker = CheckLayerSat("unused", "csv", [layer], stats=["lsat", "trc", "cov", "spectrum"], nosave=True)
    tracker.stop()
    assert not tracker.is_recording()
    layer(torch.randn(8, 3))
    values = tracker.add_saturations()
    assert math.isnan(values["train-saturation_Module-0-Linear"])
    assert math.isnan(values["train-covariance-trace_Module-0-Linear"])
    assert "train-covariance-matrix_Module-0-Linear" not in values
    tracker.resume()
    assert tracker.is_recording()
    rows = [layer(torch.randn(8, 3)).detach().double().numpy()]
    assert_matches(tracker.add_saturations(), "Module-0-Linear", "train", rows, stats=["lsat", "trc"])


def test_mode_suffixed_stats_and_averages():
    torch.manual_seed(7)
    model = MLP()
    tracker = CheckLayerSat("unused", "csv", model, stats=["lsat_eval", "idim_train"], average_sat=True,
                            nosave=True)
    capture = OutputCapture(tracker.layers)
    (values, cap), = list(train_eval_epochs(model, tracker, capture, lambda: torch.randn(12, 10), epochs=1))
    assert set(values) == {
        "train-intrinsic-dimensionality_linear1", "train-intrinsic-dimensionality_linear2",
        "eval-saturation_linear1", "eval-saturation_linear2", "average-train-sat", "average-eval-sat",
    }
    train_lsat = [np_stats(np.concatenate(cap.take(n, "train")))["lsat"] for n in ("linear1", "linear2")]
    eval_lsat = [np_stats(np.concatenate(cap.take(n, "eval")))["lsat"] for n in ("linear1", "linear2")]
    assert values["average-train-sat"] == pytest.approx(np.mean(train_lsat))
    assert values["average-eval-sat"] == pytest.approx(np.mean(eval_lsat))
    assert values["eval-saturation_linear1"] == pytest.approx(eval_lsat[0])


def test_layerwise_sat_false_keeps_only_averages():
    model = MLP()
    tracker = CheckLayerSat("unused", "csv", model, stats=["lsat"], average_sat=True, layerwise_sat=False,
                            nosave=True)
    model(torch.randn(20, 10))
    assert set(tracker.add_saturations()) == {"average-train-sat"}


def test_embed_projects_recorded_samples():
    torch.manual_seed(8)
    layer = nn.Linear(5, 4)
    tracker = CheckLayerSat("unused", "csv", [layer], stats=["embed", "lsat"], nosave=True)
    rows = [layer(torch.randn(700, 5)).detach().double().numpy() for _ in range(2)]
    _, embeds = tracker.compute_statistics()
    data = np.concatenate(rows)
    ref = np_stats(data)
    _, vecs = np.linalg.eigh(ref["cov"])
    expected = (data[:1000] - data.mean(0)) @ vecs[:, ::-1][:, :2]
    got = embeds["train-embedded-sample_Module-0-Linear"]
    assert got.shape == (1000, 2)
    for column in range(2):
        sign = np.sign(got[:, column] @ expected[:, column])
        np.testing.assert_allclose(sign * got[:, column], expected[:, column], atol=1e-4)


def test_layer_names_for_models_lists_and_containers():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Flatten(), nn.Linear(8, 2))
    assert list(CheckLayerSat("u", "csv", model, nosave=True).layers) == ["0-0", "2"]
    head = nn.Linear(2, 2)
    block = nn.Sequential(nn.Linear(2, 3), nn.LSTM(3, 3))
    names = CheckLayerSat("u", "csv", [head, block, head], nosave=True).layers
    assert list(names) == ["Module-0-Linear", "0", "1"]
    assert list(CheckLayerSat("u", "csv", model, include_conv=False, nosave=True).layers) == ["2"]
    assert list(CheckLayerSat("u", "csv", model, ignore_layer_names=["2"], nosave=True).layers) == ["0-0"]
    only_linear = CheckLayerSat(
        "u", "csv", model, nosave=True,
        layer_filter=lambda layers: {k: v for k, v in layers.items() if isinstance(v, nn.Linear)},
    )
    assert list(only_linear.layers) == ["2"]
    # Two containers with the same inner paths still get unique names.
    twins = CheckLayerSat("u", "csv", [nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))],
                          nosave=True)
    assert list(twins.layers) == ["0", "Module-1-0"]


def test_close_removes_every_hook():
    model = MLP()
    before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    tracker = CheckLayerSat("u", "csv", model, nosave=True)
    assert len(model.linear1._forward_hooks) == before["linear1"] + 1
    tracker.close()
    tracker.close()  # idempotent
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == before
    with pytest.raises(RuntimeError, match="closed"):
        tracker.add_saturations()


def test_context_manager_and_alias(tmp_path):
    assert SaturationTracker is CheckLayerSat
    layer = nn.Linear(2, 2)
    with SaturationTracker(str(tmp_path / "run"), "csv", layer) as tracker:
        layer(torch.randn(4, 2))
        tracker.add_saturations()
    assert not layer._forward_hooks
    assert (tmp_path / "run.csv").exists()


def test_device_follows_activations_or_is_honoured():
    layer = nn.Linear(3, 3)
    for device in (None, "cpu", torch.device("cpu")):
        tracker = CheckLayerSat("u", "csv", layer, nosave=True, device=device)
        layer(torch.randn(5, 3))
        assert tracker.accumulator("Module-0-Linear").mean.device.type == "cpu"
        tracker.close()


def test_half_precision_model_outputs():
    torch.manual_seed(9)
    layer = nn.Linear(6, 5).to(torch.bfloat16)
    tracker = CheckLayerSat("u", "csv", [layer], stats=["trc", "idim"], nosave=True)
    rows = [layer(torch.randn(32, 6, dtype=torch.bfloat16)).detach().double().numpy() for _ in range(3)]
    assert_matches(tracker.add_saturations(), "Module-0-Linear", "train", rows, stats=["trc", "idim"])


def test_gradients_never_flow_into_the_tracker():
    layer = nn.Linear(3, 3)
    tracker = CheckLayerSat("u", "csv", layer, nosave=True)
    out = layer(torch.randn(4, 3, requires_grad=True))
    out.sum().backward()
    state = tracker.accumulator("Module-0-Linear")
    assert not state.scatter.requires_grad and not state.mean.requires_grad


class RecordingWriter(AbstractWriter):
    def __init__(self):
        self.calls = []

    def add_scalar(self, name, value, **kwargs):
        self.calls.append(("scalar", name, value, kwargs))

    def add_scalars(self, prefix, value_dict, **kwargs):
        self.calls.append(("scalars", prefix, dict(value_dict), kwargs))

    def save(self):
        self.calls.append(("save",))

    def close(self):
        self.calls.append(("close",))


def test_user_writer_receives_global_step_and_user_scalars_last_value_wins():
    writer = RecordingWriter()
    layer = nn.Linear(3, 2)
    tracker = CheckLayerSat("u", writer, layer, stats=["lsat", "embed"], initial_epoch=5)
    layer(torch.randn(6, 3))
    tracker.add_scalar("loss", 2.0)
    tracker.add_scalar("loss", torch.tensor(1.5))
    tracker.add_saturations()
    tracker.close()
    kinds = [c[0] for c in writer.calls]
    assert kinds == ["scalar", "scalars", "save", "close"]
    assert writer.calls[0][1:3] == ("loss", 1.5) and writer.calls[0][3]["global_step"] == 5
    _, prefix, values, kwargs = writer.calls[1]
    assert prefix == "" and kwargs["global_step"] == 5
    assert set(values) == {"train-saturation_Module-0-Linear"}
    assert kwargs["sample_value_dict"]["train-embedded-sample_Module-0-Linear"].shape == (6, 2)


@pytest.mark.parametrize("compile_first", [False, True])
def test_compiled_model_is_tracked_and_the_tracker_runs_eagerly(monkeypatch, compile_first):
    # torch.compile traces module hooks; the tracker's own code must stay out of the
    # graph (it would recompile at every batch as its state changes) and still see
    # every batch. The expected rows come from the uncompiled layers, run by the test.
    import delve.gram as gram

    traced = []
    products = gram.centred_gram

    def spy(*args):
        traced.append(torch.compiler.is_compiling())
        return products(*args)

    monkeypatch.setattr(gram, "centred_gram", spy)
    torch.manual_seed(0)
    model = MLP()
    if compile_first:  # the tracker is given the compiled wrapper; layers keep their plain names
        compiled = torch.compile(model, backend="eager")
        tracker = CheckLayerSat("unused", "csv", compiled, stats=STATS, nosave=True)
    else:
        tracker = CheckLayerSat("unused", "csv", model, stats=STATS, nosave=True)
        compiled = torch.compile(model, backend="eager")
    assert list(tracker.layers) == ["linear1", "linear2"]
    batches = [torch.randn(32, 10) for _ in range(4)]
    with torch.no_grad():
        for x in batches:
            compiled(x)
        # Functional calls: the layers' own hooks (the tracker's) must not fire again.
        hidden = [nn.functional.linear(x, model.linear1.weight, model.linear1.bias) for x in batches]
        logits = [nn.functional.linear(torch.relu(h), model.linear2.weight, model.linear2.bias) for h in hidden]
    values = tracker.add_saturations()
    tracker.close()
    assert len(traced) == 8 and not any(traced)
    assert_matches(values, "linear1", "train", [h.double().numpy() for h in hidden])
    assert_matches(values, "linear2", "train", [y.double().numpy() for y in logits])


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_records_each_row_once(reentrant):
    # A checkpointed segment runs its forward again inside backward to recompute its
    # activations; those rows were recorded by the forward pass and must not count twice.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = MLP()
    tracker = CheckLayerSat("unused", "csv", model, stats=STATS, nosave=True)
    batches = [torch.randn(16, 10, requires_grad=True) for _ in range(3)]
    for x in batches:
        hidden = checkpoint(lambda t: torch.relu(model.linear1(t)), x, use_reentrant=reentrant)
        model.linear2(hidden).sum().backward()
    assert tracker.accumulator("linear1").count == 48
    with torch.no_grad():
        hidden = [nn.functional.linear(x, model.linear1.weight, model.linear1.bias) for x in batches]
    values = tracker.add_saturations()
    tracker.close()
    assert_matches(values, "linear1", "train", [h.double().numpy() for h in hidden])


def test_deep_copies_of_the_model_are_not_recorded():
    # An EMA model or a kept "best" model made with copy.deepcopy carries the tracker's
    # hooks along; its forward passes must not mix into the tracked model's statistics.
    import copy

    torch.manual_seed(0)
    model = MLP()
    tracker = CheckLayerSat("unused", "csv", model, stats=STATS, nosave=True)
    ema = copy.deepcopy(model)
    capture = OutputCapture({"linear1": model.linear1})  # registered after the copy: on the model only
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 10))
            ema(torch.randn(16, 10) * 5)
    assert tracker.accumulator("linear1").count == 48
    # nn.DataParallel's replicas share the hooks too, and are recorded (replicated here
    # by the same call DataParallel makes for each module, without GPUs).
    replica = model.linear1._replicate_for_data_parallel()
    replica.weight, replica.bias = model.linear1.weight, model.linear1.bias  # as replicate() does
    with torch.no_grad():
        replica(torch.randn(16, 10))
    assert tracker.accumulator("linear1").count == 64
    values = tracker.add_saturations()
    tracker.close()
    assert_matches(values, "linear1", "train", capture.take("linear1", "train"))


def test_the_model_can_be_saved_whole_while_tracked():
    # torch.save(model) in the middle of a tracked training must work; the saved model
    # loads and runs without the tracker, and its passes are not recorded.
    import io

    torch.manual_seed(0)
    model = MLP()
    tracker = CheckLayerSat("unused", "csv", model, stats=STATS, nosave=True)
    batches = [torch.randn(16, 10) for _ in range(3)]
    with torch.no_grad():
        model(batches[0])
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(batches[1]), model(batches[1]))
        model(batches[2])
        hidden = [nn.functional.linear(x, model.linear1.weight, model.linear1.bias) for x in batches]
    assert tracker.accumulator("linear1").count == 48
    values = tracker.add_saturations()
    tracker.close()
    assert_matches(values, "linear1", "train", [h.double().numpy() for h in hidden])


def test_a_batch_the_accumulator_refuses_is_skipped_and_training_goes_on(caplog):
    # conv_method='flatten' on maps that change size gives rows of another width: the
    # covariance of the first width goes on, the odd batches are left out with one log.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    tracker = CheckLayerSat("unused", "csv", conv, stats=STATS + ["embed"], conv_method="flatten", nosave=True)
    capture = OutputCapture({"conv": conv})
    with torch.no_grad(), caplog.at_level("ERROR", logger="delve"):
        for size in (4, 5, 4, 5, 4):
            conv(torch.randn(8, 2, size, size))
    (name,) = tracker.layers
    refused = [r for r in caplog.records if "features where the layer's first batch had" in r.getMessage()]
    assert len(refused) == 1 and name in refused[0].getMessage()
    rows = [o.reshape(o.shape[0], -1) for o in capture.take("conv", "train") if o.shape[-1] == 4]
    assert len(rows) == 3
    values = tracker.add_saturations()
    tracker.close()
    assert_matches(values, name, "train", rows)


def test_a_failing_update_is_logged_once_and_training_goes_on(monkeypatch, caplog):
    # Whatever the accumulator raises (a device out of memory, say), the forward pass
    # goes on and the other batches are still recorded.
    torch.manual_seed(0)
    model = MLP()
    tracker = CheckLayerSat("unused", "csv", model, stats=STATS, nosave=True)
    capture = OutputCapture({"linear1": model.linear1})
    accumulator = tracker.accumulator("linear1")
    update = accumulator.update_rows
    calls = []

    def flaky(x, valid=None):
        calls.append(x.shape[0])
        if len(calls) in (2, 3):
            raise RuntimeError("CUDA out of memory (simulated)")
        update(x, valid)

    monkeypatch.setattr(accumulator, "update_rows", flaky)
    with torch.no_grad(), caplog.at_level("ERROR", logger="delve"):
        for _ in range(5):
            model(torch.randn(16, 10))
    assert len([r for r in caplog.records if "could not be added" in r.getMessage()]) == 1
    rows = capture.take("linear1", "train")
    values = tracker.add_saturations()
    tracker.close()
    assert_matches(values, "linear1", "train", [rows[0], rows[3], rows[4]])


def test_wrapper_attributes_are_left_out_of_layer_names():
    # Activation-checkpointing, FSDP and torch.compile wrappers keep the wrapped module
    # under an attribute of their own; names follow the model as written, and the
    # checkpointed layer still counts each row once.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = nn.Sequential(checkpoint_wrapper(nn.Sequential(nn.Linear(4, 5), nn.ReLU())), nn.Linear(5, 2))
    model.add_module("head", torch.compile(nn.Sequential(nn.Linear(2, 3)), backend="eager"))
    tracker = CheckLayerSat("unused", "csv", model, stats=STATS, nosave=True)
    assert list(tracker.layers) == ["0-0", "1", "head-0"]
    x = torch.randn(32, 4, requires_grad=True)
    model(x).sum().backward()
    assert tracker.accumulator("0-0").count == 32
    inner = model[0]._checkpoint_wrapped_module[0]
    with torch.no_grad():
        first = nn.functional.linear(x, inner.weight, inner.bias)
    values = tracker.add_saturations()
    tracker.close()
    # 5 outputs of 4 inputs: a singular covariance, whose determinant is rounding noise.
    assert_matches(values, "0-0", "train", [first.double().numpy()], stats=["idim", "lsat", "trc", "dtrc"])


class Bypassed(nn.Module):
    """One layer used only through its weights, one that evaluation computes without calling it."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(6, 4)
        self.shortcut = nn.Linear(4, 4)
        self.weights_only = nn.Linear(4, 3)

    def forward(self, x):
        h = self.used(x)
        # What a fused fast path does: the layer's computation without its call (or its hooks).
        h = self.shortcut(h) if self.training else nn.functional.linear(h, self.shortcut.weight, self.shortcut.bias)
        return nn.functional.linear(h, self.weights_only.weight, self.weights_only.bias)


def test_a_layer_whose_hooks_never_run_is_reported_once(caplog):
    # A layer found but never called, or never called in one mode while the others are,
    # would leave empty columns: the user hears so once, not every epoch.
    torch.manual_seed(0)
    model = Bypassed()
    tracker = CheckLayerSat("unused", "csv", model, stats=["lsat"], nosave=True)
    with caplog.at_level("WARNING", logger="delve"), torch.no_grad():
        for _ in range(2):
            model.train()
            model(torch.randn(8, 6))
            model.eval()
            model(torch.randn(8, 6))
            values = tracker.add_saturations()
    tracker.close()
    messages = [r.getMessage() for r in caplog.records]
    never = [m for m in messages if "saw no forward pass" in m]
    assert len(never) == 1 and never[0].startswith("layer weights_only ")
    eval_only = [m for m in messages if "saw no eval forward pass" in m]
    assert len(eval_only) == 1 and eval_only[0].startswith("layer shortcut ")
    assert "set_fastpath_enabled(False)" in eval_only[0]
    assert len(messages) == 2
    assert "eval-saturation_shortcut" not in values
    assert "train-saturation_shortcut" in values and "eval-saturation_used" in values
