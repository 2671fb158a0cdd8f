"""Fewer rows per batch on a transformer block: what rows_per_batch and log_interval save, and what they cost.

Run ``python benchmarks/sampling.py`` (or ``python benchmarks/overhead.py --sampling``),
``--batches 50`` for a shorter epoch, ``--json`` for machine-readable output. The
transformer block of ``overhead.py`` (width 768, hidden 3072, (B, T) = (8, 64), every
Linear tracked ``timestepwise``, so a batch gives B·T = 512 rows per layer) is trained
for one epoch of fresh synthetic batches, in several copies that start from the same
weights and take the same batches in lockstep:

* untracked;
* tracked exactly (``rows_per_batch=None``): the reference;
* ``rows_per_batch`` = rows/4 and rows/16 (128 and 32 of the 512 rows of each batch);
* ``log_interval`` = 4 and 16, which record as many rows per epoch as those two.

Every round steps each copy once, in an order that rotates from round to round, so the
drift of a shared machine hits all of them alike. For each setting it prints the time
of a training step against the untracked copy (the median, over blocks of 16 rounds, of
the ratio of the blocks' total times: a block holds the same number of recorded steps
for every ``log_interval``), the time spent inside the tracker's hooks, the epoch-end
time (``add_saturations``, not part of a step), and per layer |Δ lsat| and |Δ idim|
against the exact run after the epoch. Tracking changes no weight, so the copies stay
identical (checked) and the only difference between the runs is which rows are recorded.

The synthetic tokens are not white noise: their features have a power-law spectrum and
the tokens of a sequence share a component, as the tokens of a text do, so the
saturation is neither trivially 1 nor blind to where the rows come from.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import describe  # noqa: E402
from overhead import HookClock, TransformerBlock  # noqa: E402

from delve import CheckLayerSat  # noqa: E402
from delve.keys import layer_key  # noqa: E402

#: Rounds per timing block: a multiple of every log_interval measured.
BLOCK = 16


def settings(rows: int, fractions: Sequence[int]) -> List[Dict]:
    """Return the runs: untracked, exact, then rows_per_batch and log_interval for each fraction."""
    runs = [dict(name="untracked", tracked=False), dict(name="exact", tracked=True, options={})]
    for fraction in fractions:
        runs.append(dict(name=f"rows_per_batch={rows // fraction} (rows/{fraction})", tracked=True,
                         options=dict(rows_per_batch=max(1, rows // fraction))))
    for fraction in fractions:
        runs.append(dict(name=f"log_interval={fraction}", tracked=True, options=dict(log_interval=fraction)))
    return runs


class Batches:
    """Fresh batches of tokens from a seeded generator: every run of the benchmark gets the same ones."""

    def __init__(self, batch: int, steps: int, width: int, seed: int = 1):
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = (batch, steps, width)
        # A power-law spectrum over the features, and a component each sequence's tokens share.
        self.scales = torch.arange(1, width + 1, dtype=torch.float32) ** -0.5
        self.scales *= width**0.5 / self.scales.norm()

    def next(self):
        batch, steps, width = self.shape
        shared = torch.randn(batch, 1, width, generator=self.generator)
        own = torch.randn(batch, steps, width, generator=self.generator)
        x = (0.6 * shared + 0.8 * own) * self.scales
        return x, torch.randn(batch, steps, width, generator=self.generator)


def train_in_lockstep(runs: List[Dict], batches: Batches, count: int, warmup: int, clock: HookClock) -> None:
    """Step every run once per batch (order rotating); keep each run's step times after ``warmup`` rounds."""
    loss_fn = nn.MSELoss()
    for run in runs:
        run["times"] = []
    for index in range(count):
        x, y = batches.next()  # made outside the timed steps
        shift = index % len(runs)
        for run in runs[shift:] + runs[:shift]:
            clock.current = run["name"]
            model, optimizer = run["model"], run["optimizer"]
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
            elapsed = time.perf_counter() - start
            if index >= warmup:
                run["times"].append(elapsed)
        if index + 1 == warmup:
            clock.spent.clear()


