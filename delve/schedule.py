"""How the epoch end's per-layer work is run: one layer after another, or several side by side.

Each layer's statistics come from one symmetric eigendecomposition, and LAPACK's
eigensolvers spend most of their time reducing the matrix to tridiagonal form, a
sequence of matrix-vector products that parallelise poorly: for covariances a few
hundred features wide, two threads barely beat one. Several layers are then better
solved side by side, one thread each, than one after the other on all threads; for a
few very wide layers it can be the other way round, by amounts that differ between
CPUs. :data:`SCHEDULES` times both on the first epoch ends (per set of widths; see
:mod:`delve.autotune`) and keeps the faster. ``DELVE_EPOCH_SCHEDULE=sequential`` or
``parallel`` forces one.

Side by side, each layer's work runs whole on its thread (its covariance is formed,
solved and reduced to statistics there, so no more covariances exist at once than
threads run). For that phase the calling thread sets torch's thread count to one,
which is process-wide for MKL, works as one of the solvers, waits for the others and
only then sets the count back: training resumes with exactly the setting it had.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Hashable, List, Mapping, Optional, TypeVar

import torch

from delve.autotune import Autotuner

__all__ = ["SCHEDULES", "run_all"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

#: Chooses between running the layers' jobs one after another on torch's threads
#: (``"sequential"``) and side by side on one thread each (``"parallel"``).
SCHEDULES = Autotuner("epoch-end schedule", ("sequential", "parallel"), env="DELVE_EPOCH_SCHEDULE")

_DONE = object()
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _workers(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(count, thread_name_prefix="delve-epoch")
            _pool_size = count
        return _pool


def _side_by_side(keys: List[K], jobs: Mapping[K, Callable[[], T]], threads: int) -> Dict[K, T]:
    """Run the jobs ``threads`` at a time, one thread each: the caller's and ``threads - 1`` workers'."""
    pending = iter(keys)
    lock = threading.Lock()
    results: Dict[K, T] = {}

    def drain() -> None:
        while True:
            with lock:
                key = next(pending, _DONE)
            if key is _DONE:
                return
            results[key] = jobs[key]()

    torch.set_num_threads(1)
    try:
        helpers = [_workers(threads - 1).submit(drain) for _ in range(min(threads, len(keys)) - 1)]
        try:
            drain()
        finally:
            for helper in helpers:
                helper.result()  # re-raises what a job raised
    finally:
        torch.set_num_threads(threads)
    return results


def run_all(jobs: Mapping[K, Callable[[], T]], widths: Mapping[K, int], on_cpu: bool) -> Dict[K, T]:
    """Run independent per-layer jobs on the faster schedule for their widths; return their results.

    Parameters
    ----------
    jobs : mapping
        ``key -> job``: a callable taking no argument. Jobs must not depend on each
        other; side by side they run in other threads.
    widths : mapping
        ``key -> width`` of the covariance each job decomposes (what its cost depends on).
    on_cpu : bool
        Whether all the work runs on the CPU: a GPU's solvers are run one after another.

    """
    keys = sorted(jobs, key=lambda key: -widths[key])  # the largest first: no worker is left with it at the end
    threads = torch.get_num_threads()
    if len(keys) < 2 or not on_cpu or threads < 2:
        return {key: jobs[key]() for key in keys}

    def run(schedule: str) -> Dict[K, T]:
        if schedule == "parallel":
            return _side_by_side(keys, jobs, threads)
        return {key: jobs[key]() for key in keys}

    signature = (tuple(sorted(widths[key] for key in keys)), threads)
    return SCHEDULES.run(signature, ("sequential", "parallel"), run)
