"""`--predict`: the memory model over a whole grid, on CPU, without Ray; and the budget it predicts for."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweep import SweepConfig, SweepError
from sweep.predict import (
    GPU_TOTAL_MIB,
    memory_budget,
    predict_grid,
    predict_point,
    predicted_max_batch,
)
from trainable import TrialConfig
from trainable.memory_model import DEFAULT_CONSTANTS, predict_peak_memory

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "RAY_USAGE_STATS_ENABLED": "0"}
JSON_KEYS = {"label", "technique", "batch_size", "window", "vocab_size", "predicted_peak_mib", "predicted_max_batch",
             "predicted_reserved_mib", "fits", "kernel", "budget_mib", "budget_source", "peak_mib", "phase",
             "phases_mib", "reserved_mib", "activations_mib", "params_mib", "optimizer_states_mib"}
SEED_TRIALS = 18


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep.run", "--predict", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _cfg(**kw) -> TrialConfig:
    return TrialConfig.from_dict({"batch_size": 32, "vocab_size": 10000, "data_dir": "/d", "device": "cuda", **kw})


@pytest.mark.slow
def test_cli_table_lists_every_seed_config_with_its_budget():
    t0 = time.monotonic()
    proc = _cli()
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 30  # no Ray, no training
    out = proc.stdout
    assert "Ray" not in out + proc.stderr and "Traceback" not in proc.stderr
    assert out.startswith("budget: 143221 MiB = h200 (143771 MiB, the default GPU)")
    assert "vocab:  10000 (the default" in out
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("trial "))
    body = [ln for ln in lines[header + 2:] if ln.strip()][:SEED_TRIALS]
    assert len(body) == SEED_TRIALS
    assert {ln.split()[0] for ln in body} >= {"baseline_bs32", "bf16_flash_bs128", "bf16_window16_bs64", "gradcp_bs32"}
    start = lines[header].index("max_batch")  # aligned: every value of a column starts where its header does
    assert all(ln[start - 1] == " " and ln[start].isdigit() for ln in body)


@pytest.mark.slow
def test_cli_json_has_one_object_per_config_with_the_contract_keys():
    proc = _cli("--json", "--techniques", "baseline", "flash", "window", "--windows", "16",
                "--batch-sizes", "32", "64", "--gpu-memory-gb", "24")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert JSON_KEYS <= set(row), JSON_KEYS - set(row)
        assert row["vocab_size"] == 10000 and row["budget_mib"] == 24 * 1024 and row["gpu_memory_gb"] == 24
        assert row["predicted_peak_mib"] == row["peak_mib"] and row["predicted_reserved_mib"] >= row["peak_mib"]
        assert row["fits"] == (row["batch_size"] <= row["predicted_max_batch"])
    by = {(r["label"], r["batch_size"]): r for r in rows}
    assert by[("bf16_window16", 32)]["window"] == 16 and by[("baseline", 32)]["window"] is None
    # The memory-efficient techniques fit more: the reason the tool exists.
    assert by[("bf16_flash", 32)]["predicted_max_batch"] > by[("baseline", 32)]["predicted_max_batch"]
    assert by[("baseline", 64)]["predicted_peak_mib"] > by[("baseline", 32)]["predicted_peak_mib"]


def test_the_measured_h200_points_are_reproduced():
    """The brief's H200 measurements (seed model, batch 32, vocab 10k) within the model's stated 2.1%."""
    measured = {("baseline", None): 6899, ("flash", None): 4055, ("window", 16): 4055, ("gradcp", None): 2480}
    for (technique, window), mib in measured.items():
        row = predict_point(_cfg(technique=technique, window=window).to_dict(), memory_budget())
        assert abs(row["predicted_peak_mib"] - mib) / mib < 0.025, (technique, row["predicted_peak_mib"])


def test_gpt2_vocabulary_predicts_more_memory_and_a_smaller_max_batch():
    small = predict_grid(SweepConfig(techniques=("bf16", "gradcp"), batch_sizes=(32,)))
    gpt2 = predict_grid(SweepConfig(techniques=("bf16", "gradcp"), batch_sizes=(32,), vocab_size=50257))
    assert gpt2.vocab_size == 50257 and gpt2.vocab_source == "--vocab-size"
    for a, b in zip(small.rows, gpt2.rows):
        assert b["error"] is None and b["vocab_size"] == 50257
        assert b["predicted_peak_mib"] > a["predicted_peak_mib"]
        assert 0 < b["predicted_max_batch"] < a["predicted_max_batch"]


@pytest.mark.parametrize("technique,window", [("baseline", None), ("flash", None), ("window", 16), ("gradcp", None)])
def test_predicted_max_batch_is_monotone_in_the_budget_and_exact(technique, window):
    cfg = _cfg(technique=technique, window=window)
    budgets = [100, 500, 1000, 2000, 4000, 8000, 16000, 24576, 40000, 80000, 143221]
    answers = [predicted_max_batch(cfg, b) for b in budgets]
    assert answers == sorted(answers) and answers[0] == 0 and answers[-1] > 100
    for budget, b in zip(budgets, answers):
        reserved = lambda n: predict_peak_memory(cfg, batch_size=n).reserved_mib  # noqa: E731
        assert b == 0 or reserved(b) <= budget
        assert reserved(b + 1) > budget


def test_budget_is_what_the_allocator_may_reserve():
    context = DEFAULT_CONSTANTS.context_mib
    uncapped = memory_budget()
    assert uncapped.allocator_mib == GPU_TOTAL_MIB["h200"] - context and uncapped.gpu_memory_gb is None
    assert memory_budget(24).allocator_mib == 24 * 1024  # set_per_process_memory_fraction caps reservations
    assert memory_budget(140, gpu="h200").allocator_mib == GPU_TOTAL_MIB["h200"] - context  # clipped
    assert memory_budget(gpu_total_gb=24).allocator_mib == 24 * 1024 - context
    assert memory_budget(gpu="h100").gpu_total_mib == GPU_TOTAL_MIB["h100"]
    # A batch fits when the predicted reserved memory (peak + allowance) fits, so fitting is stricter than the peak.
    bd = predict_peak_memory(_cfg(technique="bf16"))
    assert bd.reserved_mib > bd.peak_mib
    between = memory_budget(gpu_total_gb=(bd.peak_mib + bd.reserved_mib) / 2 / 1024 + context / 1024)
    assert bd.peak_mib < between.allocator_mib < bd.reserved_mib and not between.fits(bd)
    with pytest.raises(SweepError, match="more than the GPU has"):
        memory_budget(200)
    with pytest.raises(SweepError, match="unknown --gpu"):
        memory_budget(gpu="tpu")


def test_vocabulary_comes_from_the_dataset_manifest(sample_dataset):
    pred = predict_grid(SweepConfig(techniques=("bf16",), batch_sizes=(8,), data_dir=str(sample_dataset),
                                    overrides={"seq_len": 64}))
    assert pred.vocab_size == 512 and "manifest.json" in pred.vocab_source
    assert [r["vocab_size"] for r in pred.rows] == [512]
    with pytest.raises(SweepError, match="disagrees"):
        predict_grid(SweepConfig(techniques=("bf16",), data_dir=str(sample_dataset), vocab_size=50257,
                                 overrides={"seq_len": 64}))
    with pytest.raises(SweepError, match="--seq-len 64"):
        predict_grid(SweepConfig(techniques=("bf16",), data_dir=str(sample_dataset)))


def test_a_technique_the_model_does_not_cover_is_reported_not_fatal():
    pred = predict_grid(SweepConfig(techniques=("bf16", "sac"), batch_sizes=(32,)))
    by = {r["label"]: r for r in pred.rows}
    assert by["bf16"]["error"] is None and by["bf16"]["predicted_max_batch"] > 0
    assert by["sac"]["predicted_peak_mib"] is None and "not covered" in by["sac"]["error"]


BAD_INPUT = [
    (["--gpu-memory-gb", "0"], "--gpu-memory-gb"),
    (["--gpu-memory-gb", "500"], "more than the GPU has"),
    (["--gpu", "tpu-v9"], "unknown --gpu"),
    (["--gpu-total-gb", "-1"], "--gpu-total-gb"),
    (["--vocab-size", "1"], "--vocab-size"),
    (["--vocab-size", "many"], "--vocab-size"),
    (["--data", "/no/such/dir"], "no such directory"),
    (["--device", "cpu"], "CUDA"),
    (["--find-max-batch"], "--find-max-batch"),
    (["--techniques", "nope"], "unknown technique"),
]


@pytest.mark.slow
def test_bad_predict_input_exits_2_with_one_line():
    procs = [subprocess.Popen([sys.executable, "-m", "sweep.run", "--predict", *args], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, _ in BAD_INPUT]
    for proc, (args, needle) in zip(procs, BAD_INPUT):
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, err)
        assert out == ""  # nothing half-printed
    for args, needle in ((["--json"], "--predict"), (["--vocab-size", "50257"], "--predict")):
        proc = subprocess.run([sys.executable, "-m", "sweep.run", *args], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and needle in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_compiled_configs_are_flagged_as_an_eager_upper_bound():
    """torch.compile is not modelled: a compiled row says its number is the eager step's, in JSON and in the table."""
    proc = _cli("--json", "--techniques", "flash", "flash_compile", "--batch-sizes", "64")
    assert proc.returncode == 0, proc.stderr
    rows = {r["label"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert rows["bf16_flash_compile"]["upper_bound"] is True and rows["bf16_flash"]["upper_bound"] is False
    assert rows["bf16_flash_compile"]["predicted_peak_mib"] == rows["bf16_flash"]["predicted_peak_mib"]
    table = _cli("--techniques", "flash_compile", "--batch-sizes", "64").stdout
    assert "torch.compile is not modelled" in table
    assert "torch.compile is not modelled" not in _cli("--techniques", "flash", "--batch-sizes", "64").stdout
