"""Lightning and Hugging Face callbacks, run with the real frameworks on CPU.

Each run records one layer's outputs with the test's own forward hook, together with what
the framework says about the moment (epoch, sanity check …); the expected statistics are
computed from those outputs with float64 numpy and compared with the files the callbacks
wrote.
"""

import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from delve.integrations.lightning import SaturationCallback as LightningSaturation
from delve.integrations.transformers import SaturationCallback as HFSaturation
from tests.reference import np_cov, np_stats, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESH = 0.9


def reference(rows):
    """(idim, lsat, trace) of the rows' population covariance, from float64 numpy."""
    ref = np_stats(np.concatenate(rows), THRESH)
    ratios = np.cumsum(ref["eig"]) / ref["eig"].sum()
    assert np.min(np.abs(ratios - THRESH)) > 1e-6  # not on the edge of a step
    return ref["idim"], ref["lsat"], ref["trc"]


def read_csv(path):
    return pd.read_csv(path, sep=";", index_col=0)


def tb_scalars(logdir):
    """``tag -> [(step, value)]`` of the event files in ``logdir``, read by TensorBoard's reader."""
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared machine: more threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def quiet_frameworks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def low_rank_data(samples, seed, features=6, rank=2, classes=3):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, rank, generator=generator)
    x = z @ torch.randn(rank, features, generator=generator) + 0.05 * torch.randn(
        samples, features, generator=generator
    )
    y = torch.randint(0, classes, (samples,), generator=generator)
    return TensorDataset(x, y)


