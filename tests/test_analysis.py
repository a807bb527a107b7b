"""analysis on a real Ray Tune experiment: a small function trainable reporting Contract 2's keys, with one
trial that runs out of memory (final OOM report) and one that raises (Tune ERROR)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

NUM_STEPS = 8
SEQ_LEN = 32
# (technique label, batch size, how it ends); bs8 baseline runs out of memory, gradcp raises mid-run,
# bf16_flash bs8 is stopped by Tune before its final report (an interrupted trial).
CASES = [
    ("baseline", 2, "ok"), ("baseline", 4, "ok"), ("baseline", 8, "oom"),
    ("bf16_flash", 2, "ok"), ("bf16_flash", 4, "ok"),
    ("bf16_window16", 4, "ok"), ("bf16_window8", 4, "ok"),
    ("gradcp", 4, "error"), ("bf16_flash", 8, "incomplete"),
]
MEMORY_FACTOR = {"baseline": 100.0, "bf16_flash": 40.0, "bf16_window16": 50.0, "bf16_window8": 45.0, "gradcp": 60.0}
SPEED_FACTOR = {"baseline": 1.0, "bf16_flash": 2.5, "bf16_window16": 2.0, "bf16_window8": 2.1, "gradcp": 0.7}


def step_memory(technique: str, batch_size: int, step: int) -> float:
    """Step peak grows for a few steps then settles, so the max is not simply the last step."""
    return MEMORY_FACTOR[technique] * batch_size + (7 - abs(step - 4))


def step_speed(technique: str, batch_size: int, step: int) -> float:
    """Step 1 is slow (warm-up); later steps vary, so the median is a real median."""
    base = 1000.0 * SPEED_FACTOR[technique] * batch_size
    return base / 10 if step == 1 else base + 10 * ((step * 7) % 5)


def fake_trial(config: dict) -> None:
    """Reports exactly Contract 2's keys, like trainable.tune_trainable."""
    from ray import tune

    technique, bs, ending = config["case"]
    window = int(technique.removeprefix("bf16_window")) if "window" in technique else None
    facts = {
        "technique": technique, "attention_kernel": "sdpa_flash" if "flash" in technique else "eager",
        "dtype": "bfloat16" if technique.startswith("bf16") else "float32", "tf32": not technique.startswith("bf16"),
        "checkpointing": "full" if technique == "gradcp" else "none", "batch_size": bs, "window": window,
        "seq_len": SEQ_LEN, "num_params": 123456, "device": "cpu", "gpu_name": "Fake GPU", "gpu_total_mib": 2048.0,
        "gpu_memory_limit_gb": 1.0, "torch_version": "2.x", "cuda_version": None,
    }
    last = None
    for step in range(1, NUM_STEPS + 1):
        if ending == "oom" and step == 3:
            tune.report({**facts, **last, "step": step, "loss": float("nan"), "oom": True, "final": True,
                         "status": "oom", "oom_phase": "backward", "mem_step_peak_mib": 1000.0,
                         "oom_mem_peak_mib": 1000.0, "oom_message": "CUDA out of memory. Tried to allocate 2 GiB",
                         "train_time_s": 0.5})
            return
        if ending == "error" and step == 3:
            raise ValueError("synthetic failure at step 3")
        speed, memory = step_speed(technique, bs, step), step_memory(technique, bs, step)
        last = {
            "step": step, "loss": 6.0 - 0.5 * step + 0.1 * bs, "lr": 1e-3, "tokens_seen": step * bs * SEQ_LEN,
            "step_time_s": bs * SEQ_LEN / speed, "tokens_per_s": speed,
            "mem_fwd_peak_mib": memory - 10, "mem_bwd_peak_mib": memory, "mem_step_peak_mib": memory,
            "mem_allocated_mib": 20.0, "mem_reserved_mib": memory + 30, "oom": False,
        }
        if step == 4:
            last |= {"val_loss": 4.0, "val_ppl": 54.6}
        tune.report({**facts, **last})
        last.pop("val_loss", None), last.pop("val_ppl", None)
    val_loss = 3.0 + 0.01 * bs + (0.2 if "window" in technique else 0.0)
    tune.report({**facts, **last, "final": True, "status": "ok", "train_time_s": 1.25 * bs,
                 "val_loss": val_loss, "val_ppl": math.exp(val_loss)})


def stop_interrupted(trial_id: str, result: dict) -> bool:
    return result["config"]["case"][2] == "incomplete" and result.get("step", 0) >= 3


