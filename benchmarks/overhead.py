"""What tracking costs: step time with and without a tracker, against the Gram products it must compute.

Run ``python benchmarks/overhead.py`` (add ``--json`` for machine-readable output,
``--device cuda`` on a GPU). For each model it reports

* the median time of a training step (forward, backward, optimizer step) without and
  with a tracker (``nosave=True``, stats ``lsat`` + ``idim``, every Linear/Conv/LSTM
  layer tracked). Blocks of untracked and tracked steps alternate, on two copies of
  the same model, so that drift of a shared machine hits both alike;
* the bare float32 Gram time: ``X.T @ X`` on the data matrices of the same layers,
  already materialised, timed in the same rounds. An exact tracker has to compute
  these products, so ``extra / gram`` says how close it comes to that floor (below 1
  is possible: the tracker computes only one triangle of each symmetric product);
* the time spent inside the tracker's hooks per step (CPU only). On a shared machine
  the difference of two step times is noisy; this is the steadier number;
* the forward pass and the rest of the step timed apart (CPU only), which shows
  whether tracking costs anything outside its hooks;
* the epoch-end time (``add_saturations``) against running ``torch.linalg.eigh`` twice
  per tracked layer on covariances of the same sizes;
* the extra memory the tracker holds (accumulators and shared workspace; on a GPU also
  the growth of the step's peak allocation).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from machine import describe  # noqa: E402

from delve import (
    CheckLayerSat,  # noqa: E402
    gram,  # noqa: E402
    schedule,  # noqa: E402
)
from delve.covariance import product_dtype  # noqa: E402
from delve.layers import to_data_rows  # noqa: E402
from delve.recorder import Recorder  # noqa: E402

# ----------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity or 1×1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetLike(nn.Module):
    """A CIFAR-style residual network: a stem, one stage per width, pooling, an MLP head."""

    def __init__(self, widths=(64, 128, 256), blocks=1, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stages.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, cin), nn.ReLU(), nn.Linear(cin, classes)
        )

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block written with plain Linear layers (q, k, v, out, two FFN)."""

    def __init__(self, width=768, hidden=3072, heads=12):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.ffn1, self.ffn2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        b, t, w = x.shape
        h = self.norm1(x)

        def split(y):
            return y.view(b, t, self.heads, w // self.heads).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.out(att.transpose(1, 2).reshape(b, t, w))
        return x + self.ffn2(nn.functional.gelu(self.ffn1(self.norm2(x))))


class LSTMModel(nn.Module):
    """Two stacked LSTM layers (time-major, as nn.LSTM defaults to) and a linear read-out."""

    def __init__(self, features=64, hidden=256, classes=10):
        super().__init__()
        self.lstm1 = nn.LSTM(features, hidden)
        self.lstm2 = nn.LSTM(hidden, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm1(x)
        out, _ = self.lstm2(out)
        return self.fc(out[-1])


def make_case(name: str, device: torch.device) -> Dict:
    """Return the model, a batch, the loss and the tracker options of one benchmark case."""
    gen = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    if name == "cnn":
        if cuda:  # ResNet-18 widths and depth, CIFAR-sized input
            model, batch, label = ResNetLike((64, 128, 256, 512), blocks=2), 256, "ResNet-18 CNN, 32x32, batch 256"
        else:
            model, batch, label = ResNetLike(), 64, "ResNet-like CNN, 32x32, batch 64"
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        return dict(label=label, model=model, x=x, y=y, loss=nn.CrossEntropyLoss(), options={})
    if name == "transformer":
        batch, steps = (32, 256) if cuda else (8, 64)
        x = torch.randn(batch, steps, 768, generator=gen)
        y = torch.randn(batch, steps, 768, generator=gen)
        label = f"transformer block, (B, T) = ({batch}, {steps}), 768/3072, timestepwise"
        return dict(
            label=label, model=TransformerBlock(), x=x, y=y, loss=nn.MSELoss(),
            options=dict(timeseries_method="timestepwise"),
        )
    if name == "lstm":
        batch, steps = (256, 100) if cuda else (64, 50)
        x = torch.randn(steps, batch, 64, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        label = f"2-layer LSTM 64->256, (T, B) = ({steps}, {batch}), timestepwise"
        return dict(
            label=label, model=LSTMModel(), x=x, y=y, loss=nn.CrossEntropyLoss(),
            options=dict(timeseries_method="timestepwise"),
        )
    raise ValueError(f"unknown case {name!r}")


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _data_matrices(model: nn.Module, tracker: CheckLayerSat, x: torch.Tensor) -> Tuple[List[torch.Tensor], Dict]:
    """Materialise the (rows, features) float32 matrix of every tracked layer for one batch.

    Also return each layer's product signature: that of the rows the tracker multiplies
    (a view of the output, as :func:`delve.layers.to_data_rows` gives it).
    """
    captured: List[torch.Tensor] = []
    signatures: Dict[str, Tuple] = {}
    handles = []
    for name, layer in tracker.layers.items():

        def hook(module, inputs, output, name=name):
            with torch.no_grad():
                rows, _ = to_data_rows(
                    module, output, tracker.conv_method, tracker.timeseries_method,
                    tracker.interpolation_strategy, tracker.interpolation_downsampling,
                )
                work = product_dtype(rows.dtype, rows.shape[-1], tracker.float64_products)
                signatures[name] = gram.product_signature(rows, work)
                captured.append(rows.detach().reshape(-1, rows.shape[-1]).to(torch.float32).contiguous())

        handles.append(layer.register_forward_hook(hook))
    was_recording = tracker.is_recording()
    tracker.stop()
    with torch.no_grad():
        model(x)
    if was_recording:
        tracker.resume()
    for handle in handles:
        handle.remove()
    return captured, signatures


def _gram_pass(matrices: List[torch.Tensor]) -> None:
    for matrix in matrices:
        matrix.T @ matrix


def _eigh_pass(covariances: List[torch.Tensor]) -> None:
    for cov in covariances:
        torch.linalg.eigh(cov)
        torch.linalg.eigh(cov)


def _tracker_bytes(tracker: CheckLayerSat) -> int:
    return sum(acc.nbytes for acc in _accumulators(tracker))


def _accumulators(tracker: CheckLayerSat):
    return [tracker.accumulator(name, mode) for name in tracker.layers for mode in tracker.config.modes]


def _products(signatures: Dict[str, Tuple]) -> Dict[str, str]:
    """Return, per tracked layer, the Gram product its batches use and why (the times that decided it)."""
    out = {}
    for name, signature in signatures.items():
        rows, features, layout = signature[:3]
        decision = gram.product_decision(signature) or "still being timed"
        out[name] = f"{rows} rows x {features}, {layout}-major: {decision}"
    return out


class HookClock:
    """Time spent inside the tracker's hooks, charged to whichever run is stepping (:attr:`current`)."""

    def __init__(self):
        self.current: Optional[str] = None
        self.spent: Dict[Optional[str], float] = {}
        self._record = Recorder.record

    def start(self) -> None:
        """Time every call of ``Recorder.record`` from now on."""
        record = self._record

        def timed(recorder, *args):
            start = time.perf_counter()
            record(recorder, *args)
            self.spent[self.current] = self.spent.get(self.current, 0.0) + time.perf_counter() - start

        Recorder.record = timed

    def stop(self) -> None:
        """Put ``Recorder.record`` back as it was."""
        Recorder.record = self._record

    def __enter__(self) -> HookClock:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_case(name: str, device: torch.device, rounds: int, block: int, warmup: int, epoch_repeats: int) -> Dict:
    """Benchmark one model; return a dict of the measured quantities (seconds, bytes)."""
    gram.release_workspace()  # the workspace is per process: count this case's only
    case = make_case(name, device)
    tracked_model = case["model"].to(device)
    plain_model = copy.deepcopy(tracked_model)
    x, y, loss_fn, label = case["x"].to(device), case["y"].to(device), case["loss"], case["label"]
    tracker = CheckLayerSat(
        "unused", "csv", tracked_model, stats=["lsat", "idim"], nosave=True, **case["options"]
    )
    optims = {
        "plain": torch.optim.SGD(plain_model.parameters(), lr=1e-3, momentum=0.9),
        "tracked": torch.optim.SGD(tracked_model.parameters(), lr=1e-3, momentum=0.9),
    }
    models = {"plain": plain_model, "tracked": tracked_model}
    del case

    # Time spent inside the tracker's hooks, per step: on a shared machine this is far
    # steadier than the difference of two step times. On a GPU it would only time the
    # kernel launches, so it is measured on the CPU alone.
    hooks = HookClock()
    if device.type == "cpu":
        hooks.start()

    # The forward pass timed apart (CPU only, like the hooks): whether tracking slows the
    # rest of the step too (through the caches, say) or only the forward pass it hooks.
    forward_time = {"plain": [0.0], "tracked": [0.0]}

    def step(kind: str) -> None:
        model, optim = models[kind], optims[kind]
        optim.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = loss_fn(model(x), y)
        forward_time[kind][0] += time.perf_counter() - start
        loss.backward()
        optim.step()

    # Warm-up: allocator pools, kernel selection, the accumulators' first allocation.
    for _ in range(warmup):
        step("plain")
        step("tracked")
    _sync(device)
    # Covariances of the real activations, for the eigh reference.
    covariances = [acc.fix() for acc in _accumulators(tracker) if acc.dim is not None]
    tracker.add_saturations()
    # The epoch-end schedule is timed on the first epoch ends: run them before timing one,
    # so the figures are those of a long run.
    wide = max(c.shape[0] for c in covariances) > 1024
    for _ in range(0 if wide else 4):
        with torch.no_grad():
            tracked_model(x)
        tracker.add_saturations()
    matrices, signatures = _data_matrices(tracked_model, tracker, x)
    if wide:
        epoch_repeats = 1  # two eigh of a 3072-wide covariance take most of a minute on two cores

    peak: Dict[str, int] = {}
    names = ("plain", "tracked", "hooks", "gram", "epoch", "eigh")
    names += tuple(f"{part}_{kind}" for part in ("fwd", "rest") for kind in ("plain", "tracked"))
    times: Dict[str, List[float]] = {name: [] for name in names}
    paired: List[float] = []  # per round: tracked / untracked
    paired_extra: List[float] = []  # per round: tracked - untracked
    for r in range(rounds):
        block_times = {}
        # Alternate which kind goes first, so neither always follows the other.
        for kind in (("plain", "tracked") if r % 2 == 0 else ("tracked", "plain")):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            forward_time[kind][0] = 0.0
            hooks.current = kind
            hooks.spent.clear()
            block_times[kind] = [_timed(lambda k=kind: step(k), device) for _ in range(block)]
            if device.type == "cpu":
                if kind == "tracked":  # only the tracked model has hooks
                    times["hooks"].append(hooks.spent.get(kind, 0.0) / block)
                times["fwd_" + kind].append(forward_time[kind][0] / block)
                times["rest_" + kind].append((sum(block_times[kind]) - forward_time[kind][0]) / block)
            times[kind] += block_times[kind]
            if device.type == "cuda":
                peak[kind] = max(peak.get(kind, 0), torch.cuda.max_memory_allocated(device))
        tracked_block, plain_block = statistics.median(block_times["tracked"]), statistics.median(block_times["plain"])
        paired.append(tracked_block / plain_block)
        paired_extra.append(tracked_block - plain_block)
        times["gram"].append(_timed(lambda: _gram_pass(matrices), device))
        # Epoch ends in the last rounds only: for wide layers one costs seconds.
        if r >= rounds - epoch_repeats:
            times["epoch"].append(_timed(lambda: tracker.add_saturations(), device))
            times["eigh"].append(_timed(lambda: _eigh_pass(covariances), device))
    products = _products(signatures)
    widths = tuple(sorted(acc.dim for acc in _accumulators(tracker) if acc.dim is not None))
    epoch_schedule = schedule.SCHEDULES.decision((widths, torch.get_num_threads()))
    workspace = gram.workspace_bytes() if device.type == "cpu" else 0
    tracker.close()
    hooks.stop()

    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    # Differences within a round, where both kinds ran within seconds of each other, cancel the
    # drift of a shared machine better than the difference of two overall medians.
    extra = statistics.median(paired_extra)
    result = dict(
        case=name,
        label=label,
        layers=len(tracker.layers),
        untracked_s=med["plain"],
        tracked_s=med["tracked"],
        ratio=med["tracked"] / med["plain"],
        ratio_paired=statistics.median(paired),
        extra_s=extra,
        gram_s=med["gram"],
        extra_over_gram=extra / med["gram"],
        hooks_s=med["hooks"],
        hooks_over_gram=med["hooks"] / med["gram"],
        forward_untracked_s=med["fwd_plain"],
        forward_tracked_s=med["fwd_tracked"],
        rest_untracked_s=med["rest_plain"],
        rest_tracked_s=med["rest_tracked"],
        gram_over_untracked=med["gram"] / med["plain"],
        epoch_end_s=med["epoch"],
        two_eigh_s=med["eigh"],
        epoch_over_two_eigh=med["epoch"] / med["eigh"],
        accumulator_bytes=_tracker_bytes(tracker),
        # While a batch is merged: its Gram matrix (float64 once summed over row blocks).
        transient_bytes=8 * max(c.shape[0] for c in covariances) ** 2,
        workspace_bytes=workspace,
        steps_per_kind=len(times["plain"]),
        products=products,
        epoch_schedule=repr(epoch_schedule) if epoch_schedule is not None else "sequential (not timed)",
    )
    if device.type == "cuda":
        result["peak_growth_bytes"] = peak["tracked"] - peak["plain"]
    return result


# ----------------------------------------------------------------------------- report


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_report(info: Dict, results: List[Dict]) -> None:
    print("delve tracking overhead")
    print(
        f"  {info['date']}  torch {info['torch']}  python {info['python']}  device {info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else "")
    )
    print(f"  cpu: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads")
    for r in results:
        print()
        print(f"{r['label']}  ({r['layers']} tracked layers, {r['steps_per_kind']} steps of each kind)")
        print(f"  step untracked       {r['untracked_s'] * 1e3:9.2f} ms")
        print(
            f"  step tracked         {r['tracked_s'] * 1e3:9.2f} ms   ratio {r['ratio']:.3f}"
            f" (median of per-round ratios {r['ratio_paired']:.3f})"
        )
        print(
            f"  bare float32 Gram    {r['gram_s'] * 1e3:9.2f} ms   "
            f"({100 * r['gram_over_untracked']:.1f} % of the untracked step)"
        )
        print(
            f"  tracked - untracked  {r['extra_s'] * 1e3:9.2f} ms   = {r['extra_over_gram']:.2f} x the bare Gram"
            " (median of per-round differences)"
        )
        if r["hooks_s"] == r["hooks_s"]:  # NaN where not measured (GPU)
            print(f"  inside the hooks     {r['hooks_s'] * 1e3:9.2f} ms   = {r['hooks_over_gram']:.2f} x the bare Gram")
        if r["forward_tracked_s"] == r["forward_tracked_s"]:
            print(
                f"  forward pass         {r['forward_untracked_s'] * 1e3:9.2f} -> {r['forward_tracked_s'] * 1e3:.2f} ms"
                f"   rest of the step {r['rest_untracked_s'] * 1e3:.2f} -> {r['rest_tracked_s'] * 1e3:.2f} ms"
            )
        print(
            f"  epoch end            {r['epoch_end_s'] * 1e3:9.2f} ms   vs two eigh per layer "
            f"{r['two_eigh_s'] * 1e3:.2f} ms  (ratio {r['epoch_over_two_eigh']:.2f})"
        )
        print(f"  epoch-end schedule   {r['epoch_schedule']}")
        print("  Gram product per layer (rows rounded up to a power of two):")
        for layer, product in r["products"].items():
            print(f"    {layer:28s} {product}")
        line = f"  tracker memory       {_mib(r['accumulator_bytes'])} accumulators"
        line += f" + {_mib(r['workspace_bytes'])} shared workspace + {_mib(r['transient_bytes'])} per batch"
        if "peak_growth_bytes" in r:
            line += f"; peak allocation grows by {_mib(r['peak_growth_bytes'])}"
        print(line)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--sampling"]:  # the transformer's epoch under rows_per_batch / log_interval, its own options
        from sampling import main as sampling_main

        return sampling_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--cases", default="cnn,transformer,lstm", help="comma-separated: cnn, transformer, lstm")
    parser.add_argument("--rounds", type=int, default=8, help="alternations of untracked and tracked blocks")
    parser.add_argument("--block", type=int, default=4, help="steps per block")
    parser.add_argument(
        "--warmup", type=int, default=6, help="untimed steps of each kind first (the Gram products are timed in them)"
    )
    parser.add_argument("--epoch-repeats", type=int, default=3, help="rounds that also time an epoch end")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = describe(device)
    results = [
        run_case(name.strip(), device, args.rounds, args.block, args.warmup, min(args.epoch_repeats, args.rounds))
        for name in args.cases.split(",")
        if name.strip()
    ]
    if args.json:
        # NaN (a quantity not measured on this device) is not JSON: write null.
        clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in results]
        print(json.dumps(dict(machine=info, results=clean), indent=2))
    else:
        print_report(info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