# --------------------------------------------------------------------------- import
def test_import_delve_does_not_import_the_frameworks():
    code = (
        "import sys, delve, delve.integrations\n"
        "loaded = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_a_missing_framework_names_the_extra_to_install():
    # A None entry in sys.modules makes that import fail, as if the package were absent.
    code = (
        "import importlib, sys\n"
        "cases = [('delve.integrations.lightning', ('lightning', 'pytorch_lightning')),\n"
        "         ('delve.integrations.transformers', ('transformers',))]\n"
        "for module, blocked in cases:\n"
        "    for name in blocked:\n"
        "        sys.modules[name] = None\n"
        "    try:\n"
        "        importlib.import_module(module)\n"
        "    except ImportError as err:\n"
        "        print(err)\n"
        "    else:\n"
        "        raise SystemExit(module + ' imported without its framework')\n"
        # Without transformers, its Conv1D stays declared by name and tracking works as ever.
        "import torch, delve\n"
        "from delve.layers import registered_layers\n"
        "assert 'transformers.pytorch_utils.Conv1D' in [t.cls for t in registered_layers()]\n"
        "tracker = delve.CheckLayerSat('unused', 'csv', torch.nn.Sequential(torch.nn.Linear(3, 2)), nosave=True)\n"
        "assert list(tracker.layers) == ['0']\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert "pip install 'delve[lightning]'" in lines[0]
    assert "pip install 'delve[transformers]'" in lines[1]


class TinyModule(pl.LightningModule):
    def __init__(self, fail_at_epoch=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.fail_at_epoch = fail_at_epoch

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.current_epoch == self.fail_at_epoch:
            raise RuntimeError("boom")
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def capture_lightning(module, layer):
    """Record (sanity check?, epoch, mode, output) of every forward of `layer`."""
    records = []

    def hook(mod, inputs, output):
        trainer = module.trainer
        mode = "train" if mod.training else "eval"
        records.append((trainer.sanity_checking, trainer.current_epoch, mode, output.detach().numpy().copy()))

    handle = layer.register_forward_hook(hook)
    return records, handle


def lightning_trainer(tmp_path, callback, **kwargs):
    options = dict(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=CSVLogger(str(tmp_path)),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        callbacks=[callback],
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def loaders():
    return (
        DataLoader(low_rank_data(24, seed=0), batch_size=4, shuffle=True),
        DataLoader(low_rank_data(16, seed=1), batch_size=4),
    )


def test_lightning_callback_writes_each_epochs_train_and_validation_statistics(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    records = {name: capture_lightning(module, module.net[i])[0] for name, i in (("net-0", 0), ("net-2", 2))}
    callback = LightningSaturation(stats=["lsat", "idim", "trc"], sat_threshold=THRESH, average_sat=True)
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = lightning_trainer(tmp_path, callback, logger=[CSVLogger(str(tmp_path)), tensorboard])
    trainer.fit(module, *loaders())

    # The sanity check ran (and must not be counted).
    assert sum(1 for sanity, *_ in records["net-0"] if sanity) == 2
    csv = os.path.join(trainer.log_dir, "saturation.csv")
    table = read_csv(csv)
    assert list(table.index) == [0, 1]
    expected_columns = [
        f"{mode}-{stat}_{layer}"
        for mode in ("train", "eval")
        for layer in ("net-0", "net-2")
        for stat in ("saturation", "intrinsic-dimensionality", "covariance-trace")
    ]
    assert [c for c in table.columns if not c.startswith("average-")] == expected_columns

    lsats = {}
    for name, layer_records in records.items():
        for epoch in (0, 1):
            for mode, batches in (("train", 3), ("eval", 2)):
                rows = [out for sanity, e, m, out in layer_records if not sanity and e == epoch and m == mode]
                assert len(rows) == batches
                idim, lsat, trace = reference(rows)
                lsats.setdefault((epoch, mode), []).append(lsat)
                assert table.loc[epoch, f"{mode}-intrinsic-dimensionality_{name}"] == idim
                assert table.loc[epoch, f"{mode}-saturation_{name}"] == pytest.approx(lsat, abs=1e-12)
                assert table.loc[epoch, f"{mode}-covariance-trace_{name}"] == pytest.approx(trace, rel=1e-6)
    for (epoch, mode), values in lsats.items():
        assert table.loc[epoch, f"average-{mode}-sat"] == pytest.approx(np.mean(values), abs=1e-12)
    # Low-rank inputs: the first layer is far from saturated, so the comparison is not trivial.
    assert table["train-intrinsic-dimensionality_net-0"].max() < 8

    # The same values reached the trainer's loggers, one row per epoch, named by statistic
    # the way dashboards group them: {mode}-{statname}/{layer} and {mode}-saturation/average.
    tags = {column: column.replace("_", "/", 1) for column in expected_columns}
    tags.update({f"average-{mode}-sat": f"{mode}-saturation/average" for mode in ("train", "eval")})
    metrics = pd.read_csv(os.path.join(trainer.log_dir, "metrics.csv"))
    logged = metrics.dropna(subset=["train-saturation/net-0"]).set_index("epoch")
    assert list(logged.index) == [0, 1]
    assert not [c for c in metrics.columns if "_net-" in c or c.startswith("average-")]
    events = tb_scalars(tensorboard.log_dir)
    for column, tag in tags.items():
        np.testing.assert_allclose(logged[tag].to_numpy(), table[column].to_numpy(), rtol=1e-12)
        steps = logged["step"].astype(int).tolist()
        assert [step for step, _ in events[tag]] == steps
        np.testing.assert_allclose([value for _, value in events[tag]], table[column].to_numpy(), rtol=1e-6)
    assert sorted(callback.history) == [0, 1]

    # Fit is over: every hook of the tracker is gone, only the test's own remain.
    assert len(module.net[0]._forward_hooks) == 1
    assert len(module.net[2]._forward_hooks) == 1


def test_lightning_epochs_without_validation_have_no_eval_values(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    records, _ = capture_lightning(module, module.net[0])
    savefile = str(tmp_path / "chosen" / "sat")
    callback = LightningSaturation(
        savefile=savefile, modules=lambda m: [m.net[0]], stats=["trc"], log_to_loggers=False
    )
    trainer = lightning_trainer(tmp_path, callback, check_val_every_n_epoch=2, num_sanity_val_steps=0)
    trainer.fit(module, *loaders())

    table = read_csv(savefile + ".csv")
    assert list(table.columns) == ["train-covariance-trace_Module-0-Linear", "eval-covariance-trace_Module-0-Linear"]
    assert np.isnan(table.loc[0, "eval-covariance-trace_Module-0-Linear"])
    for epoch, mode in ((0, "train"), (1, "train"), (1, "eval")):
        rows = [out for _, e, m, out in records if e == epoch and m == mode]
        assert table.loc[epoch, f"{mode}-covariance-trace_Module-0-Linear"] == pytest.approx(
            reference(rows)[2], rel=1e-6
        )
    assert "train-covariance-trace_Module-0-Linear" not in pd.read_csv(
        os.path.join(trainer.log_dir, "metrics.csv")
    ).columns


def test_lightning_resumed_from_its_last_checkpoint_continues_the_csv_at_the_next_epoch(tmp_path):
    # With validation every 2 epochs, the last checkpoint is taken during the validation of
    # epoch 1, before that epoch ends: Lightning restores current_epoch=1 but trains epoch 2 next.
    savefile = str(tmp_path / "sat")
    column = {mode: f"{mode}-covariance-trace_Module-0-Linear" for mode in ("train", "eval")}

    def fit(max_epochs, ckpt_path=None):
        module = TinyModule()
        records, _ = capture_lightning(module, module.net[0])
        callback = LightningSaturation(savefile=savefile, modules=lambda m: [m.net[0]], stats=["trc"],
                                       log_to_loggers=False)
        checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True)
        trainer = lightning_trainer(tmp_path, callback, max_epochs=max_epochs, check_val_every_n_epoch=2,
                                    num_sanity_val_steps=0, enable_checkpointing=True,
                                    callbacks=[callback, checkpoints])
        trainer.fit(module, *loaders(), ckpt_path=ckpt_path)
        return records

    torch.manual_seed(0)
    fit(2)
    first = read_csv(savefile + ".csv")
    assert list(first.index) == [0, 1]
    records = fit(4, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))

    table = read_csv(savefile + ".csv")
    assert list(table.index) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(table.loc[[0, 1]], first)  # the finished epochs are kept as they were
    assert {epoch for _, epoch, _, _ in records} == {2, 3}  # what the resumed run trained
    assert np.isnan(table.loc[2, column["eval"]])  # no validation at epoch 2
    for epoch, mode in ((2, "train"), (3, "train"), (3, "eval")):
        rows = [out for _, e, m, out in records if e == epoch and m == mode]
        assert table.loc[epoch, column[mode]] == pytest.approx(reference(rows)[2], rel=1e-6)


def test_lightning_failure_removes_the_hooks_and_keeps_finished_epochs(tmp_path):
    torch.manual_seed(0)
    module = TinyModule(fail_at_epoch=1)
    records, handle = capture_lightning(module, module.net[0])
    callback = LightningSaturation(stats=["lsat"], sat_threshold=THRESH)
    trainer = lightning_trainer(tmp_path, callback)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, *loaders())
    handle.remove()
    assert all(len(layer._forward_hooks) == 0 for layer in (module.net[0], module.net[2]))
    table = read_csv(os.path.join(trainer.log_dir, "saturation.csv"))
    assert list(table.index) == [0]
    # The finished epoch keeps its values.
    for mode in ("train", "eval"):
        rows = [out for sanity, e, m, out in records if not sanity and e == 0 and m == mode]
        assert table.loc[0, f"{mode}-saturation_net-0"] == pytest.approx(reference(rows)[1], abs=1e-12)


# ---------------------------------------------------------------------- transformers
class TokenDataset(Dataset):
    def __init__(self, samples, seed, length=8, vocab=50):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (samples, length), generator=generator)
        self.labels = torch.randint(0, 2, (samples,), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return BertForSequenceClassification(config)


def hf_arguments(tmp_path, **changes):
    options = dict(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    options.update(changes)
    return TrainingArguments(**options)


class ReceivedLogs(TrainerCallback):
    """A reporter of our own: what the trainer's ``on_log`` hands every reporter."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def hf_names(column):
    """The names a CSV column goes by in the trainer's logs and in its TensorBoard reporter.

    The trainer writes the mode its own way (``loss`` / ``eval_loss``) and its reporters
    show ``train/...`` and ``eval/...``: ``eval-saturation_classifier`` is logged as
    ``eval_saturation/classifier`` and shown as ``eval/saturation/classifier``.
    """
    mode, rest = column.split("-", 1)
    stem, layer = rest.split("_", 1)
    logged = ("eval_" if mode == "eval" else "") + f"{stem}/{layer}"
    return logged, f"{mode}/{stem}/{layer}"


def test_transformers_callback_writes_each_epochs_train_and_evaluation_statistics(tmp_path):
    model = tiny_bert()
    layers = {"bert-pooler-dense": model.bert.pooler.dense, "classifier": model.classifier}
    records = {name: [] for name in layers}

    def recorder(name):
        def hook(mod, inputs, output):
            records[name].append(("train" if mod.training else "eval", output.detach().numpy().copy()))

        return hook

    for name, layer in layers.items():
        layer.register_forward_hook(recorder(name))
    args = hf_arguments(tmp_path, eval_on_start=True, report_to=["tensorboard"])
    received = ReceivedLogs()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(12, seed=0),
        eval_dataset=TokenDataset(8, seed=1),
        callbacks=[received],
    )
    callback = HFSaturation(
        trainer=trainer,
        stats=["lsat", "trc"],
        sat_threshold=THRESH,
        layer_filter=lambda layers: {k: v for k, v in layers.items() if k in ("bert-pooler-dense", "classifier")},
    )
    trainer.add_callback(callback)
    trainer.train()

    table = read_csv(os.path.join(args.output_dir, "saturation.csv"))
    assert list(table.index) == [0, 1]
    assert list(table.columns) == [
        f"{mode}-{stat}_{name}"
        for mode in ("train", "eval")
        for name in ("bert-pooler-dense", "classifier")
        for stat in ("saturation", "covariance-trace")
    ]
    for name, layer_records in records.items():
        train_rows = [out for mode, out in layer_records if mode == "train"]
        eval_rows = [out for mode, out in layer_records if mode == "eval"]
        # 3 training batches per epoch; 2 evaluation batches before training, then 2 after each epoch.
        assert len(train_rows) == 6 and len(eval_rows) == 6
        for epoch in (0, 1):
            expected = {
                "train": reference(train_rows[3 * epoch : 3 * epoch + 3]),
                # The evaluation before training (eval_on_start) is not part of any epoch.
                "eval": reference(eval_rows[2 + 2 * epoch : 4 + 2 * epoch]),
            }
            for mode, (_, lsat, trace) in expected.items():
                assert table.loc[epoch, f"{mode}-saturation_{name}"] == pytest.approx(lsat, abs=1e-12)
                assert table.loc[epoch, f"{mode}-covariance-trace_{name}"] == pytest.approx(trace, rel=1e-6)

    # One log_history entry per epoch, shaped like the trainer's own, with the same values.
    entries = [e for e in trainer.state.log_history if "saturation/classifier" in e]
    assert [e["epoch"] for e in entries] == [1.0, 2.0]
    assert [e["step"] for e in entries] == [3, 6]
    for epoch, entry in enumerate(entries):
        assert set(entry) == {hf_names(column)[0] for column in table.columns} | {"epoch", "step"}
        for column in table.columns:
            assert entry[hf_names(column)[0]] == pytest.approx(table.loc[epoch, column], rel=1e-12)
    # Every reporter received them through on_log, at the epoch's step.
    ours = [(step, logs) for step, logs in received.logs if "saturation/classifier" in logs]
    assert [step for step, _ in ours] == [3, 6]
    for (_, logs), entry in zip(ours, entries):
        assert logs == {k: v for k, v in entry.items() if k != "step"}
    # The trainer's TensorBoard reporter wrote them under train/... and eval/..., per statistic.
    (logdir,) = [root for root, _, files in os.walk(args.output_dir) if any("tfevents" in f for f in files)]
    events = tb_scalars(logdir)
    for column in table.columns:
        tag = hf_names(column)[1]
        assert [step for step, _ in events[tag]] == [3, 6]
        np.testing.assert_allclose([v for _, v in events[tag]], table[column].to_numpy(), rtol=1e-6)
    assert all(len(layer._forward_hooks) == 1 for layer in layers.values())  # only the test's hooks are left


def test_transformers_callback_without_the_trainer_fills_log_history_and_says_reporters_miss_it(tmp_path, caplog):
    model = tiny_bert()
    args = hf_arguments(tmp_path, num_train_epochs=1, report_to=["tensorboard"])
    callback = HFSaturation(stats=["lsat"], layer_filter=lambda layers: {"classifier": layers["classifier"]})
    received = ReceivedLogs()
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(8, seed=0),
                      eval_dataset=TokenDataset(4, seed=1), callbacks=[callback, received])
    trainer.train()

    table = read_csv(os.path.join(args.output_dir, "saturation.csv"))
    (entry,) = [e for e in trainer.state.log_history if "saturation/classifier" in e]
    assert entry == {
        "saturation/classifier": pytest.approx(table.loc[0, "train-saturation_classifier"], rel=1e-12),
        "eval_saturation/classifier": pytest.approx(table.loc[0, "eval-saturation_classifier"], rel=1e-12),
        "epoch": 1.0,
        "step": 2,
    }
    assert not [logs for _, logs in received.logs if "saturation/classifier" in logs]
    warnings = [r.getMessage() for r in caplog.records if r.name == "delve.integrations.transformers"]
    assert len(warnings) == 1 and "['tensorboard']" in warnings[0] and "trainer=trainer" in warnings[0]


# --------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("callback_class", [LightningSaturation, HFSaturation])
def test_bad_arguments_fail_when_the_callback_is_made(callback_class):
    with pytest.raises(ValueError, match="lsat"):
        callback_class(stats=["lsat", "saturation"])
    with pytest.raises(TypeError, match="sat_threshold"):
        callback_class(sat_treshold=0.9)
    with pytest.raises(ValueError, match="csv"):
        callback_class(save_to="excel")
    with pytest.raises(ValueError, match="sat_threshold"):
        callback_class(sat_threshold=1.5)
    with pytest.raises(ValueError, match="conv_method"):
        callback_class(conv_method="average")
    with pytest.raises(ValueError, match="rows_per_batch must be an integer >= 1 or None, got 0"):
        callback_class(rows_per_batch=0)
    with pytest.raises(TypeError, match="modules"):
        callback_class(modules="encoder")
    with pytest.raises(TypeError, match="layer_filter"):
        callback_class(layer_filter=["encoder"])
    with pytest.raises(ValueError, match="use_attention_mask must be True or False, got 'yes'"):
        callback_class(use_attention_mask="yes")
    # A filter that would keep nothing of a stand-in layer is fine: it is meant for the model.
    callback_class(layer_filter=lambda layers: {}, include_conv=False, ignore_layer_names=["Module-0-Linear"])


def test_the_transformers_trainer_argument_must_be_a_trainer():
    with pytest.raises(TypeError, match="trainer must be the transformers Trainer the callback is added to, got str"):
        HFSaturation(trainer="trainer")


def test_checking_the_arguments_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    LightningSaturation(save_to=["csv", "print"], stats=["lsat_eval", "idim"], verbose=True)
    HFSaturation(save_to="csv", stats=["lsat"])
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------------- padding
PAD_VOCAB = 40


class VariableLengthTokens(Dataset):
    """Token sequences of 2 to 7 tokens, padded by the collator."""

    def __init__(self, samples, seed):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 8, (samples,), generator=generator).tolist()
        self.sequences = [torch.randint(1, PAD_VOCAB, (n,), generator=generator) for n in lengths]

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return {"input_ids": self.sequences[i]}


def pad_batch(items, side="right"):
    """A tokenizer's padded batch: input_ids, attention_mask, and labels ignoring the padding."""
    steps = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), steps, dtype=torch.int64)
    mask = torch.zeros(len(items), steps, dtype=torch.int64)
    for i, item in enumerate(items):
        n = len(item["input_ids"])
        where = slice(0, n) if side == "right" else slice(steps - n, steps)
        ids[i, where] = item["input_ids"]
        mask[i, where] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=PAD_VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2))


