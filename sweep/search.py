"""The max-batch-size search as a pure algorithm over a `probe` callable.

The search never touches a GPU itself: it asks `probe(batch_sizes)` which sizes fit and narrows
a bracket `(lo fits, hi does not)`. That keeps it testable with a deterministic fake probe and
lets the caller decide how probes run (Ray Tune trials, one process each).

With `parallelism=k` every round probes up to k sizes at once: the growth phase tries the next
k doublings, the narrowing phase splits the bracket into k+1 parts (binary search when k=1).
Batch sizes live on the lattice of multiples of `granularity`, so the answer is the largest
multiple of `granularity` (up to `max_batch_size`) that fits.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field


class OutcomeKind(str, enum.Enum):
    FITS = "fits"
    OOM = "oom"
    ERROR = "error"


@dataclass(frozen=True)
class Outcome:
    """What one probe at one batch size found."""

    kind: OutcomeKind
    message: str | None = None
    peak_mem_mib: float | None = None

    @classmethod
    def fits(cls, peak_mem_mib: float | None = None) -> "Outcome":
        return cls(OutcomeKind.FITS, None, peak_mem_mib)

    @classmethod
    def oom(cls, message: str | None = None, peak_mem_mib: float | None = None) -> "Outcome":
        return cls(OutcomeKind.OOM, message, peak_mem_mib)

    @classmethod
    def error(cls, message: str) -> "Outcome":
        return cls(OutcomeKind.ERROR, message)


Probe = Callable[[list[int]], dict[int, Outcome]]


@dataclass
class SearchResult:
    """The answer of one search plus what it cost."""

    max_batch_size: int | None  # None when the search stopped on an error before any answer
    peak_mem_mib: float | None
    probes: int
    rounds: int
    wall_time_s: float
    status: str = "ok"  # ok | error
    error: str | None = None
    hit_upper_bound: bool = False  # the answer is the --max bound: the real limit may be higher
    history: dict[int, Outcome] = field(default_factory=dict)


class ProbeError(Exception):
    """A probe failed for a reason other than memory: the search for this technique stops."""

    def __init__(self, batch_size: int, message: str):
        super().__init__(f"batch size {batch_size}: {message}")
        self.batch_size = batch_size


def _evenly_between(lo: int, hi: int, k: int) -> list[int]:
    """Up to k distinct integers strictly between lo and hi, splitting (lo, hi) into k+1 parts."""
    gap = hi - lo
    if gap <= 1:
        return []
    k = min(k, gap - 1)
    points = {lo + (gap * i) // (k + 1) for i in range(1, k + 1)}
    return sorted(p for p in points if lo < p < hi)


class MaxBatchSearch:
    """Exponential growth from `start`, then k-ary narrowing until the bracket is one lattice step.

    `steps()` is a generator: it yields the batch sizes of the next round and is sent their outcomes,
    so a blocking probe (`run`) and an event-driven driver (a Tune searcher) share one algorithm.
    """

    def __init__(
        self,
        *,
        start: int = 1,
        max_batch_size: int = 65536,
        granularity: int = 1,
        parallelism: int = 1,
    ):
        if granularity < 1:
            raise ValueError("granularity must be >= 1")
        if parallelism < 1:
            raise ValueError("parallelism must be >= 1")
        if start < 1 or max_batch_size < 1:
            raise ValueError("start and max batch size must be >= 1")
        self.granularity = granularity
        self.parallelism = parallelism
        # Work in lattice units: size = unit * granularity.
        self.max_unit = max_batch_size // granularity
        if self.max_unit < 1:
            raise ValueError(f"max batch size {max_batch_size} is below the granularity {granularity}")
        self.start_unit = min(max(1, -(-start // granularity)), self.max_unit)
        self.history: dict[int, Outcome] = {}  # keyed by batch size
        self.rounds = 0

    def run(self, probe: Probe) -> SearchResult:
        """Drive the search with a blocking `probe`."""
        steps = self.steps()
        try:
            sizes = next(steps)
            while True:
                sizes = steps.send(probe(sizes))
        except StopIteration as done:
            return done.value

    def steps(self) -> Generator[list[int], dict[int, Outcome], SearchResult]:
        t0 = time.perf_counter()
        try:
            lo, hi = yield from self._grow()
            while hi is not None and hi - lo > 1:
                known = yield from self._ask(_evenly_between(lo, hi, self.parallelism))
                lo, hi = self._bracket(known)
        except ProbeError as exc:
            return SearchResult(
                max_batch_size=None,
                peak_mem_mib=None,
                probes=len(self.history),
                rounds=self.rounds,
                wall_time_s=time.perf_counter() - t0,
                status="error",
                error=str(exc),
                history=dict(self.history),
            )
        best = lo * self.granularity
        outcome = self.history.get(best)
        return SearchResult(
            max_batch_size=best,
            peak_mem_mib=outcome.peak_mem_mib if outcome else None,
            probes=len(self.history),
            rounds=self.rounds,
            wall_time_s=time.perf_counter() - t0,
            hit_upper_bound=hi is None and lo == self.max_unit,
            history=dict(self.history),
        )

    def _ask(self, units: Iterable[int]) -> Generator[list[int], dict[int, Outcome], dict[int, Outcome]]:
        """Probe lattice points not probed yet; returns every outcome so far keyed by unit."""
        sizes = sorted({u * self.granularity for u in units} - set(self.history))
        if sizes:
            self.rounds += 1
            answers = yield sizes
            missing = [s for s in sizes if s not in answers]
            if missing:
                raise RuntimeError(f"probe returned no outcome for batch sizes {missing}")
            self.history.update({s: answers[s] for s in sizes})
            for size in sizes:
                if answers[size].kind is OutcomeKind.ERROR:
                    raise ProbeError(size, answers[size].message or "unknown error")
        return {s // self.granularity: o for s, o in self.history.items()}

    def _bracket(self, known: dict[int, Outcome]) -> tuple[int, int | None]:
        """(largest unit that fits below the smallest failing unit, smallest failing unit or None)."""
        failing = [u for u, o in known.items() if o.kind is OutcomeKind.OOM]
        hi = min(failing) if failing else None
        fitting = [u for u, o in known.items() if o.kind is OutcomeKind.FITS and (hi is None or u < hi)]
        return (max(fitting) if fitting else 0), hi

    def _grow(self) -> Generator[list[int], dict[int, Outcome], tuple[int, int | None]]:
        """Double from start (k doublings per round) until something fails or the bound is reached."""
        unit = self.start_unit
        while True:
            known = yield from self._ask(min(unit << i, self.max_unit) for i in range(self.parallelism))
            lo, hi = self._bracket(known)
            if hi is not None or lo >= self.max_unit:
                return lo, hi
            unit = min(lo * 2, self.max_unit)


def search_max_batch(
    probe: Probe,
    *,
    start: int = 1,
    max_batch_size: int = 65536,
    granularity: int = 1,
    parallelism: int = 1,
) -> SearchResult:
    """Largest multiple of `granularity` <= `max_batch_size` for which `probe` says FITS."""
    return MaxBatchSearch(
        start=start,
        max_batch_size=max_batch_size,
        granularity=granularity,
        parallelism=parallelism,
    ).run(probe)
