"""Max-batch probes: classifying what a probe trial ended with, and a real (CPU) search on local Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep import SweepConfig, classify_probe, find_max_batch_size
from sweep.search import OutcomeKind

from contract.experiment import GRID_KEY, KIND_KEY, MAX_BATCH_RECORD_KEYS

CONTRACT3_FIELDS = set(MAX_BATCH_RECORD_KEYS)


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("CUDA error: out of memory\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions."),
    "ray.exceptions.RayTaskError(OutOfMemoryError): ... torch.OutOfMemoryError: CUDA out of memory. Tried to "
    "allocate 2.00 GiB",
])
def test_allocation_failures_under_other_types_count_as_oom(error):
    assert classify_probe(None, error, probe_steps=3).kind is OutcomeKind.OOM


def test_ray_wrapped_oom_is_unwrapped():
    import torch
    from ray.exceptions import RayTaskError

    wrapped = RayTaskError("tune_trainable", "Traceback ...", torch.OutOfMemoryError("CUDA out of memory."))
    assert classify_probe(None, wrapped, probe_steps=3).kind is OutcomeKind.OOM


def test_other_errors_are_errors_with_their_message():
    out = classify_probe(None, ValueError("mat1 and mat2 shapes cannot be multiplied"), probe_steps=3)
    assert out.kind is OutcomeKind.ERROR and out.message == "ValueError: mat1 and mat2 shapes cannot be multiplied"


def test_reported_outcomes():
    assert classify_probe({"oom": True, "status": "oom", "oom_phase": "backward"}, None, 3).kind is OutcomeKind.OOM
    fits = classify_probe({"final": True, "status": "ok", "step": 3}, None, 3, peak_mem_mib=123.0)
    assert fits.kind is OutcomeKind.FITS and fits.peak_mem_mib == 123.0
    assert classify_probe({"final": True, "status": "ok", "step": 1}, None, 3).kind is OutcomeKind.ERROR
    assert classify_probe({"step": 2}, None, 3).kind is OutcomeKind.ERROR  # never reported a final result


@pytest.mark.slow
def test_cpu_search_end_to_end(ray_local, sample_dataset, tmp_path):
    """On CPU nothing runs out of memory: the search must climb to the --max bound. The scout climbs inside one
    process (1, 2, 3), then one fresh probe confirms 3; every probe trains in a fresh fork of a reused worker."""
    import analysis

    cfg = SweepConfig(techniques=("baseline",), device="cpu", data_dir=str(sample_dataset), start=1, max_batch=3,
                      max_concurrent=2, probe_steps=2, storage_path=str(tmp_path), name="mb", verbose=0,
                      overrides={"n_layers": 1, "d_model": 32, "n_heads": 2, "ff_dim": 64, "seq_len": 32})
    records, path = find_max_batch_size(cfg)
    assert len(records) == 1
    rec = records[0]
    assert CONTRACT3_FIELDS <= set(rec)
    assert rec["label"] == "baseline" and rec["technique"] == "baseline" and rec["status"] == "ok"
    assert rec["error"] is None
    assert rec["max_batch_size"] == 3 and rec["hit_upper_bound"]
    assert rec["probes"] == 2 and rec["rounds"] == 2  # the scout, then a fresh probe at its answer
    assert rec["outcomes"] == {"3": "fits"}  # what fresh processes proved
    assert json.loads((Path(path) / "max_batch.json").read_text()) == records

    loaded = analysis.load(path)
    assert sorted(loaded.trials["batch_size"]) == [1, 3]  # the scout's config starts it at --start
    assert set(loaded.trials["status"]) == {"ok"}
    assert loaded.max_batch["max_batch_size"].tolist() == [3]
    reports = {d.name: [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
               for d in Path(path).glob("probe_*")}
    (scout,) = reports["probe_baseline_bs1_scout"]
    assert scout["scout_max_batch"] == 3 and [o[:2] for o in scout["scout_outcomes"]] == [
        [1, "fits"], [2, "fits"], [3, "fits"]] and scout["scout_error"] is None
    fresh = reports["probe_baseline_bs3"]
    assert [r["step"] for r in fresh] == [1, 2] and fresh[-1]["final"] is True
    assert {fresh[-1]["trial_process"], scout["trial_process"]} == {"fork"}  # always said: never a silent spawn
    # each probe trained in its own process, a child of its Tune worker (Tune's pid), which was reused
    assert fresh[-1]["process_id"] != scout["process_id"] and fresh[-1]["process_trials_before"] == 0
    assert fresh[-1]["process_id"] != fresh[-1]["pid"] and scout["process_trials_before"] == 2
    assert fresh[-1]["pid"] == scout["pid"]


def _drive(searcher, limit: int, scout_off: int = 0) -> list[list[int]]:
    """Play Tune's part: hand out every trial the searcher suggests, answer like a GPU that fits up to `limit`
    (a scout, searching in one process, finds `limit + scout_off`). Returns the batch sizes of each round."""
    from ray.tune.search import Searcher

    from sweep.probe import SCOUT_KEY

    n, rounds = 0, []
    while True:
        round_ = []
        while (config := searcher.suggest(f"t{n}")) not in (None, Searcher.FINISHED):
            round_.append((f"t{n}", config))
            n += 1
        if config == Searcher.FINISHED:
            return rounds
        assert round_, "the searcher waits for nothing"
        rounds.append([c["batch_size"] for _, c in round_])
        for trial_id, config in round_:
            bs = config["batch_size"]
            if SCOUT_KEY in config:
                assert len(round_) == 1 and config[KIND_KEY] == "probe" and config[GRID_KEY].endswith("_scout")
                result = {"final": True, "status": "ok", "step": 3, "scout_max_batch": limit + scout_off,
                          "scout_outcomes": [], "scout_error": None}
            elif bs <= limit:
                result = {"final": True, "status": "ok", "step": 3, "mem_step_peak_mib": 10.0 * bs}
            else:
                result = {"final": True, "status": "oom", "oom": True, "oom_phase": "backward"}
            searcher.on_trial_complete(trial_id, result)


@pytest.mark.parametrize("scout_off", [0, -2, 3])
def test_seeded_records_report_the_prediction_and_the_unseeded_cost(scout_off):
    """The searcher (no Tune run): a scout first (at the hint when there is one), then fresh probes at its
    answer; the record says what the search cost and what the unseeded search would have."""
    from sweep import build_grid
    from sweep.max_batch import MaxBatchSearcher, max_batch_targets
    from sweep.probe import MaxBatchSettings

    grid = build_grid(["baseline", "bf16"], [32], overrides={"data_dir": "/d", "device": "cuda"})
    settings = MaxBatchSettings(start=32, max_bound=4096, parallelism=2)
    written = []
    searcher = MaxBatchSearcher(max_batch_targets(grid), settings, on_record=written.append,
                                hints={"baseline": {"max_batch": 690, "budget_mib": 143221.0}})
    rounds = _drive(searcher, limit=703, scout_off=scout_off)
    seeded, plain = searcher.records
    assert written == searcher.records
    assert seeded["label"] == "baseline" and plain["label"] == "bf16"
    assert set(seeded) == set(MAX_BATCH_RECORD_KEYS)
    assert seeded["max_batch_size"] == plain["max_batch_size"] == 703
    assert seeded["seeded"] and seeded["predicted_max_batch"] == 690 and seeded["predicted_budget_mib"] == 143221.0
    assert rounds[0] == [690] and sorted(rounds[1]) == [703 + scout_off, 703 + scout_off + 1]  # scout, its edge
    if scout_off == 0:  # an exact scout: 3 probes in 2 rounds, whatever the hint
        assert (seeded["probes"], seeded["rounds"]) == (plain["probes"], plain["rounds"]) == (3, 2)
        assert seeded["outcomes"] == plain["outcomes"] == {"703": "fits", "704": "oom"}
    assert seeded["probes"] < seeded["unseeded_probes"] and seeded["rounds"] < seeded["unseeded_rounds"]
    assert not plain["seeded"] and plain["predicted_max_batch"] is None
    assert (seeded["unseeded_probes"], seeded["unseeded_rounds"]) == (plain["unseeded_probes"],
                                                                      plain["unseeded_rounds"])
    import pandas as pd

    from analysis import SweepResults, format_max_batch_table
    from analysis.load import TRIAL_COLUMNS

    results = SweepResults("/x", pd.DataFrame(columns=list(TRIAL_COLUMNS)), pd.DataFrame(columns=["trial_id"]),
                           pd.DataFrame(searcher.records))
    table = format_max_batch_table(results)
    assert "predicted" in table and "unseeded" in table
    assert f"{seeded['probes']}/{seeded['rounds']}" in table
    assert f"would have run {seeded['unseeded_probes']} probes" in table


def test_search_hints_match_the_searchers_technique_labels(sample_dataset, tmp_path):
    from sweep import plan_sweep
    from sweep.max_batch import MaxBatchSearcher, max_batch_targets
    from sweep.probe import MaxBatchSettings
    from sweep.predict import search_hints

    cfg = SweepConfig(techniques=("bf16", "flash", "window", "sac"), windows=(16,), device="cuda",
                      find_max_batch=True, data_dir=str(sample_dataset), gpu_memory_gb=2, gpu="h200",
                      storage_path=str(tmp_path), overrides={"seq_len": 64})
    plan = plan_sweep(cfg, gpus=1)
    hints, _ = search_hints(plan, local_mib=None)
    assert set(hints) == {"bf16", "bf16_flash", "bf16_window16"}  # sac: not in the memory model, unseeded
    assert all(h["max_batch"] > 0 and h["budget_mib"] == 2048 and h["vocab_size"] == 512 for h in hints.values())
    searcher = MaxBatchSearcher(max_batch_targets(plan.grid), MaxBatchSettings(start=1, max_bound=4096),
                                on_record=lambda r: None, hints=hints)
    assert {t.label for t in searcher.targets if t.hint} == set(hints)