class PaddingCapture:
    """Our own hooks: every (mode, output) of one layer with the attention_mask of the model call it belongs to."""

    def __init__(self, model, layer):
        self.records = []
        self._mask = None
        self.handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            layer.register_forward_hook(self._output),
        ]

    def _before(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = None if mask is None else mask.detach().bool().numpy().copy()

    def _output(self, module, inputs, output):
        mode = "train" if module.training else "eval"
        self.records.append((mode, output.detach().double().numpy().copy(), self._mask))

    def rows(self, mode, method="timestepwise", masked=True):
        kept = []
        for record_mode, out, mask in self.records:
            if record_mode != mode:
                continue
            if not masked:
                kept.append(out.reshape(-1, out.shape[-1]) if method == "timestepwise" else out[:, -1])
            elif method == "timestepwise":
                kept.append(out[mask])
            else:
                kept.append(np.stack([out[i, np.flatnonzero(m)[-1]] for i, m in enumerate(mask)]))
        return kept

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_transformers_trainer_on_padded_batches_measures_the_real_tokens(tmp_path):
    model = tiny_gpt2()
    layer = "transformer-h-0-mlp-c_fc"
    capture = PaddingCapture(model, model.transformer.h[0].mlp.c_fc)
    args = hf_arguments(tmp_path)
    callback = HFSaturation(save_to="npy", stats=["cov"], layer_filter=lambda layers: {layer: layers[layer]})
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=VariableLengthTokens(12, seed=0),
        eval_dataset=VariableLengthTokens(8, seed=1),
        data_collator=pad_batch,
        callbacks=[callback],
    )
    trainer.train()
    capture.remove()
    assert callback.tracker.timeseries_method == "timestepwise"  # the callback's default
    train, evaluation = capture.rows("train"), capture.rows("eval")
    assert len(train) == 6 and len(evaluation) == 4  # 3 steps and 2 evaluation batches per epoch
    assert any(not mask.all() for _, _, mask in capture.records)  # the batches were padded
    for epoch in (0, 1):
        expected = {"train": train[3 * epoch : 3 * epoch + 3], "eval": evaluation[2 * epoch : 2 * epoch + 2]}
        for mode, rows in expected.items():
            key = f"{mode}-covariance-matrix_{layer}"
            saved = np.load(os.path.join(args.output_dir, "saturation", key, f"{key}_epoch{epoch}.npy"))
            assert rel_err(saved, np_cov(np.concatenate(rows))) < 1e-6, (epoch, mode)


