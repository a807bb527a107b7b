"""One process, trial after trial (Tune's reuse_actors): each trial after the first starts from what a fresh
process has, and says where its start went. The GPU half (every technique's peaks equal a fresh process's to
the MiB) is tests/test_reuse_cuda.py."""
from __future__ import annotations

import math
import os
from functools import partial

import pytest
import torch

import helpers
from contract.keys import REPORT_KEYS
from helpers import run
from trainable import TrialConfig, run_trial
from trainable.attention import _FLEX_BLOCK_MASKS, sliding_window_causal_mask
from trainable.measure import TIMELINE_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")
# in the order a trial passes them (no CUDA here; trained in this process, so no fork server)
STARTUP = [k for k in TIMELINE_KEYS if k not in ("cuda_ready_time", "server_start_time")]


# helpers.tiny, shorter and without eval; lr=3e-4 is TrialConfig's default
tiny = partial(helpers.tiny, max_steps=3, warmup_steps=1, eval_interval=0, eval_batches=1, lr=3e-4, seed=3)


def test_a_trial_says_where_its_start_went(sample_dataset):
    _, first = run(tiny(sample_dataset))
    _, second = run(tiny(sample_dataset))
    assert set(TIMELINE_KEYS) | {"trial_process", "process_trials_before", "process_id", "gpu_uuid"} <= set(REPORT_KEYS)
    for final in (first, second):
        times = [final[k] for k in STARTUP]
        assert times == sorted(times) and all(math.isfinite(t) for t in times)
        assert math.isnan(final["cuda_ready_time"]) and final["gpu_uuid"] is None  # CPU
        assert final["process_id"] == os.getpid() and final["trial_process"] == "worker"
        assert math.isnan(final["server_start_time"]) and final["worker_start_time"] == final["process_start_time"]
    assert second["process_trials_before"] == first["process_trials_before"] + 1
    # the process and its imports are the same; the second trial began after the first one ended
    assert second["process_start_time"] == pytest.approx(first["process_start_time"], abs=0.05)  # 10 ms ticks
    assert second["imports_done_time"] == first["imports_done_time"] <= first["trial_start_time"]
    assert second["trial_start_time"] >= first["trial_end_time"]


def test_the_next_trial_starts_from_a_fresh_process_state(sample_dataset):
    """Caches a trial fills (the eager window mask, flex BlockMasks, dynamo's compiled frames) are empty when the
    next trial starts, and the global RNGs are the trial's seed's whatever ran before."""
    def compiled(x):
        return x * 2 + 1

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    rng_at_start: list[torch.Tensor] = []

    def report(metrics):
        if metrics["step"] == 1:  # nothing in a step draws from the global RNG: this is its state at the start
            rng_at_start.append(torch.get_rng_state())

    run_trial(tiny(sample_dataset, technique="window", window=16), report)
    assert sliding_window_causal_mask.cache_info().currsize == 1  # the eager window mask, on CPU
    _FLEX_BLOCK_MASKS[("x",)] = object()
    torch.compile(compiled, backend="eager")(torch.ones(2))
    assert len(_debug_get_cache_entry_list(compiled.__code__)) == 1
    torch.rand(1000)  # the global RNG moves on

    run_trial(tiny(sample_dataset, kernel="sdpa"), report)  # causal SDPA: nothing fills the mask cache again
    assert sliding_window_causal_mask.cache_info().currsize == 0 and not _FLEX_BLOCK_MASKS
    assert len(_debug_get_cache_entry_list(compiled.__code__)) == 0
    torch.manual_seed(3)
    assert torch.equal(rng_at_start[0], rng_at_start[1]) and torch.equal(rng_at_start[1], torch.get_rng_state())


def test_a_reused_process_reproduces_a_fresh_one_bit_for_bit(sample_dataset):
    """The same trial after a different one (another technique, a window) reports the same numbers."""
    reports_a, _ = run(tiny(sample_dataset, technique="gradcp"))
    run(tiny(sample_dataset, technique="window", window=8, batch_size=8))
    reports_b, _ = run(tiny(sample_dataset, technique="gradcp"))
    assert [r["loss"] for r in reports_a] == [r["loss"] for r in reports_b]
    assert [r["warmup"] for r in reports_b] == [True, False, False]  # its own first step is warm-up again


