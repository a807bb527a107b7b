"""CUDA: a real GPU sweep read back by analysis (skipped without a GPU).

A small grid on one GPU (baseline, flash, window 16, gradcp x batch 16 and 64 at seq_len 64, 24 steps) run through
`sweep.run_sweep`, then `analysis`: measured peaks sit beside the memory model's predictions, the three throughputs
keep their meanings (quartiles around the median; the wall-clock figure no faster than the GPU-time one), and where
the trial measured its memory breakdown, the measured components add up to the measured peak within 1% in the
report's "Where the memory goes" table and plot 9 shows measured bars.

    pytest -m cuda tests/test_analysis_cuda.py -s        # ~2-3 min on an H200
"""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.cuda, pytest.mark.slow]
STEPS = 24


@pytest.fixture(scope="module")
def gpu_results(ray_local, sample_dataset, tmp_path_factory):
    from analysis import load
    from sweep import SweepConfig, run_sweep

    cfg = SweepConfig(
        techniques=("baseline", "flash", "window", "gradcp"), batch_sizes=(16, 64), windows=(16,), device="cuda",
        overrides={"max_steps": STEPS, "warmup_steps": 2, "eval_interval": 0, "seq_len": 64},
        data_dir=str(sample_dataset), storage_path=str(tmp_path_factory.mktemp("gpu")), name="gpu_grid", verbose=0,
    )
    _, path = run_sweep(cfg)
    return load(path)


def test_measured_memory_beside_the_prediction(gpu_results):
    trials = gpu_results.trials.set_index("name")
    assert (trials["status"] == "ok").all(), trials["status"].to_dict()
    assert (trials["device"] == "cuda").all() and trials["gpu_name"].notna().all()
    assert (trials["peak_mem_mib"] > 0).all()
    assert trials["predicted_peak_mib"].notna().all()  # joined from predictions.json by trial name
    error = trials["predicted_peak_mib"] / trials["peak_mem_mib"] - 1
    print("\nmeasured vs predicted peak (MiB):")
    for name, row in trials.iterrows():
        print(f"  {name:24s} {row['peak_mem_mib']:9.1f} {row['predicted_peak_mib']:9.1f} {100 * error[name]:+6.1f}%")
    from analysis.memory_tables import memory_table

    table = memory_table(gpu_results)
    assert table.headers[-2:] == ["predicted peak", "model error"] and len(table.rows) == len(trials)


def test_throughputs_keep_their_meanings(gpu_results):
    for _, t in gpu_results.trials.iterrows():
        # the process's first step and the step whose allocator history was recorded (where the memory goes)
        assert t["speed_steps"] == STEPS - 2 and t["speed_rule"] == "warmup_flag"
        assert t["tokens_per_s_q25"] <= t["tokens_per_s"] <= t["tokens_per_s_q75"]
        assert 0 < t["wall_tokens_per_s"] <= 1.05 * t["steady_tokens_per_s"], t["name"]  # the clock sees more time


def test_where_the_memory_goes_adds_up(gpu_results, tmp_path):
    from analysis.breakdown import SUM_TOLERANCE, breakdown_rows
    from analysis.memory_tables import breakdown_table
    from analysis.plots import plot_memory_breakdown
    from analysis.text import render_text

    rows = breakdown_rows(gpu_results, 64)
    if not any(r.has_measured for r in rows):
        pytest.skip("this checkout's trials do not measure their memory breakdown yet (measured_<component>_mib NaN)")
    table = breakdown_table(gpu_results)
    print("\n" + render_text(table))
    for row in rows:
        assert row.has_measured, row.name
        assert abs(row.sum_off()) <= SUM_TOLERANCE, (row.name, row.sum_off())
    checks = {r[0]: r[1:] for r in table.rows}["components sum to peak"]
    assert all(c.startswith("ok") for c in checks), checks
    name, fig = plot_memory_breakdown(gpu_results)
    assert not any("(predicted)" in t.get_text() for t in fig.axes[0].get_xticklabels())
    fig.savefig(tmp_path / name)