class _Control:
    should_evaluate = False


@pytest.mark.parametrize(
    "options, masked, method",
    [
        ({}, True, "timestepwise"),
        ({"use_attention_mask": False}, False, "timestepwise"),
        ({"timeseries_method": "last_timestep"}, True, "last_timestep"),
    ],
    ids=["default", "mask_off", "last_timestep"],
)
def test_transformers_callback_mask_and_method_can_be_changed(tmp_path, options, masked, method):
    # The callback driven through its trainer events: one epoch of two left-padded calls.
    from types import SimpleNamespace

    model = tiny_gpt2()
    capture = PaddingCapture(model, model.transformer.h[0].mlp.c_proj)
    callback = HFSaturation(nosave=True, stats=["cov"], **options)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(epoch=0.0, global_step=0, log_history=[])
    callback.on_train_begin(args, state, _Control(), model=model)
    callback.on_epoch_begin(args, state, _Control())
    dataset = VariableLengthTokens(8, seed=2)
    for start in (0, 4):
        model(**pad_batch([dataset[i] for i in range(start, start + 4)], side="left"))
    callback.on_epoch_end(args, state, _Control())
    callback.on_train_end(args, state, _Control())
    capture.remove()
    rows = np.concatenate(capture.rows("train", method, masked))
    got = callback.history[0]["train-covariance-matrix_transformer-h-0-mlp-c_proj"]
    assert rel_err(got, np_cov(rows)) < 1e-6
    assert not model._forward_pre_hooks  # the callback's hooks are gone with the tracker


