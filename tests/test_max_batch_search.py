"""The max-batch search against a deterministic fake probe (no Ray, no GPU)."""
from __future__ import annotations

import pytest

from sweep.search import MaxBatchSearch, Outcome, OutcomeKind, scouted_search, search_max_batch


class FakeGPU:
    """Batch sizes up to `limit` fit; above it, allocation fails. Records every round it is asked."""

    def __init__(self, limit: int, *, error_at: int | None = None, oom_exc: Exception | None = None):
        self.limit = limit
        self.error_at = error_at
        self.oom_exc = oom_exc
        self.rounds: list[list[int]] = []

    def __call__(self, sizes: list[int]) -> dict[int, Outcome]:
        self.rounds.append(list(sizes))
        out = {}
        for bs in sizes:
            if self.error_at is not None and bs >= self.error_at:
                out[bs] = Outcome.error("ValueError: shapes do not match")
            elif bs <= self.limit:
                out[bs] = Outcome.fits(peak_mem_mib=10.0 * bs)
            else:
                out[bs] = Outcome.oom("CUDA out of memory")
        return out

    @property
    def probed(self) -> list[int]:
        return [bs for r in self.rounds for bs in r]


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 64, 100, 127, 129, 1000])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("start", [1, 8, 32])
def test_exact_answer_for_any_limit_start_and_parallelism(limit, k, start):
    gpu = FakeGPU(limit)
    res = search_max_batch(gpu, start=start, max_bound=4096, parallelism=k)
    assert res.status == "ok"
    assert res.max_batch_size == limit
    assert res.peak_mem_mib == 10.0 * limit
    assert res.probes == len(set(gpu.probed)) == len(gpu.probed)  # nothing probed twice
    assert all(len(r) <= k for r in gpu.rounds)
    assert res.rounds == len(gpu.rounds)
    # The answer is proven: it fits and the next size up was seen to fail.
    assert res.history[limit].kind is OutcomeKind.FITS
    assert res.history[limit + 1].kind is OutcomeKind.OOM
    assert not res.hit_upper_bound


def test_answer_at_the_very_start():
    gpu = FakeGPU(32)
    res = search_max_batch(gpu, start=32, max_bound=1024)
    assert res.max_batch_size == 32
    assert gpu.rounds[0] == [32]
    assert 33 in gpu.probed and all(bs >= 32 for bs in gpu.probed)


def test_nothing_fits_gives_zero():
    gpu = FakeGPU(0)
    res = search_max_batch(gpu, start=16, max_bound=1024, parallelism=2)
    assert res.status == "ok"
    assert res.max_batch_size == 0
    assert res.peak_mem_mib is None
    assert 1 in gpu.probed


def test_limit_beyond_the_upper_bound_stops_at_the_bound():
    gpu = FakeGPU(10_000)
    res = search_max_batch(gpu, start=8, max_bound=100)
    assert res.max_batch_size == 100
    assert res.hit_upper_bound
    assert max(gpu.probed) == 100


@pytest.mark.parametrize("limit,granularity,expected", [(100, 8, 96), (7, 8, 0), (64, 8, 64), (129, 16, 128)])
def test_granularity_answers_on_its_lattice(limit, granularity, expected):
    gpu = FakeGPU(limit)
    res = search_max_batch(gpu, start=8, max_bound=4096, granularity=granularity)
    assert res.max_batch_size == expected
    assert all(bs % granularity == 0 for bs in gpu.probed)
    fine = FakeGPU(limit)
    search_max_batch(fine, start=8, max_bound=4096, granularity=1)
    assert len(gpu.probed) <= len(fine.probed)


def test_four_parallel_probes_need_fewer_rounds_for_the_same_answer():
    one, four = FakeGPU(777), FakeGPU(777)
    r1 = search_max_batch(one, start=1, max_bound=100_000, parallelism=1)
    r4 = search_max_batch(four, start=1, max_bound=100_000, parallelism=4)
    assert r1.max_batch_size == r4.max_batch_size == 777
    assert r4.rounds < r1.rounds
    assert max(len(r) for r in four.rounds) == 4


def test_non_oom_error_stops_that_search():
    gpu = FakeGPU(100, error_at=64)
    res = search_max_batch(gpu, start=8, max_bound=4096)
    assert res.status == "error"
    assert res.max_batch_size is None
    assert "batch size 64" in res.error and "shapes do not match" in res.error
    assert max(gpu.probed) == 64  # nothing probed after the error


