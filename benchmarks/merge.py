"""What the epoch-end merge of a distributed run costs: collective calls, bytes each rank receives, time.

    python benchmarks/merge.py                       # gloo on this machine, world sizes 2 and 4
    python benchmarks/merge.py --worlds 2,4,8 --json
    python benchmarks/merge.py --device cuda         # accumulators on the GPU, gloo messages on the host
    python benchmarks/merge.py --backend nccl        # one GPU per rank, CUDA messages

Each rank fills one accumulator per layer and mode of a 12-layer model (widths up to
1024, both modes: 24 accumulators) with rows of its own, then times
:func:`delve.distributed.synchronize`, the merge ``add_saturations()`` runs, with
torch.distributed's collectives wrapped to count the calls and the bytes each rank
receives (the tensors a call hands back, not what the backend's algorithm moves
underneath). Beside them it prints the figures of the merge this one replaced, which
gathered every rank's full matrices (two ``all_gather`` per accumulator): computed from
the widths, not run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from machine import cpu_name

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from delve import TorchCovarianceMatrix  # noqa: E402
from delve import distributed as delve_dist  # noqa: E402

WIDTHS = (1024, 1024, 1024, 512, 512, 512, 256, 256, 256, 128, 64, 10)
MODES = ("train", "eval")


def former_merge(widths, world: int) -> Dict[str, int]:
    """Calls and bytes received per rank by the former merge: per accumulator, an all_gather of
    the widths, then one of ``2 + d + d²`` float64 from every rank."""
    calls = 2 * len(widths) * len(MODES)
    received = len(MODES) * sum(world * 8 + world * 8 * (2 + d + d * d) for d in widths)
    return {"calls": calls, "bytes": received}


def _fill(widths, rows: int, rank: int, device: torch.device) -> Dict:
    gen = torch.Generator().manual_seed(rank)
    accs = {}
    for i, width in enumerate(widths):
        for mode in MODES:
            acc = TorchCovarianceMatrix(device=device)
            x = torch.randn(rows + rank, width, generator=gen) * (1 + i) + rank
            acc.update(x.to(device))
            accs[(f"layer{i}", mode)] = acc
    return accs


def _wrap_collectives(log: List) -> None:
    """Make every call of dist.all_reduce append (bytes received, seconds spent)."""
    original = dist.all_reduce

    def timed(tensor, *args, **kwargs):
        start = time.perf_counter()
        out = original(tensor, *args, **kwargs)
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
        log.append((tensor.numel() * tensor.element_size(), time.perf_counter() - start))
        return out

    dist.all_reduce = timed
    for name in ("all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter", "all_to_all", "barrier"):
        original_other = getattr(dist, name)

        def noted(*args, _name=name, _original=original_other, **kwargs):
            log.append((_name, 0.0))  # not expected: show up in the report if it happens
            return _original(*args, **kwargs)

        setattr(dist, name, noted)


def _worker(rank: int, world: int, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(1)
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device(args.device)
    dist.init_process_group(
        args.backend, init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank, world_size=world
    )
    try:
        accs = _fill(WIDTHS[: args.layers], args.rows, rank, device)
        delve_dist.synchronize(accs)  # warm-up: first-call costs of the backend
        log: List = []
        times = []
        _wrap_collectives(log)
        for _ in range(args.repeats):
            dist.barrier()
            log.clear()
            start = time.perf_counter()
            merged = delve_dist.synchronize(accs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            del merged
        unexpected = [entry[0] for entry in log if isinstance(entry[0], str) and entry[0] != "barrier"]
        result = {
            "rank": rank,
            "calls": sum(1 for entry in log if not isinstance(entry[0], str)),
            "bytes": sum(entry[0] for entry in log if not isinstance(entry[0], str)),
            "collective_s": sum(entry[1] for entry in log if not isinstance(entry[0], str)),
            "merge_s": statistics.median(times),
            "unexpected": unexpected,
        }
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> Dict:
    """Spawn ``world`` ranks, merge, and return the slowest rank's figures."""
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(world, args, folder), nprocs=world, start_method="spawn")
        ranks = []
        for rank in range(world):
            with open(os.path.join(folder, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    widths = WIDTHS[: args.layers]
    return {
        "world": world,
        "accumulators": len(widths) * len(MODES),
        "calls": max(r["calls"] for r in ranks),
        "bytes_per_rank": max(r["bytes"] for r in ranks),
        "merge_s": max(r["merge_s"] for r in ranks),
        "collective_s": max(r["collective_s"] for r in ranks),
        "unexpected_collectives": sorted({name for r in ranks for name in r["unexpected"]}),
        "former": former_merge(widths, world),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--device", default="cpu", help="where the accumulators live with gloo")
    parser.add_argument("--layers", type=int, default=len(WIDTHS), help=f"the first N of the widths {WIDTHS}")
    parser.add_argument("--rows", type=int, default=256, help="rows each rank feeds each accumulator")
    parser.add_argument("--repeats", type=int, default=5, help="timed merges (the median is reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    results = [run_world(int(world), args) for world in args.worlds.split(",")]
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "backend": args.backend,
        "device": "cuda (one GPU per rank)" if args.backend == "nccl" else args.device,
        "widths": list(WIDTHS[: args.layers]),
    }
    if args.json:
        print(json.dumps({"machine": info, "results": results}, indent=1))
        return 0
    print("delve epoch-end merge (delve.distributed.synchronize)")
    print(f"  {info['date']}  torch {info['torch']}  backend {info['backend']}  accumulators on {info['device']}")
    print(f"  cpu: {info['cpu']}, {info['cores']} cores (ranks above that share cores)")
    print(f"  {len(info['widths'])} layers x 2 modes, widths {info['widths']}")
    print()
    print("| world | calls | received per rank | merge time | in collectives | former merge: calls, received |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['world']} | {r['calls']} | {r['bytes_per_rank'] / 2**20:.1f} MiB | {r['merge_s'] * 1e3:.0f} ms "
            f"| {r['collective_s'] * 1e3:.0f} ms | {r['former']['calls']}, {r['former']['bytes'] / 2**20:.1f} MiB |"
        )
        if r["unexpected_collectives"]:
            print(f"  also called: {r['unexpected_collectives']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
