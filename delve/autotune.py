"""Choosing between equivalent kernels by timing them on the first calls, once per shape.

Which way of computing a result is fastest depends on the machine: a product split into
blocks that wins on one CPU loses on another whose BLAS runs one large product faster,
and an eigensolver may run faster on one thread than on several for small matrices. So
no choice is fixed in advance. Like ``torch.backends.cudnn.benchmark``, an
:class:`Autotuner` runs each candidate on the first calls of each *signature* (shape,
dtype, device), times them, and from then on uses the fastest. Every candidate gives an
equally accurate result (each one's accuracy is asserted by the test suite), so the
calls made while tuning are real work, not wasted.

The choice is deterministic given the timings (ties go to the first candidate) and
can be forced with an environment variable, for a benchmark or to reproduce a run
bit for bit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence, TypeVar

__all__ = ["Autotuner", "Decision"]

logger = logging.getLogger("delve")

T = TypeVar("T")


class Decision:
    """What an :class:`Autotuner` settled on for one signature, and why.

    Attributes
    ----------
    choice : str
        The candidate used from now on.
    reason : str
        ``"fastest"``, ``"forced by NAME"`` or ``"only candidate"``.
    seconds : dict
        Each timed candidate's best time (empty unless it was timed).

    """

    def __init__(self, choice: str, reason: str, seconds: Optional[Mapping[str, float]] = None):
        self.choice = choice
        self.reason = reason
        self.seconds = dict(seconds or {})

    def __repr__(self) -> str:
        timed = ", ".join(f"{name} {1e3 * s:.3g} ms" for name, s in self.seconds.items())
        return f"{self.choice} ({self.reason}{': ' + timed if timed else ''})"


class Autotuner:
    """Time interchangeable candidates on the first calls of each signature, then use the fastest.

    Parameters
    ----------
    what : str
        What is being chosen, for the log (``"Gram product"``).
    candidates : sequence of str
        The candidates' names, in order of preference on a tie.
    env : str
        The environment variable that forces one candidate for every signature.
    trials : int, default 2
        Calls timed per candidate; the best of them counts (a one-off page fault or a
        preempted thread makes a call slower, never faster).
    clock : callable, default time.perf_counter
        Seconds as a float; tests inject scripted timings here.

    """

    def __init__(
        self,
        what: str,
        candidates: Sequence[str],
        env: str,
        trials: int = 2,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.what = what
        self.candidates = tuple(candidates)
        self.env = env
        self.trials = trials
        self.clock = clock
        self._decided: Dict[Hashable, Decision] = {}
        self._timings: Dict[Hashable, Dict[str, List[float]]] = {}
        self._lock = threading.Lock()

    def forced(self) -> Optional[str]:
        """Return the candidate the environment variable forces, or ``None``.

        Raises
        ------
        ValueError
            When the variable holds anything but a candidate's name.

        """
        value = os.environ.get(self.env, "").strip()
        if not value:
            return None
        if value not in self.candidates:
            raise ValueError(f"{self.env}={value!r} is not a {self.what}; valid: {', '.join(self.candidates)}")
        return value

    def run(
        self,
        signature: Hashable,
        allowed: Sequence[str],
        call: Callable[[str], T],
        sync: Callable[[], None] = lambda: None,
    ) -> T:
        """Return ``call(candidate)`` for the candidate this signature uses (timing it while still tuning).

        Parameters
        ----------
        signature : hashable
            Everything the speed of the candidates depends on (shape, dtype, device).
        allowed : sequence of str
            The candidates that differ for this signature, in preference order; with
            one, nothing is timed.
        call : callable
            Runs one candidate and returns its result.
        sync : callable, optional
            Waits for the device, so that an asynchronous candidate is timed whole
            (called only while tuning).

        """
        forced = self.forced()
        if forced is not None:
            return call(forced)
        decision = self._decided.get(signature)
        if decision is not None:
            return call(decision.choice)
        if len(allowed) == 1:
            self._settle(signature, Decision(allowed[0], "only candidate"))
            return call(allowed[0])
        candidate = self._next_trial(signature, allowed)
        sync()
        start = self.clock()
        result = call(candidate)
        sync()
        self._record(signature, allowed, candidate, self.clock() - start)
        return result

    def _next_trial(self, signature: Hashable, allowed: Sequence[str]) -> str:
        with self._lock:
            timings = self._timings.setdefault(signature, {name: [] for name in allowed})
            # Round robin, so that drift of a shared machine hits every candidate alike.
            return min(allowed, key=lambda name: len(timings[name]))

    def _record(self, signature: Hashable, allowed: Sequence[str], candidate: str, seconds: float) -> None:
        with self._lock:
            timings = self._timings.get(signature)
            if timings is None or signature in self._decided:  # another thread settled it meanwhile
                return
            timings[candidate].append(seconds)
            if min(len(timings[name]) for name in allowed) < self.trials:
                return
            best = {name: min(timings[name]) for name in allowed}
            # min() keeps the first of equal times: ties go to the preferred candidate.
            choice = min(allowed, key=lambda name: best[name])
            del self._timings[signature]
        self._settle(signature, Decision(choice, "fastest", best))

    def _settle(self, signature: Hashable, decision: Decision) -> None:
        self._decided[signature] = decision
        logger.debug("%s for %s: %r", self.what, signature, decision)

    def decision(self, signature: Hashable) -> Optional[Decision]:
        """Return what this signature uses (``None`` while it is still being timed)."""
        forced = self.forced()
        if forced is not None:
            return Decision(forced, f"forced by {self.env}")
        return self._decided.get(signature)

    def decisions(self) -> Dict[Hashable, Decision]:
        """Return every settled signature's decision."""
        return dict(self._decided)

    def forget(self) -> None:
        """Drop every decision and timing, so that the next calls tune again."""
        with self._lock:
            self._decided.clear()
            self._timings.clear()

