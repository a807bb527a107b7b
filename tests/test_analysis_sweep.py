"""analysis on what the real sweep writes: a tiny CPU grid run through `sweep.run_sweep`, then read back."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # a real sweep on a local Ray
MAX_STEPS = 6


@pytest.fixture(scope="module")
def sweep_experiment(ray_local, sample_dataset, tmp_path_factory) -> str:
    from sweep import SweepConfig, run_sweep

    cfg = SweepConfig(
        preset="cpu", techniques=("baseline", "window"), batch_sizes=(2, 4), windows=(16,),
        overrides={"max_steps": MAX_STEPS, "warmup_steps": 1}, data_dir=str(sample_dataset),
        storage_path=str(tmp_path_factory.mktemp("sweep")), name="cpu_grid", verbose=0,
    )
    _, path = run_sweep(cfg)
    return path


def test_sweep_experiment_analysed_without_importing_the_pipeline(sweep_experiment, tmp_path):
    """A fresh interpreter in which importing torch, trainable, sweep or data_prep raises reads the sweep's
    experiment (whose saved state references the sweep's naming hook) and writes the report. The CPU trials
    measured no GPU memory: the memory plots and tables show the memory model's predicted CUDA peaks, so
    labelled, and the seed grid predicted on the named GPUs."""
    from test_analysis_fake import BLOCK_PIPELINE

    code = BLOCK_PIPELINE + "from analysis.__main__ import main; sys.exit(main([sys.argv[1], '--out', sys.argv[2]]))"
    run = subprocess.run([sys.executable, "-c", code, sweep_experiment, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("comparison_report.txt", "comparison_report.md", "trials.csv", "steps.parquet", "predictions.csv",
                 "1_memory_vs_batch_size.png", "2_speed_vs_batch_size.png", "3_memory_speed_tradeoff.png",
                 "4_technique_comparison_bs4.png", "5_window_size_comparison.png", "6_memory_savings_vs_baseline.png",
                 "7_loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "comparison_report.txt").read_text()
    for needle in ("Device: CPU (GPU memory not measured; the memory figures below are the memory model's predictions",
                   "Memory details (MiB), predicted for a CUDA GPU", "Seed grid predicted on h200, rtx5090",
                   "Seed grid predicted max batch per technique", "predicted peak (MiB)", "tokens/s (wall)"):
        assert needle in text, needle
    assert "bf16_window16_bs4" in (tmp_path / "trials.csv").read_text()


def test_sweep_trials_match_their_per_step_reports(sweep_experiment):
    from analysis import load

    results = load(sweep_experiment)
    trials = results.trials.set_index("name")
    assert sorted(trials.index) == ["baseline_bs2", "baseline_bs4", "bf16_window16_bs2", "bf16_window16_bs4"]
    assert (trials["status"] == "ok").all()
    assert trials.loc["bf16_window16_bs4", "window"] == 16
    assert trials.loc["bf16_window16_bs4", "precision"] == "bf16"
    assert trials.loc["baseline_bs2", "attention_kernel"] == "eager"
    for name, trial in trials.iterrows():
        steps = results.steps[results.steps["name"] == name].sort_values("step")
        assert steps["step"].tolist() == list(range(1, MAX_STEPS + 1))  # the last step is the final report
        assert trial["steps_reported"] == MAX_STEPS
        # speed skips exactly the steps the trainable flagged as warm-up (the process's first step, no compile)
        after_warmup = steps[steps["warmup"] == False]  # noqa: E712
        assert trial["speed_rule"] == "warmup_flag" and trial["speed_warmup_steps"] == 1
        assert steps["warmup"].tolist() == [True] + [False] * (MAX_STEPS - 1)
        assert trial["tokens_per_s"] == pytest.approx(after_warmup["tokens_per_s"].median())
        assert trial["step_time_median_s"] == pytest.approx(after_warmup["step_time_s"].median())
        assert trial["compile"] == False and trial["compile_time_s"] == 0.0  # noqa: E712
        final = steps[steps["final"] == True].iloc[-1]  # noqa: E712
        assert trial["val_ppl"] == pytest.approx(final["val_ppl"])
        assert trial["final_loss"] == pytest.approx(final["loss"])
        assert trial["train_time_s"] == pytest.approx(final["train_time_s"])
        assert pd.isna(trial["peak_mem_mib"])  # CPU: memory not measured (NaN), never a made-up 0
        assert trial["predicted_peak_mib"] > 0  # ... but predicted for a CUDA GPU, from predictions.json
        assert trial["wall_tokens_per_s"] > 0 and trial["steady_tokens_per_s"] > 0
    # a grid sweep ran no search: its max-batch frame has no rows but keeps the record's columns
    assert results.max_batch.empty and results.max_batch["label"].tolist() == []
    assert results.probes.empty and results.probes["technique"].tolist() == []
    seed = results.predictions[results.predictions["scope"] == "seed_grid"]
    assert set(seed["gpu"]) == {"h200", "rtx5090"} and seed["predicted_peak_mib"].notna().all()