class PaddedTagger(pl.LightningModule):
    """Token embeddings and one projection, trained on mapping batches with an attention_mask."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(PAD_VOCAB, 6)
        self.proj = nn.Linear(6, 5)

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids))

    def _loss(self, batch):
        out = self(batch["input_ids"])
        return (out.pow(2).mean(-1) * batch["attention_mask"]).sum() / batch["attention_mask"].sum()

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_callback_leaves_the_padding_of_mapping_batches_out(tmp_path):
    torch.manual_seed(0)
    module = PaddedTagger()
    records, _ = capture_lightning(module, module.proj)
    masks = []  # the attention_mask of every batch, in the order the layer saw them
    callback = LightningSaturation(stats=["cov"], save_to="npy", timeseries_method="timestepwise")

    class MaskRecorder(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            masks.append(batch["attention_mask"].bool().numpy().copy())

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            masks.append(batch["attention_mask"].bool().numpy().copy())

    train = DataLoader(VariableLengthTokens(12, seed=3), batch_size=4, collate_fn=pad_batch)
    val = DataLoader(VariableLengthTokens(8, seed=4), batch_size=4, collate_fn=lambda b: pad_batch(b, "left"))
    trainer = lightning_trainer(
        tmp_path, callback, callbacks=[MaskRecorder(), callback], logger=False, default_root_dir=str(tmp_path)
    )
    trainer.fit(module, train, val)
    assert len(masks) == len(records)
    savefile = callback.tracker.savefile
    assert savefile == os.path.join(str(tmp_path), "saturation")
    for epoch in (0, 1):
        for mode in ("train", "eval"):
            rows = [
                out[mask]
                for (sanity, e, m, out), mask in zip(records, masks)
                if not sanity and e == epoch and m == mode
            ]
            assert len(rows) == (3 if mode == "train" else 2)
            key = f"{mode}-covariance-matrix_proj"
            saved = np.load(os.path.join(savefile, key, f"{key}_epoch{epoch}.npy"))
            assert rel_err(saved, np_cov(np.concatenate(rows))) < 1e-6, (epoch, mode)


@pytest.mark.parametrize("use_attention_mask", [True, False], ids=["mask_on", "mask_off"])
def test_lightning_callback_mask_can_be_turned_off(tmp_path, use_attention_mask):
    # The callback driven through its Lightning hooks: one epoch of two padded mapping batches.
    from types import SimpleNamespace

    torch.manual_seed(1)
    module = PaddedTagger()
    outputs = []
    module.proj.register_forward_hook(lambda m, inputs, out: outputs.append(out.detach().double().numpy()))
    callback = LightningSaturation(
        nosave=True, stats=["cov"], timeseries_method="timestepwise", use_attention_mask=use_attention_mask
    )
    trainer = SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), current_epoch=0, enable_validation=False, loggers=[]
    )
    callback.on_train_start(trainer, module)
    callback.on_train_epoch_start(trainer, module)
    dataset = VariableLengthTokens(8, seed=5)
    masks = []
    for start in (0, 4):
        batch = pad_batch([dataset[i] for i in range(start, start + 4)], side="left")
        masks.append(batch["attention_mask"].bool().numpy())
        callback.on_train_batch_start(trainer, module, batch, start // 4)
        module(batch["input_ids"])
        callback.on_train_batch_end(trainer, module, None, batch, start // 4)
    callback.on_train_epoch_end(trainer, module)
    callback.on_train_end(trainer, module)
    if use_attention_mask:
        rows = np.concatenate([out[mask] for out, mask in zip(outputs, masks)])
    else:
        rows = np.concatenate([out.reshape(-1, 5) for out in outputs])
    assert rel_err(callback.history[0]["train-covariance-matrix_proj"], np_cov(rows)) < 1e-6