def test_non_monotonic_probe_answers_stay_below_the_smallest_failure():
    """A flaky fit above a failure must not be reported as the answer."""

    def probe(sizes):
        return {bs: (Outcome.oom() if bs in (40, 41) else Outcome.fits()) if bs <= 100 else Outcome.oom()
                for bs in sizes}

    res = search_max_batch(probe, start=1, max_bound=1024, parallelism=3)
    assert res.max_batch_size < 40 or res.max_batch_size == 100
    assert res.history[res.max_batch_size + 1].kind is OutcomeKind.OOM


def test_bad_search_settings_are_rejected():
    with pytest.raises(ValueError):
        search_max_batch(FakeGPU(1), granularity=0)
    with pytest.raises(ValueError):
        search_max_batch(FakeGPU(1), start=8, max_bound=4, granularity=8)


# -- seeded by a predicted answer (the memory model's hint) ----------------------------------------


def _hints(limit: int) -> list[int]:
    """Exact, inside the +-3% bracket, just outside it, far off both ways, nothing fits, beyond the bound."""
    return sorted({limit, round(limit * 1.02), round(limit * 0.98), round(limit * 1.1), round(limit * 0.9),
                   limit * 3, limit // 3, 0, 10_000})


@pytest.mark.parametrize("limit", [1, 2, 7, 100, 129, 703, 1000, 4096])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("granularity", [1, 8])
def test_seeded_search_finds_the_unseeded_answer_wherever_the_hint_is(limit, k, granularity):
    unseeded = search_max_batch(FakeGPU(limit), start=32, max_bound=4096, granularity=granularity,
                                parallelism=k)
    for hint in _hints(limit):
        gpu = FakeGPU(limit)
        res = search_max_batch(gpu, start=32, max_bound=4096, granularity=granularity, parallelism=k, hint=hint)
        assert res.status == "ok"
        assert res.max_batch_size == unseeded.max_batch_size, hint
        assert res.hit_upper_bound == unseeded.hit_upper_bound
        assert res.probes == len(set(gpu.probed)) == len(gpu.probed)  # nothing probed twice
        assert all(len(r) <= k for r in gpu.rounds) and res.rounds == len(gpu.rounds)
        assert all(bs % granularity == 0 and 0 < bs <= 4096 for bs in gpu.probed)
        if not res.hit_upper_bound:  # proven: the next lattice size up was seen to fail
            assert res.history[res.max_batch_size + granularity].kind is OutcomeKind.OOM


@pytest.mark.parametrize("k", [1, 2, 4])
def test_first_round_probes_the_bracket_around_the_hint(k):
    gpu = FakeGPU(703)
    search_max_batch(gpu, start=32, max_bound=100_000, parallelism=k, hint=700)
    assert gpu.rounds[0] == ([700] if k == 1 else sorted({679, 721, *gpu.rounds[0]}))
    assert all(679 <= bs <= 721 for bs in gpu.rounds[0]) and len(gpu.rounds[0]) == k


@pytest.mark.parametrize("limit", [64, 300, 703, 1500, 9000])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("error", [-0.02, 0.0, 0.02])
def test_a_good_hint_needs_fewer_probes_and_rounds(limit, k, error):
    """The memory model is within ~2% on an H200: such a hint must beat growing from --start."""
    unseeded = search_max_batch(FakeGPU(limit), start=32, max_bound=100_000, parallelism=k)
    seeded = search_max_batch(FakeGPU(limit), start=32, max_bound=100_000, parallelism=k,
                              hint=round(limit * (1 + error)))
    assert seeded.max_batch_size == unseeded.max_batch_size == limit
    assert seeded.probes < unseeded.probes
    assert seeded.rounds < unseeded.rounds


def test_a_hint_far_off_costs_a_few_rounds_not_a_wrong_answer():
    for hint in (100, 5000):
        res = search_max_batch(FakeGPU(703), start=32, max_bound=100_000, hint=hint)
        assert res.max_batch_size == 703 and res.rounds <= 20


def test_seeded_search_stops_on_an_error():
    gpu = FakeGPU(1000, error_at=990)
    res = search_max_batch(gpu, start=32, max_bound=4096, hint=1000)
    assert res.status == "error" and "batch size 1000" in res.error
    assert gpu.probed == [1000]


def test_replay_costs_what_the_real_search_cost():
    """The unseeded cost reported next to a seeded search is the unseeded search's real cost on that answer."""
    from sweep.search import replay_search

    for limit, k, g in [(703, 1, 1), (703, 4, 1), (100, 2, 8), (0, 1, 1), (5000, 3, 1)]:
        real = search_max_batch(FakeGPU(limit), start=32, max_bound=4096, parallelism=k, granularity=g)
        replayed = replay_search(real.max_batch_size, start=32, max_bound=4096, parallelism=k, granularity=g)
        assert (replayed.max_batch_size, replayed.probes, replayed.rounds) == (real.max_batch_size, real.probes,
                                                                               real.rounds)


def test_bad_hints_are_rejected():
    with pytest.raises(ValueError):
        search_max_batch(FakeGPU(1), hint=-1)
    with pytest.raises(ValueError):
        search_max_batch(FakeGPU(1), hint=8, hint_margin=0)


# -- a scout's answer, confirmed by fresh probes ------------------------------------------------------------
@pytest.mark.parametrize("limit", [0, 1, 7, 129, 1240])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("off", [-40, -3, -1, 0, 1, 2, 40])
def test_an_expected_answer_is_confirmed_or_corrected_by_fresh_probes(limit, k, off):
    gpu = FakeGPU(limit)
    expect = max(0, limit + off)
    res = MaxBatchSearch(start=32, max_bound=4096, parallelism=k, expect=expect).run(gpu)
    assert res.max_batch_size == limit and res.status == "ok" and not res.hit_upper_bound
    assert res.history[limit + 1].kind is OutcomeKind.OOM
    assert limit == 0 or res.history[limit].kind is OutcomeKind.FITS
    assert all(len(r) <= k for r in gpu.rounds) and len(gpu.probed) == len(set(gpu.probed))
    if off == 0:  # an exact scout: the pair at the edge, in one round when k >= 2
        assert (res.probes, res.rounds) == ((1 if limit == 0 else 2), 1 if k > 1 or limit == 0 else 2)
        assert set(gpu.rounds[0]) >= ({limit + 1, limit} - {0} if k > 1 else {limit + 1})  # e + 1 first
    assert res.rounds <= 2 + 2 * (abs(off) + 1).bit_length()  # a gallop, then bisection: logarithmic in the miss


@pytest.mark.parametrize("granularity", [1, 8])
def test_an_expected_answer_respects_the_lattice_and_the_bound(granularity):
    res = MaxBatchSearch(max_bound=100, granularity=granularity, parallelism=2, expect=500).run(FakeGPU(10_000))
    assert res.max_batch_size == 100 // granularity * granularity and res.hit_upper_bound
    res = MaxBatchSearch(max_bound=4096, granularity=granularity, parallelism=1, expect=99).run(FakeGPU(100))
    assert res.max_batch_size == 100 // granularity * granularity


class FlakyNearTheEdge:
    """A probe that disagrees with itself near the edge: within `width` of `limit`, each probe fits or not at
    random (seeded), as an in-process probe might after what ran before it; far from it, it is right."""

    def __init__(self, limit: int, width: int, seed: int):
        import random

        self.limit, self.width, self.rng, self.probed = limit, width, random.Random(seed), []

    def __call__(self, sizes: list[int]) -> dict[int, Outcome]:
        self.probed += sizes
        out = {}
        for bs in sizes:
            fits = bs <= self.limit if abs(bs - self.limit) > self.width else self.rng.random() < 0.5
            out[bs] = Outcome.fits(10.0 * bs) if fits else Outcome.oom("CUDA out of memory")
        return out


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_scout_that_disagrees_with_itself_never_changes_the_answer(seed, k):
    """The scout searches in one process and may be wrong near the edge; fresh probes are right. The answer is
    always the fresh probes' exact limit, and an exact scout needs 3 probes (scout included) in all."""
    limit = 1240
    scout_probe = FlakyNearTheEdge(limit, width=4, seed=seed)
    scout, res = scouted_search(scout_probe, FakeGPU(limit), start=32, max_bound=100_000, parallelism=k,
                                hint=round(limit * 0.98))
    assert scout.status == "ok" and abs(scout.max_batch_size - limit) <= 5
    assert res.max_batch_size == limit
    assert res.history[limit].kind is OutcomeKind.FITS and res.history[limit + 1].kind is OutcomeKind.OOM
    if scout.max_batch_size == limit:
        assert 1 + res.probes == 3 and res.rounds == (2 if k == 1 else 1)
    assert res.rounds <= 1 + 2 * 3  # off by at most 5: a short gallop, a short bisection


@pytest.mark.parametrize("seed", range(20))
def test_fresh_probes_that_disagree_near_the_edge_still_give_a_proven_answer(seed):
    """If even fresh probes were not repeatable near the edge, the answer is still one the probes proved:
    it fitted, the next size up failed, and no smaller size was seen to fail."""
    probe = FlakyNearTheEdge(700, width=3, seed=seed)
    res = MaxBatchSearch(max_bound=4096, parallelism=2, expect=690).run(probe)
    n = res.max_batch_size
    assert res.history[n].kind is OutcomeKind.FITS and res.history[n + 1].kind is OutcomeKind.OOM
    assert all(o.kind is OutcomeKind.FITS for bs, o in res.history.items() if bs <= n) and 700 - 4 <= n <= 700 + 3
