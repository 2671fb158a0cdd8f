"""The eigendecompositions of the epoch end, scheduled the way that runs them fastest.

LAPACK's symmetric eigensolvers spend most of their time reducing the matrix to
tridiagonal form, a sequence of matrix-vector products that parallelise poorly: for
covariances a few hundred features wide, two threads barely beat one. Several layers
are therefore better solved side by side, each on one thread, than one after the other
on all of them; for a few very wide layers it can be the other way round, by amounts
that differ between CPUs. :data:`SCHEDULES` times both schedules on the first epoch
ends (per set of widths; see :mod:`delve.autotune`) and keeps the faster.
``DELVE_EIGEN_SCHEDULE=sequential`` or ``parallel`` forces one.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Hashable, Mapping, Optional, Tuple, TypeVar, Union

import torch

from delve.autotune import Autotuner

__all__ = ["SCHEDULES", "Decomposition", "decompose", "decompose_all"]

K = TypeVar("K", bound=Hashable)
#: Eigenvalues (ascending) and, when asked for, the unit eigenvectors as columns.
Decomposition = Tuple[torch.Tensor, Optional[torch.Tensor]]

#: Chooses between solving one covariance after the other on torch's threads
#: (``"sequential"``) and solving them side by side on one thread each (``"parallel"``).
SCHEDULES = Autotuner("eigensolver schedule", ("sequential", "parallel"), env="DELVE_EIGEN_SCHEDULE")

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def decompose(cov: torch.Tensor, vectors: bool) -> Decomposition:
    """Return the eigenvalues (ascending) of the symmetric ``cov``, and its eigenvectors if ``vectors``."""
    if vectors:
        return torch.linalg.eigh(cov)
    return torch.linalg.eigvalsh(cov), None


def _single_threaded() -> None:
    # Each worker's own setting: the training thread keeps its thread count.
    torch.set_num_threads(1)


def _workers(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != count:  # torch's thread count changed
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(count, thread_name_prefix="delve-eigen", initializer=_single_threaded)
            _pool_size = count
        return _pool


def _attempt(cov: torch.Tensor, vectors: bool) -> Union[Decomposition, Exception]:
    try:
        return decompose(cov, vectors)
    except Exception as error:  # one layer's solver failing must not cost the others theirs
        return error


def decompose_all(jobs: Mapping[K, Tuple[torch.Tensor, bool]]) -> Dict[K, Union[Decomposition, Exception]]:
    """Decompose several symmetric matrices at once, on the faster schedule for their sizes.

    Parameters
    ----------
    jobs : mapping
        ``key -> (matrix, vectors)``: whether each needs its eigenvectors too.

    Returns
    -------
    dict
        ``key ->`` :data:`Decomposition`, or the exception its solver raised.

    """
    keys = list(jobs)
    if not keys:
        return {}
    threads = torch.get_num_threads()
    on_cpu = all(jobs[key][0].device.type == "cpu" for key in keys)
    allowed = ("sequential", "parallel") if on_cpu and threads > 1 else ("sequential",)
    # Larger problems first, so that no worker is left with the largest at the end.
    keys.sort(key=lambda key: -jobs[key][0].shape[0])

    def run(schedule: str) -> Dict[K, Union[Decomposition, Exception]]:
        if schedule == "parallel":
            futures = {key: _workers(threads).submit(_attempt, *jobs[key]) for key in keys}
            return {key: future.result() for key, future in futures.items()}
        return {key: _attempt(*jobs[key]) for key in keys}

    signature = (
        tuple(sorted((int(jobs[key][0].shape[0]), jobs[key][1]) for key in keys)),
        threads,
        "cpu" if on_cpu else "device",
    )
    return SCHEDULES.run(signature, allowed, run)
