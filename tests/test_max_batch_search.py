"""The max-batch search against a deterministic fake probe (no Ray, no GPU)."""
from __future__ import annotations

import pytest

from sweep.search import Outcome, OutcomeKind, search_max_batch


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
    res = search_max_batch(gpu, start=start, max_batch_size=4096, parallelism=k)
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
    res = search_max_batch(gpu, start=32, max_batch_size=1024)
    assert res.max_batch_size == 32
    assert gpu.rounds[0] == [32]
    assert 33 in gpu.probed and all(bs >= 32 for bs in gpu.probed)


def test_nothing_fits_gives_zero():
    gpu = FakeGPU(0)
    res = search_max_batch(gpu, start=16, max_batch_size=1024, parallelism=2)
    assert res.status == "ok"
    assert res.max_batch_size == 0
    assert res.peak_mem_mib is None
    assert 1 in gpu.probed


def test_limit_beyond_the_upper_bound_stops_at_the_bound():
    gpu = FakeGPU(10_000)
    res = search_max_batch(gpu, start=8, max_batch_size=100)
    assert res.max_batch_size == 100
    assert res.hit_upper_bound
    assert max(gpu.probed) == 100


@pytest.mark.parametrize("limit,granularity,expected", [(100, 8, 96), (7, 8, 0), (64, 8, 64), (129, 16, 128)])
def test_granularity_answers_on_its_lattice(limit, granularity, expected):
    gpu = FakeGPU(limit)
    res = search_max_batch(gpu, start=8, max_batch_size=4096, granularity=granularity)
    assert res.max_batch_size == expected
    assert all(bs % granularity == 0 for bs in gpu.probed)
    fine = FakeGPU(limit)
    search_max_batch(fine, start=8, max_batch_size=4096, granularity=1)
    assert len(gpu.probed) <= len(fine.probed)


def test_four_parallel_probes_need_fewer_rounds_for_the_same_answer():
    one, four = FakeGPU(777), FakeGPU(777)
    r1 = search_max_batch(one, start=1, max_batch_size=100_000, parallelism=1)
    r4 = search_max_batch(four, start=1, max_batch_size=100_000, parallelism=4)
    assert r1.max_batch_size == r4.max_batch_size == 777
    assert r4.rounds < r1.rounds
    assert max(len(r) for r in four.rounds) == 4


def test_non_oom_error_stops_that_search():
    gpu = FakeGPU(100, error_at=64)
    res = search_max_batch(gpu, start=8, max_batch_size=4096)
    assert res.status == "error"
    assert res.max_batch_size is None
    assert "batch size 64" in res.error and "shapes do not match" in res.error
    assert max(gpu.probed) == 64  # nothing probed after the error


def test_non_monotonic_probe_answers_stay_below_the_smallest_failure():
    """A flaky fit above a failure must not be reported as the answer."""

    def probe(sizes):
        return {bs: (Outcome.oom() if bs in (40, 41) else Outcome.fits()) if bs <= 100 else Outcome.oom()
                for bs in sizes}

    res = search_max_batch(probe, start=1, max_batch_size=1024, parallelism=3)
    assert res.max_batch_size < 40 or res.max_batch_size == 100
    assert res.history[res.max_batch_size + 1].kind is OutcomeKind.OOM


def test_bad_search_settings_are_rejected():
    with pytest.raises(ValueError):
        search_max_batch(FakeGPU(1), granularity=0)
    with pytest.raises(ValueError):
        search_max_batch(FakeGPU(1), start=8, max_batch_size=4, granularity=8)


# -- seeded by a predicted answer (the memory model's hint) ----------------------------------------


def _hints(limit: int) -> list[int]:
    """Exact, inside the +-3% bracket, just outside it, far off both ways, nothing fits, beyond the bound."""
    return sorted({limit, round(limit * 1.02), round(limit * 0.98), round(limit * 1.1), round(limit * 0.9),
                   limit * 3, limit // 3, 0, 10_000})


@pytest.mark.parametrize("limit", [1, 2, 7, 100, 129, 703, 1000, 4096])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("granularity", [1, 8])
def test_seeded_search_finds_the_unseeded_answer_wherever_the_hint_is(limit, k, granularity):
    unseeded = search_max_batch(FakeGPU(limit), start=32, max_batch_size=4096, granularity=granularity,
                                parallelism=k)
    for hint in _hints(limit):
        gpu = FakeGPU(limit)
        res = search_max_batch(gpu, start=32, max_batch_size=4096, granularity=granularity, parallelism=k, hint=hint)
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
    search_max_batch(gpu, start=32, max_batch_size=100_000, parallelism=k, hint=700)
    assert gpu.rounds[0] == ([700] if k == 1 else sorted({679, 721, *gpu.rounds[0]}))
    assert all(679 <= bs <= 721 for bs in gpu.rounds[0]) and len(gpu.rounds[0]) == k


@pytest.mark.parametrize("limit", [64, 300, 703, 1500, 9000])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("error", [-0.02, 0.0, 0.02])
def test_a_good_hint_needs_fewer_probes_and_rounds(limit, k, error):
    """The memory model is within ~2% on an H200: such a hint must beat growing from --start."""
    unseeded = search_max_batch(FakeGPU(limit), start=32, max_batch_size=100_000, parallelism=k)
    seeded = search_max_batch(FakeGPU(limit), start=32, max_batch_size=100_000, parallelism=k,
                              hint=round(limit * (1 + error)))
    assert seeded.max_batch_size == unseeded.max_batch_size == limit
    assert seeded.probes < unseeded.probes
    assert seeded.rounds < unseeded.rounds


def test_a_hint_far_off_costs_a_few_rounds_not_a_wrong_answer():
    for hint in (100, 5000):
        res = search_max_batch(FakeGPU(703), start=32, max_batch_size=100_000, hint=hint)
        assert res.max_batch_size == 703 and res.rounds <= 20


def test_seeded_search_stops_on_an_error():
    gpu = FakeGPU(1000, error_at=990)
    res = search_max_batch(gpu, start=32, max_batch_size=4096, hint=1000)
    assert res.status == "error" and "batch size 1000" in res.error
    assert gpu.probed == [1000]


def test_replay_costs_what_the_real_search_cost():
    """The unseeded cost reported next to a seeded search is the unseeded search's real cost on that answer."""
    from sweep.search import replay_search

    for limit, k, g in [(703, 1, 1), (703, 4, 1), (100, 2, 8), (0, 1, 1), (5000, 3, 1)]:
        real = search_max_batch(FakeGPU(limit), start=32, max_batch_size=4096, parallelism=k, granularity=g)
        replayed = replay_search(real.max_batch_size, start=32, max_batch_size=4096, parallelism=k, granularity=g)
        assert (replayed.max_batch_size, replayed.probes, replayed.rounds) == (real.max_batch_size, real.probes,
                                                                               real.rounds)


def test_bad_hints_are_rejected():
    with pytest.raises(ValueError):
        search_max_batch(FakeGPU(1), hint=-1)
    with pytest.raises(ValueError):
        search_max_batch(FakeGPU(1), hint=8, hint_margin=0)
