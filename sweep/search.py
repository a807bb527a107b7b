"""The max-batch-size search as a pure algorithm over a `probe` callable.

The search never touches a GPU itself: it asks `probe(batch_sizes)` which sizes fit and narrows
a bracket `(lo fits, hi does not)`. That keeps it testable with a deterministic fake probe and
lets the caller decide how probes run (Ray Tune trials, one process each).

With `parallelism=k` every round probes up to k sizes at once: the growth phase tries the next
k doublings, the narrowing phase splits the bracket into k+1 parts (binary search when k=1).
Batch sizes live on the lattice of multiples of `granularity`, so the answer is the largest
multiple of `granularity` (up to the upper bound `max_bound`) that fits.

A `hint` (a predicted answer, e.g. from the analytic memory model) replaces the growth from
`start`: the first round probes around the hint (k sizes spread over hint +-`hint_margin`, the hint
itself when k=1); if the answer lies outside, the bracket widens geometrically away from the hint
(the margin doubles every round, up to doubling/halving the size), then the same k-ary narrowing
runs. The answer never depends on the hint, only the number of probes does.

An `expect`ed answer e (what a scout found by searching inside one process, `probe.scout`) is confirmed
instead: the first round probes the two sizes at the edge it claims, e + 1 first, then e (one round when
k >= 2); a probe that disagrees starts a gallop away from the edge (1, 2, 4, ... lattice steps, k per
round), then the same k-ary narrowing. So an exact scout costs 2 fresh probes (1 round when k >= 2), one
off by d costs about 2 log2(d) more, and the answer is proven by fresh probes whatever the scout said:
`scouted_search` is the whole procedure against two probes.
"""
from __future__ import annotations