MAX_BATCH = [
    {"technique": "baseline", "window": None, "max_batch_size": 6, "peak_mem_mib": 612.0,
     "probes": [[4, "fits"], [8, "oom"]], "wall_time_s": 3.0, "gpu_memory_limit_gb": 1.0, "status": "ok",
     "error": None},
    {"technique": "bf16_flash", "window": None, "max_batch_size": 20, "peak_mem_mib": 810.0,
     "probes": [[16, "fits"]], "wall_time_s": 4.0, "gpu_memory_limit_gb": 1.0, "status": "ok", "error": None},
]


@pytest.fixture(scope="module")
def experiment(ray_local, tmp_path_factory) -> Path:
    from ray import cloudpickle, tune

    # Ray's workers cannot import this test module: ship the trainable (and its helpers) by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    storage = tmp_path_factory.mktemp("tune")
    tuner = tune.Tuner(
        fake_trial,
        param_space={"case": tune.grid_search(CASES)},
        tune_config=tune.TuneConfig(
            reuse_actors=True,  # one worker process per CPU, not per trial: keeps the test fast
            trial_name_creator=lambda t: f"{t.config['case'][0]}_bs{t.config['case'][1]}",
            trial_dirname_creator=lambda t: f"{t.config['case'][0]}_bs{t.config['case'][1]}_{t.trial_id}",
        ),
        run_config=tune.RunConfig(storage_path=str(storage), name="fake_sweep", verbose=0, stop=stop_interrupted),
    )
    tuner.fit()
    path = storage / "fake_sweep"
    (path / "max_batch.json").write_text(json.dumps(MAX_BATCH))
    return path


@pytest.fixture(scope="module")
def results(experiment):
    from analysis import load

    return load(experiment)


def by_name(results) -> pd.DataFrame:
    return results.trials.set_index("name")


def test_one_row_per_trial_with_statuses(results):
    trials = by_name(results)
    assert len(results.trials) == len(CASES)
    assert results.trials["trial_id"].is_unique
    expected = {f"{t}_bs{bs}": ending for t, bs, ending in CASES}
    assert trials["status"].to_dict() == expected
    assert trials.loc["baseline_bs8", "oom_phase"] == "backward"
    assert trials.loc["baseline_bs8", "oom_mem_peak_mib"] == 1000.0
    assert trials.loc["baseline_bs8", "oom_message"].startswith("CUDA out of memory")
    assert trials.loc["gradcp_bs4", "error"] == "ValueError: synthetic failure at step 3"
    assert trials.loc["gradcp_bs4", "tune_status"] == "ERROR"
    assert pd.isna(trials.loc["baseline_bs4", "error"])
    assert trials.loc["bf16_flash_bs8", "tune_status"] == "TERMINATED"


