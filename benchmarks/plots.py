"""What the plot writer costs per epoch, against drawing the per-epoch bar charts alone.

Run ``python benchmarks/plots.py`` (``--json`` for machine-readable output). For each
number of layers it feeds the same epochs of saturation values (the tracker's default
``stats=["lsat"]``, train and eval) to several writers in lockstep and times each
writer's ``save()`` at every epoch and its ``close()``:

* ``bars only``: the CSV and one bar chart per statistic and mode for the new epoch,
  which is what the last release drew at every epoch. This is the baseline;
* ``plot writer, history_every=N``: :class:`delve.writers.CSVandPlottingWriter`, which
  also draws the layers × epochs heatmaps at ``close()`` and redraws them every ``N``
  epochs (``None``, the default: at ``close()`` only; ``1``: at every epoch, as the
  writer did before ``history_every`` existed).

The writers take turns in an order that rotates every epoch, so the drift of a shared
machine hits all of them alike. Both the wall-clock time and the process's CPU time
are reported; on a machine shared with other work the CPU time is the steadier one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from machine import describe, load_average  # noqa: E402

from delve import plotting  # noqa: E402
from delve.keys import MODES, layer_key  # noqa: E402
from delve.writers import CSVandPlottingWriter, CSVWriter  # noqa: E402


class BarsOnly(CSVWriter):
    """The CSV and the per-epoch bar charts of each new epoch: what the last release drew."""

    def __init__(self, savepath: str):
        super().__init__(savepath)
        self._new: List[int] = []

    def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
        super().add_scalars(prefix, value_dict, global_step=global_step, **kwargs)
        self._new.append(int(global_step))

    def save(self):
        super().save()
        plotting.plot_epochs(self.table(), self.savepath, epochs=self._new)
        self._new = []


def epoch_values(layers: int, epoch: int, generator: np.random.Generator) -> Dict[str, float]:
    """Saturations of every layer in both modes, drifting over the epochs like a real run's."""
    values = {}
    for mode in MODES:
        for layer in range(layers):
            base = 0.3 + 0.5 * layer / max(layers - 1, 1)
            values[layer_key(mode, "lsat", f"layer-{layer}")] = float(
                np.clip(base + 0.1 * np.sin(epoch / 7 + layer) + 0.02 * generator.standard_normal(), 0, 1)
            )
    return values


def warm_up(folder: str) -> None:
    """Draw one bar chart and one heatmap untimed: matplotlib's imports and font cache are paid here."""
    writer = CSVandPlottingWriter(os.path.join(folder, "warm-up", "run"), history_every=1)
    writer.add_scalars("", epoch_values(2, 0, np.random.default_rng(0)), global_step=0)
    writer.save()
    writer.close()


def measure(layers: int, epochs: int, every: List[Optional[int]], folder: str) -> List[Dict]:
    """Run the writers over ``epochs`` epochs of ``layers`` layers; return their timings."""
    writers = {"bars only": BarsOnly(os.path.join(folder, f"{layers}-bars", "run"))}
    for n in every:
        name = f"plot writer, history_every={n}"
        writers[name] = CSVandPlottingWriter(os.path.join(folder, f"{layers}-every-{n}", "run"), history_every=n)
    times = {name: {"wall": [], "cpu": []} for name in writers}
    generator = np.random.default_rng(layers)
    names = list(writers)
    for epoch in range(epochs):
        values = epoch_values(layers, epoch, generator)
        shift = epoch % len(names)
        for name in names[shift:] + names[:shift]:
            writer = writers[name]
            writer.add_scalar("loss", 1.0 / (epoch + 1), global_step=epoch)
            writer.add_scalars("", values, global_step=epoch)
            wall, cpu = time.perf_counter(), time.process_time()
            writer.save()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    results = []
    for name, writer in writers.items():
        wall, cpu = time.perf_counter(), time.process_time()
        writer.close()
        close_wall, close_cpu = time.perf_counter() - wall, time.process_time() - cpu
        folder_of = os.path.dirname(writer.savepath)
        results.append(
            dict(
                writer=name,
                layers=layers,
                epochs=epochs,
                epoch_wall_s=statistics.fmean(times[name]["wall"]),
                epoch_cpu_s=statistics.fmean(times[name]["cpu"]),
                median_epoch_wall_s=statistics.median(times[name]["wall"]),
                max_epoch_wall_s=max(times[name]["wall"]),
                close_wall_s=close_wall,
                close_cpu_s=close_cpu,
                run_wall_per_epoch_s=(sum(times[name]["wall"]) + close_wall) / epochs,
                pictures=sum(name.endswith(".png") for name in os.listdir(folder_of)),
            )
        )
    base = results[0]
    for result in results:
        result["ratio_cpu"] = result["epoch_cpu_s"] / base["epoch_cpu_s"]
        result["ratio_wall"] = result["epoch_wall_s"] / base["epoch_wall_s"]
    return results


def print_report(info: Dict, results: List[Dict]) -> None:
    load = info.get("load_average")
    print("delve plot writer: time of save() per epoch and of close()")
    print(f"{info['date']}  CPU: {info['cpu']} ({info['cores']} cores)  Python {info['python']}  "
          f"matplotlib {info['matplotlib']}")
    if load:
        print(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
              f", at the end: {info['load_average_end'][0]:.2f}")
    print()
    header = (f"{'layers':>6}  {'writer':<32} {'epoch (wall)':>12} {'epoch (CPU)':>11} {'vs bars (CPU)':>13} "
              f"{'vs bars (wall)':>14} {'slowest epoch':>13} {'close()':>8} {'pictures':>8}")
    print(header)
    for r in results:
        cells = [
            f"{r['layers']:>6}  {r['writer']:<32}",
            f"{r['epoch_wall_s'] * 1e3:>9.0f} ms",
            f"{r['epoch_cpu_s'] * 1e3:>8.0f} ms",
            f"{r['ratio_cpu']:>13.2f}",
            f"{r['ratio_wall']:>14.2f}",
            f"{r['max_epoch_wall_s'] * 1e3:>10.0f} ms",
            f"{r['close_wall_s'] * 1e3:>5.0f} ms",
            f"{r['pictures']:>8}",
        ]
        print(" ".join(cells))


def parse_every(text: str) -> List[Optional[int]]:
    return [None if part.strip().lower() == "none" else int(part) for part in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60, help="epochs per run (default 60)")
    parser.add_argument("--layers", default="2,10", help="comma-separated layer counts (default 2,10)")
    parser.add_argument("--every", default="none,1,10,25", type=str,
                        help="comma-separated history_every values of the plot writers; 'none' (the default "
                             "of the writer): at close() only (default: none,1,10,25)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    import matplotlib

    info = describe(matplotlib=matplotlib.__version__)
    results = []
    with tempfile.TemporaryDirectory(prefix="delve-plots-") as folder:
        warm_up(folder)
        for layers in (int(n) for n in args.layers.split(",")):
            results += measure(layers, args.epochs, parse_every(args.every), folder)
    info["load_average_end"] = load_average()
    if args.json:
        print(json.dumps({"machine": info, "results": results}, indent=1))
    else:
        print_report(info, results)


if __name__ == "__main__":
    main()