def block_ratio(times: List[float], base: List[float]) -> float:
    """Median over blocks of :data:`BLOCK` rounds of (this run's block time / the untracked run's)."""
    blocks = max(1, len(times) // BLOCK)
    size = len(times) // blocks
    ratios = [
        sum(times[b * size : (b + 1) * size]) / sum(base[b * size : (b + 1) * size]) for b in range(blocks)
    ]
    return statistics.median(ratios)


def layer_values(values: Dict, layers: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Per layer, the train lsat and idim an epoch reported (NaN for a layer that recorded nothing)."""
    return {
        layer: {stat: float(values.get(layer_key("train", stat, layer), math.nan)) for stat in ("lsat", "idim")}
        for layer in layers
    }


def without_nan(value):
    """Return ``value`` with every NaN replaced by ``None``: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


# long: one experiment, set up, run and summarised in order
def run_sampling(
    batches: int = 200,
    width: int = 768,
    hidden: int = 3072,
    heads: int = 12,
    batch: int = 8,
    steps: int = 64,
    fractions: Sequence[int] = (4, 16),
    warmup: int = 8,
) -> Dict:
    """Train the block for one epoch under every setting; return the timings and the per-layer |Δ|.

    Returns
    -------
    dict
        ``settings`` (what was run) and ``runs``: per run its ``name``, options, step
        time, ``overhead`` (block-median ratio − 1), hook time, epoch-end time, and for
        tracked runs per-layer ``lsat``/``idim`` and ``delta_lsat``/``delta_idim``
        (absolute differences from the exact run), plus ``identical_weights``.

    """
    rows = batch * steps  # a timestepwise Linear on (B, T, F): one row per token
    warmup = min(warmup, max(0, batches - 1))
    torch.manual_seed(0)
    initial = TransformerBlock(width, hidden, heads)
    runs = settings(rows, fractions)
    for run in runs:
        run["model"] = copy.deepcopy(initial)
        run["optimizer"] = torch.optim.SGD(run["model"].parameters(), lr=1e-3, momentum=0.9)
        if run["tracked"]:
            run["tracker"] = CheckLayerSat(
                "unused", "csv", run["model"], stats=["lsat", "idim"], nosave=True,
                timeseries_method="timestepwise", **run["options"],
            )
    with HookClock() as clock:
        train_in_lockstep(runs, Batches(batch, steps, width), batches, warmup, clock)
    base = runs[0]["times"]
    results = []
    for run in runs:
        result = dict(
            name=run["name"], rows_per_batch=run.get("options", {}).get("rows_per_batch"),
            log_interval=run.get("options", {}).get("log_interval"),
            step_s=statistics.mean(run["times"]), overhead=block_ratio(run["times"], base) - 1,
            hooks_s=clock.spent.get(run["name"], 0.0) / len(run["times"]),
        )
        if run["tracked"]:
            tracker = run["tracker"]
            result["rows_recorded"] = tracker.accumulator(next(iter(tracker.layers))).count
            start = time.perf_counter()
            values = tracker.add_saturations()
            result["epoch_end_s"] = time.perf_counter() - start
            result["layers"] = layer_values(values, list(tracker.layers))
            tracker.close()
        results.append(result)
    exact = results[1]["layers"]
    for result in results[1:]:
        for stat in ("lsat", "idim"):
            result[f"delta_{stat}"] = {
                layer: abs(values[stat] - exact[layer][stat]) for layer, values in result["layers"].items()
            }
    reference = list(runs[0]["model"].parameters())
    identical = all(
        all(torch.equal(a, b) for a, b in zip(reference, run["model"].parameters())) for run in runs[1:]
    )
    return dict(
        settings=dict(batches=batches, width=width, hidden=hidden, heads=heads, batch=batch, steps=steps,
                      rows_per_batch_of_data=rows, warmup=warmup, timed_rounds=len(base)),
        runs=results, identical_weights=identical,
    )


def _largest(values) -> float:
    known = [value for value in values if not math.isnan(value)]
    return max(known) if known else math.nan


def _number(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def print_report(info: Dict, report: Dict) -> None:
    """Print the settings table and the per-layer table, in Markdown."""
    s = report["settings"]
    print("delve: fewer rows per batch on a transformer block (rows_per_batch against log_interval)")
    print(f"  {info['date']}  torch {info['torch']}  python {info['python']}")
    print(f"  cpu: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads"
          + (f", load average {info['load_average'][0]:.1f}" if info.get("load_average") else ""))
    print(f"  block {s['width']}/{s['hidden']}, (B, T) = ({s['batch']}, {s['steps']}): {s['rows_per_batch_of_data']} "
          f"rows per batch per layer; epoch of {s['batches']} batches, {s['timed_rounds']} rounds timed; "
          f"identical weights in every run: {report['identical_weights']}")
    print()
    print("| setting | rows recorded per layer | step | overhead | inside hooks | epoch end | max \\|Δ lsat\\| "
          "| max \\|Δ idim\\| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        cells = [r["name"], "–", f"{r['step_s'] * 1e3:.1f} ms", "–", "–", "–", "–", "–"]
        if "layers" in r:
            cells[1] = str(r["rows_recorded"])
            cells[3:] = [
                f"{100 * r['overhead']:+.1f} %", f"{r['hooks_s'] * 1e3:.1f} ms", f"{r['epoch_end_s']:.2f} s",
                _number(_largest(r["delta_lsat"].values()), ".4f"), _number(_largest(r["delta_idim"].values()), ".0f"),
            ]
        print("| " + " | ".join(cells) + " |")
    tracked = [r for r in report["runs"] if "layers" in r]
    print()
    print("| layer | exact lsat | exact idim | " + " | ".join(r["name"] for r in tracked[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(tracked) - 1))
    for layer, exact in tracked[0]["layers"].items():
        cells = [
            f"{_number(r['delta_lsat'][layer], '.4f')} / {_number(r['delta_idim'][layer], '.0f')}" for r in tracked[1:]
        ]
        print(f"| {layer} | {exact['lsat']:.4f} | {exact['idim']:.0f} | " + " | ".join(cells) + " |")
    print()
    print("Cells of the layer table: |Δ lsat| / |Δ idim| against the exact run.")


def main(argv=None) -> int:
    """Run the experiment from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="batches in the epoch (default 200)")
    parser.add_argument("--width", type=int, default=768, help="model width (default 768)")
    parser.add_argument("--hidden", type=int, default=3072, help="feed-forward width (default 3072)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads, dividing the width (default 12)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--steps", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--fractions", default="4,16", help="rows_per_batch = rows/f and log_interval = f")
    parser.add_argument("--warmup", type=int, default=8, help="first rounds left out of the timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = [int(f) for f in args.fractions.split(",") if f.strip()]
    info = describe()
    report = run_sampling(args.batches, args.width, args.hidden, args.heads, args.batch, args.steps, fractions,
                          args.warmup)
    if args.json:
        print(json.dumps(without_nan(dict(machine=info, **report)), indent=1))
    else:
        print_report(info, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