@pytest.mark.slow
def test_tune_reuses_the_worker_for_the_next_trial(ray_local, sample_dataset, tmp_path):
    """A real sweep with reuse_actors: the second trial runs in the first one's process, after a reset, and trains
    exactly what a fresh process trains."""
    import analysis
    from sweep import SweepConfig, run_sweep

    overrides = {"n_layers": 2, "d_model": 32, "n_heads": 4, "ff_dim": 64, "seq_len": 64, "max_steps": 3,
                 "eval_interval": 0, "eval_batches": 1, "eval_batch_size": 4, "warmup_steps": 1}
    cfg = SweepConfig(techniques=("baseline", "gradcp"), batch_sizes=(4,), device="cpu", data_dir=str(sample_dataset),
                      trial_process="worker", reuse_actors=True, max_concurrent=1, storage_path=str(tmp_path),
                      name="reuse", verbose=0, overrides=overrides)
    results, path = run_sweep(cfg)
    assert all(r.error is None for r in results)
    trials = analysis.load(path).trials.set_index("technique")
    assert sorted(trials["process_trials_before"]) == [0, 1]
    assert trials["process_id"].nunique() == 1  # one worker process ran both
    first, second = trials.sort_values("process_trials_before").index
    gap = trials.loc[second, "first_step_start_time"] - trials.loc[first, "trial_end_time"]
    print(f"\nreused worker: {gap:.2f} s from the first trial's end to the second one's first step")
    assert 0 < gap < 30
    steps = analysis.load(path).steps
    for technique in ("baseline", "gradcp"):
        reference, _ = run(TrialConfig.from_dict({**overrides, "technique": technique, "batch_size": 4,
                                                  "data_dir": str(sample_dataset), "device": "cpu"}))
        trial_id = trials.loc[technique, "trial_id"]
        assert steps[steps["trial_id"] == trial_id]["loss"].tolist() == [r["loss"] for r in reference]


@pytest.mark.slow
def test_forked_trials_keep_their_worker_and_get_a_fresh_process_each(ray_local, sample_dataset, tmp_path):
    """The default: each trial trains in a fresh fork of its reused Tune worker's server; Tune sees one worker, the
    trials two fresh processes that train exactly what a process of their own trains."""
    import json

    import analysis
    from sweep import SweepConfig, run_sweep

    overrides = {"n_layers": 2, "d_model": 32, "n_heads": 4, "ff_dim": 64, "seq_len": 64, "max_steps": 3,
                 "eval_interval": 0, "eval_batches": 1, "eval_batch_size": 4, "warmup_steps": 1}
    cfg = SweepConfig(techniques=("baseline", "gradcp"), batch_sizes=(4,), device="cpu", data_dir=str(sample_dataset),
                      max_concurrent=1, storage_path=str(tmp_path), name="forked", verbose=0, overrides=overrides)
    results, path = run_sweep(cfg)
    assert all(r.error is None for r in results)
    trials = analysis.load(path).trials.set_index("technique")
    assert set(trials["trial_process"]) == {"fork"} and list(trials["process_trials_before"]) == [0, 0]
    assert trials["process_id"].nunique() == 2  # a fresh process each ...
    workers = {json.loads(line)["pid"] for r in results for line in open(f"{r.path}/result.json")}
    assert len(workers) == 1 and not workers & set(trials["process_id"])  # ... forked by one reused worker
    first, second = trials.sort_values("trial_start_time").index
    gap = trials.loc[second, "first_step_start_time"] - trials.loc[first, "trial_end_time"]
    print(f"\nforked trial in a reused worker: {gap:.2f} s from the first trial's end to the second one's first step")
    assert 0 < gap < 30
    assert trials.loc[second, "server_start_time"] < trials.loc[first, "trial_start_time"]  # one server, kept warm
    steps = analysis.load(path).steps
    for technique in ("baseline", "gradcp"):
        reference, _ = run(TrialConfig.from_dict({**overrides, "technique": technique, "batch_size": 4,
                                                  "data_dir": str(sample_dataset), "device": "cpu"}))
        trial_id = trials.loc[technique, "trial_id"]
        assert steps[steps["trial_id"] == trial_id]["loss"].tolist() == [r["loss"] for r in reference]