import enum
import math
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
    """Exponential growth from `start` (or a bracket around `hint`), then k-ary narrowing to one lattice step.

    `steps()` is a generator: it yields the batch sizes of the next round and is sent their outcomes,
    so a blocking probe (`run`) and an event-driven driver (a Tune searcher) share one algorithm.
    """

    def __init__(
        self,
        *,
        start: int = 1,
        max_bound: int = 65536,
        granularity: int = 1,
        parallelism: int = 1,
        hint: int | None = None,
        hint_margin: float = 0.03,
        expect: int | None = None,
    ):
        if granularity < 1:
            raise ValueError("granularity must be >= 1")
        if parallelism < 1:
            raise ValueError("parallelism must be >= 1")
        if start < 1 or max_bound < 1:
            raise ValueError("start and max bound must be >= 1")
        self.granularity = granularity
        self.parallelism = parallelism
        # Work in lattice units: size = unit * granularity.
        self.max_unit = max_bound // granularity
        if self.max_unit < 1:
            raise ValueError(f"max bound {max_bound} is below the granularity {granularity}")
        self.start_unit = min(max(1, -(-start // granularity)), self.max_unit)
        if hint is not None and hint < 0:
            raise ValueError("hint must be >= 0")
        if not 0 < hint_margin < 1:
            raise ValueError("hint margin must be between 0 and 1")
        # A hint of 0 (nothing predicted to fit) still starts at the smallest size.
        self.hint_unit = None if hint is None else min(max(1, hint // granularity), self.max_unit)
        self.hint_margin = hint_margin
        if expect is not None and expect < 0:
            raise ValueError("expect must be >= 0")
        self.expect_unit = None if expect is None else min(expect // granularity, self.max_unit)
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
            if self.expect_unit is not None:
                lo, hi = yield from self._around_expected()
            else:
                lo, hi = yield from (self._grow() if self.hint_unit is None else self._around_hint())
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

    def _around_hint(self) -> Generator[list[int], dict[int, Outcome], tuple[int, int | None]]:
        """Probe hint +-margin, then widen away from the hint until a size fits below one that fails."""
        k, h, margin = self.parallelism, self.hint_unit, self.hint_margin
        low = max(1, math.floor(h * (1 - margin)))
        high = min(self.max_unit, max(h + 1, math.ceil(h * (1 + margin))))
        first = [h] if k == 1 else _spread(low, high, k)
        known = yield from self._ask(first)
        lo, hi = self._bracket(known)
        # k=1 probed only the hint: its first widening step goes to the bracket's edge (margin itself).
        width = margin / 2 if k == 1 else margin
        while True:
            if (hi is not None and (lo > 0 or hi == 1)) or (hi is None and lo >= self.max_unit):
                return lo, hi
            width *= 2
            if hi is None:  # everything probed fits: grow above the largest fit (at most doubling)
                top = min(self.max_unit, max(lo + 1, math.ceil(lo * (1 + min(width, 1.0)))))
                units = _spread(lo, top, k + 1)[1:]  # k sizes in (lo, top]
            else:  # everything probed below the smallest failure fails: shrink (at most halving)
                bottom = max(1, min(hi - 1, math.floor(hi * (1 - min(width, 0.5)))))
                units = _spread(bottom, hi, k + 1)[:-1]  # k sizes in [bottom, hi)
            known = yield from self._ask(units)
            lo, hi = self._bracket(known)


    def _closed(self, lo: int, hi: int | None) -> bool:
        """The bracket has both sides (a fit below a failure, or nothing fits at 1), or fits up to the bound."""
        return (hi is not None and (lo > 0 or hi == 1)) or (hi is None and lo >= self.max_unit)

    def _around_expected(self) -> Generator[list[int], dict[int, Outcome], tuple[int, int | None]]:
        """Probe the expected edge (e + 1, and e when k >= 2), then gallop away from a disagreement (k per round)."""
        e, k = self.expect_unit, self.parallelism
        known = yield from self._ask([u for u in (e + 1, e) if 1 <= u <= self.max_unit][:k])
        lo, hi = self._bracket(known)
        step = 1
        while not self._closed(lo, hi):
            if hi is None:  # everything probed fits: up from the largest fit
                units = sorted({min(self.max_unit, lo + (step << i)) for i in range(k)})
            else:  # everything probed below the smallest failure fails: down from it
                units = sorted({max(1, hi - (step << i)) for i in range(k)})
            step <<= k
            known = yield from self._ask(units)
            lo, hi = self._bracket(known)
        return lo, hi


def _spread(low: int, high: int, k: int) -> list[int]:
    """Up to k distinct integers spread evenly over [low, high], both ends included (k >= 2)."""
    if high <= low:
        return [low]
    return sorted({low + round((high - low) * i / (k - 1)) for i in range(k)})


def search_max_batch(
    probe: Probe,
    *,
    start: int = 1,
    max_bound: int = 65536,
    granularity: int = 1,
    parallelism: int = 1,
    hint: int | None = None,
    hint_margin: float = 0.03,
) -> SearchResult:
    """Largest multiple of `granularity` <= `max_bound` for which `probe` says FITS.

    `hint`: a predicted answer; it only changes where the search looks first (see the module docstring).
    """
    return MaxBatchSearch(
        start=start,
        max_bound=max_bound,
        granularity=granularity,
        parallelism=parallelism,
        hint=hint,
        hint_margin=hint_margin,
    ).run(probe)


def scouted_search(scout_probe: Probe, probe: Probe, *, start: int = 1, max_bound: int = 65536,
                   granularity: int = 1, parallelism: int = 1, hint: int | None = None,
                   hint_margin: float = 0.03) -> tuple[SearchResult, SearchResult]:
    """The max-batch search with a scout: `scout_probe` (cheap, in one process, possibly wrong near the edge)
    searches first, one probe at a time; its answer is then confirmed with `probe` (fresh processes, k per round).
    Returns (the scout's result, the search's). The answer is the second's, proven by `probe` alone."""
    scout = search_max_batch(scout_probe, start=start, max_bound=max_bound, granularity=granularity,
                             hint=hint, hint_margin=hint_margin)
    expect = scout.max_batch_size if scout.status == "ok" else None
    fresh = MaxBatchSearch(start=start, max_bound=max_bound, granularity=granularity,
                           parallelism=parallelism, hint=hint if expect is None else None, hint_margin=hint_margin,
                           expect=expect).run(probe)
    return scout, fresh


def monotone_probe(max_fitting: int) -> Probe:
    """A probe for an ideal GPU: every size up to `max_fitting` fits, every larger one runs out of memory."""

    def probe(sizes: list[int]) -> dict[int, Outcome]:
        return {bs: Outcome.fits() if bs <= max_fitting else Outcome.oom() for bs in sizes}

    return probe


def replay_search(max_fitting: int, **settings) -> SearchResult:
    """What a search with `settings` (as `search_max_batch` takes them) would cost if the answer is `max_fitting`.

    Replays the search against the outcomes a found answer implies (fits at or below, OOM above), so
    the cost of another strategy (e.g. the unseeded search) is known without running a probe.
    """
    return search_max_batch(monotone_probe(max_fitting), **settings)