def test_numbers_match_what_trials_reported(results):
    trials = by_name(results)
    for technique, bs, ending in CASES:
        row = trials.loc[f"{technique}_bs{bs}"]
        steps_run = {"ok": NUM_STEPS, "oom": 2, "error": 2, "incomplete": 3}[ending]
        memory = [step_memory(technique, bs, s) for s in range(1, steps_run + 1)]
        expected_peak = max(memory + ([1000.0] if ending == "oom" else []))
        assert row["peak_mem_mib"] == pytest.approx(expected_peak)
        assert row["steps_reported"] == steps_run
        assert row["fwd_peak_mean_mib"] == pytest.approx(sum(memory) / len(memory) - 10)
        assert row["bwd_peak_max_mib"] == pytest.approx(max(memory))
        assert row["reserved_mib"] == pytest.approx(max(memory) + 30)
        assert row["batch_size"] == bs and row["technique"] == technique
        assert row["num_params"] == 123456 and row["gpu_name"] == "Fake GPU"
        if ending == "ok":
            warm = min(3, NUM_STEPS // 2)
            speeds = pd.Series([step_speed(technique, bs, s) for s in range(warm + 1, NUM_STEPS + 1)])
            assert row["tokens_per_s"] == pytest.approx(speeds.median())
            assert row["speed_warmup_steps"] == warm
            assert row["val_loss"] == pytest.approx(3.0 + 0.01 * bs + (0.2 if "window" in technique else 0.0))
            assert row["train_time_s"] == pytest.approx(1.25 * bs)
            assert row["final_loss"] == pytest.approx(6.0 - 0.5 * NUM_STEPS + 0.1 * bs)
    assert trials.loc["bf16_window8_bs4", "window"] == 8
    assert trials.loc["bf16_flash_bs4", "attention_kernel"] == "sdpa_flash"


def test_steps_is_long_format_history(results):
    steps = results.steps
    assert {"trial_id", "name", "step", "loss", "mem_step_peak_mib", "tokens_per_s", "oom", "val_ppl"} <= set(steps)
    assert not any(c.startswith("config/") for c in steps.columns)
    per_trial = steps[steps["name"] == "baseline_bs4"]
    assert per_trial["step"].max() == NUM_STEPS
    assert per_trial["mem_step_peak_mib"].max() == by_name(results).loc["baseline_bs4", "peak_mem_mib"]
    assert set(steps["trial_id"]) == set(results.trials["trial_id"])


def test_max_batch_loaded(results):
    assert list(results.max_batch["max_batch_size"]) == [6, 20]


def test_loads_through_a_storage_uri(experiment, results):
    """A URI goes through pyarrow's filesystem, as remote storage (s3://, gs://) does."""
    from analysis import load

    remote = load(f"file://{experiment}")
    assert remote.trials["status"].tolist() == results.trials["status"].tolist()
    assert len(remote.steps) == len(results.steps) and len(remote.max_batch) == 2


def test_write_report_writes_every_file(results, tmp_path):
    from analysis import format_table, write_report

    written = write_report(results, tmp_path)
    expected = {
        "comparison_report.txt", "comparison_report.md", "trials.csv", "steps.parquet", "max_batch.csv",
        "1_memory_vs_batch_size.png", "2_speed_vs_batch_size.png", "3_memory_speed_tradeoff.png",
        "4_technique_comparison_bs4.png", "5_window_size_comparison.png", "6_memory_savings_vs_baseline.png",
        "7_loss_curves.png",
    }
    assert set(written) == expected
    for name, path in written.items():
        assert path == tmp_path / name and path.stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert pd.read_csv(tmp_path / "trials.csv")["name"].tolist() == results.trials["name"].tolist()
    assert len(pd.read_parquet(tmp_path / "steps.parquet")) == len(results.steps)

    text = (tmp_path / "comparison_report.txt").read_text()
    for needle in ("baseline_bs8", "backward", "CUDA out of memory", "Incomplete trials", "bf16_flash_bs8",
                   "gradcp_bs4", "ValueError: synthetic failure at step 3", "Versus baseline (baseline)",
                   "Max batch size that fits", "Compared at batch size 4"):
        assert needle in text
    # bf16_flash at bs4 uses 40/100 of the baseline's memory per sequence: a 60% saving (+/- the step offsets).
    base, flash = by_name(results).loc["baseline_bs4"], by_name(results).loc["bf16_flash_bs4"]
    saving = 100 * (1 - flash["peak_mem_mib"] / base["peak_mem_mib"])
    assert f"{saving:+.1f}%" in text
    assert "| bf16_flash | 4 |" in (tmp_path / "comparison_report.md").read_text()
    table = format_table(results)
    assert table.count("\n") == len(CASES) + 4  # title, rule, header, dashes, one line per trial, note


def test_plots_degrade_without_windows_or_baseline(results, tmp_path):
    from analysis import SweepResults, write_report

    trials = results.trials[~results.trials["technique"].isin(["baseline"]) & results.trials["window"].isna()]
    subset = SweepResults(path=results.path, trials=trials, steps=results.steps[results.steps["trial_id"].isin(
        trials["trial_id"])])
    written = write_report(subset, tmp_path)
    assert "5_window_size_comparison.png" not in written and "6_memory_savings_vs_baseline.png" not in written
    assert "max_batch.csv" not in written
    text = (tmp_path / "comparison_report.txt").read_text()
    assert "5_window_size_comparison.png skipped" in text and "6_memory_savings_vs_baseline.png skipped" in text


def test_cli_writes_report_and_never_imports_pipeline(experiment, tmp_path):
    """In a fresh interpreter: the CLI's default output dir, and no import of trainable/sweep/data_prep."""
    code = (
        "import sys; from analysis.__main__ import main; rc = main([sys.argv[1]]); "
        "bad = [m for m in ('trainable', 'sweep', 'data_prep', 'torch') if m in sys.modules]; "
        "assert not bad, bad; sys.exit(rc)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(experiment)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (experiment / "analysis" / "comparison_report.md").is_file()
    assert "bf16_flash" in run.stdout


@pytest.mark.parametrize("make_path", [lambda tmp: tmp, lambda tmp: tmp / "missing"])
def test_not_an_experiment_is_one_line_exit_2(make_path, tmp_path, capsys):
    from analysis.__main__ import main

    assert main([str(make_path(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "analysis").exists()
