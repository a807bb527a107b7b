"""Max-batch probes: classifying what a probe trial ended with, and a real (CPU) search on local Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep import SweepConfig, classify_probe, find_max_batch_size
from sweep.search import OutcomeKind

CONTRACT3_FIELDS = {"technique", "window", "max_batch_size", "peak_mem_mib", "probes", "wall_time_s",
                    "gpu_memory_limit_gb", "status", "error"}


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


def test_cpu_search_end_to_end(ray_local, sample_dataset, tmp_path):
    """On CPU nothing runs out of memory: the search must climb to the --max bound, one trial per probe."""
    import analysis

    cfg = SweepConfig(techniques=("baseline",), device="cpu", data_dir=str(sample_dataset), start=1, max_batch=3,
                      max_concurrent=2, probe_steps=2, storage_path=str(tmp_path), name="mb", verbose=0,
                      overrides={"n_layers": 1, "d_model": 32, "n_heads": 2, "ff_dim": 64, "seq_len": 32})
    records, path = find_max_batch_size(cfg)
    assert len(records) == 1
    rec = records[0]
    assert CONTRACT3_FIELDS <= set(rec)
    assert rec["technique"] == "baseline" and rec["status"] == "ok" and rec["error"] is None
    assert rec["max_batch_size"] == 3 and rec["hit_upper_bound"]
    assert rec["probes"] == 3 and rec["rounds"] == 2  # {1, 2} then {3}: two probes per round
    assert json.loads((Path(path) / "max_batch.json").read_text()) == records

    loaded = analysis.load(path)
    assert sorted(loaded.trials["batch_size"]) == [1, 2, 3]
    assert set(loaded.trials["status"]) == {"ok"}
    assert loaded.max_batch["max_batch_size"].tolist() == [3]
    pids = {s["pid"] for s in (json.loads(line) for d in Path(path).glob("probe_*")
                                for line in (d / "result.json").read_text().splitlines())}
    assert len(pids) == 3  # every probe ran in a fresh process (reuse_actors=False)
