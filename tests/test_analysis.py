"""analysis on a real Ray Tune experiment: a small function trainable reporting Contract 2's keys, with one
trial that runs out of memory (final OOM report) and one that raises (Tune ERROR); plus a small max-batch search
experiment (probe trials + max_batch.json) as `sweep.max_batch` writes it."""
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
COMPILED = {"bf16_flash"}  # torch.compile works in steps 1-2: both are flagged warm-up
LEGACY = {"bf16_window8"}  # reports no warm-up/compile/MFU keys, like trainables before them: the fallback rule
FLOPS_PER_TOKEN, PEAK_FLOPS = 1.0e6, 1.0e10


def step_memory(technique: str, batch_size: int, step: int) -> float:
    """Step peak grows for a few steps then settles, so the max is not simply the last step."""
    return MEMORY_FACTOR[technique] * batch_size + (7 - abs(step - 4))


def step_speed(technique: str, batch_size: int, step: int) -> float:
    """Step 1 is slow (warm-up); later steps vary, so the median is a real median."""
    base = 1000.0 * SPEED_FACTOR[technique] * batch_size
    return base / 10 if step == 1 else base + 10 * ((step * 7) % 5)


def is_warmup(technique: str, step: int) -> bool:
    return step == 1 or (technique in COMPILED and step <= 2)


def speed_keys(technique: str, step: int, speed: float) -> dict:
    """The warm-up flag, compile time and MFU a current trainable reports with each step (none when LEGACY)."""
    if technique in LEGACY:
        return {}
    compiling = technique in COMPILED and step <= 2
    return {"warmup": is_warmup(technique, step), "compiling": compiling, "mfu": speed * FLOPS_PER_TOKEN / PEAK_FLOPS,
            "compile_time_s": 0.5 * min(step, 2) if technique in COMPILED else 0.0}


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
    if technique not in LEGACY:
        facts |= {"compile": technique in COMPILED, "loss_fn": "standard", "model_flops_per_token": FLOPS_PER_TOKEN,
                  "peak_flops": PEAK_FLOPS}
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
            **speed_keys(technique, step, speed),
        }
        if step == 4:
            last |= {"val_loss": 4.0, "val_ppl": 54.6}
        tune.report({**facts, **last})
        last.pop("val_loss", None), last.pop("val_ppl", None)
    val_loss = 3.0 + 0.01 * bs + (0.2 if "window" in technique else 0.0)
    steady = {} if technique in LEGACY else {"steady_tokens_per_s": 777.0 * bs, "steady_mfu": 0.25}
    tune.report({**facts, **last, **steady, "final": True, "status": "ok", "train_time_s": 1.25 * bs,
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


# A max-batch search as sweep.max_batch writes it: probe trials named probe_<label>_bsN and the newer record
# fields; bf16_window16's search was interrupted (probes ran, no record).
PROBE_CASES = [("baseline", 4, "ok"), ("baseline", 8, "oom"), ("bf16_flash", 8, "ok"), ("bf16_window16", 4, "ok")]
SEARCH_RECORDS = [
    {"technique": "baseline", "preset": "baseline", "window": None, "max_batch_size": 4, "peak_mem_mib": 412.0,
     "probes": 2, "rounds": 1, "wall_time_s": 5.5, "gpu_memory_limit_gb": 1.0, "status": "ok", "error": None,
     "hit_upper_bound": False, "parallelism": 2, "seq_len": SEQ_LEN, "outcomes": {"4": "fits", "8": "oom"},
     "seeded": True, "predicted_max_batch": 5, "predicted_budget_mib": 1024.0, "unseeded_probes": 7,
     "unseeded_rounds": 4},
    {"technique": "bf16_flash", "preset": "flash", "window": None, "max_batch_size": 8, "peak_mem_mib": 333.0,
     "probes": 1, "rounds": 1, "wall_time_s": 2.5, "gpu_memory_limit_gb": 1.0, "status": "ok", "error": None,
     "hit_upper_bound": True, "parallelism": 2, "seq_len": SEQ_LEN, "outcomes": {"8": "fits"}, "seeded": True,
     "predicted_max_batch": 9, "predicted_budget_mib": 1024.0, "unseeded_probes": 5, "unseeded_rounds": 3},
]


def run_fake_experiment(storage: Path, name: str, cases: list, prefix: str = "", stop=None) -> Path:
    from ray import cloudpickle, tune

    # Ray's workers cannot import this test module: ship the trainable (and its helpers) by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tuner = tune.Tuner(
        fake_trial,
        param_space={"case": tune.grid_search(cases)},
        tune_config=tune.TuneConfig(
            reuse_actors=True,  # one worker process per CPU, not per trial: keeps the test fast
            trial_name_creator=lambda t: f"{prefix}{t.config['case'][0]}_bs{t.config['case'][1]}",
            trial_dirname_creator=lambda t: f"{prefix}{t.config['case'][0]}_bs{t.config['case'][1]}_{t.trial_id}",
        ),
        run_config=tune.RunConfig(storage_path=str(storage), name=name, verbose=0, stop=stop),
    )
    tuner.fit()
    return storage / name


@pytest.fixture(scope="module")
def experiment(ray_local, tmp_path_factory) -> Path:
    path = run_fake_experiment(tmp_path_factory.mktemp("tune"), "fake_sweep", CASES, stop=stop_interrupted)
    (path / "max_batch.json").write_text(json.dumps(MAX_BATCH))
    return path


@pytest.fixture(scope="module")
def search_experiment(ray_local, tmp_path_factory) -> Path:
    path = run_fake_experiment(tmp_path_factory.mktemp("search"), "fake_search", PROBE_CASES, prefix="probe_")
    (path / "max_batch.json").write_text(json.dumps(SEARCH_RECORDS))
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
            if technique in LEGACY:  # no warm-up flag: the first 3 steps are skipped
                rule, measured = "skip_first_3", range(4, NUM_STEPS + 1)
                assert pd.isna(row["mfu"]) and pd.isna(row["steady_tokens_per_s"]) and pd.isna(row["compile_time_s"])
            else:
                rule, measured = "warmup_flag", [s for s in range(1, NUM_STEPS + 1) if not is_warmup(technique, s)]
                median_speed = pd.Series([step_speed(technique, bs, s) for s in measured]).median()
                assert row["mfu"] == pytest.approx(median_speed * FLOPS_PER_TOKEN / PEAK_FLOPS)
                assert row["steady_tokens_per_s"] == 777.0 * bs and row["steady_mfu"] == 0.25
                assert row["compile_time_s"] == (1.0 if technique in COMPILED else 0.0)
                assert row["compile"] == (technique in COMPILED) and row["loss_fn"] == "standard"
            speeds = pd.Series([step_speed(technique, bs, s) for s in measured])
            assert row["tokens_per_s"] == pytest.approx(speeds.median())
            assert row["speed_rule"] == rule
            assert row["speed_warmup_steps"] == NUM_STEPS - len(measured)
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


def test_loads_a_relative_path(experiment, results, monkeypatch):
    """`python -m analysis results/NAME` from the working directory, as the sweep prints it."""
    from analysis import load

    monkeypatch.chdir(experiment.parent)
    relative = load(experiment.name)
    assert relative.trials["status"].tolist() == results.trials["status"].tolist()
    assert relative.path == str(experiment.resolve())


def test_write_report_writes_every_file(results, tmp_path):
    from analysis import format_table, write_report

    written = write_report(results, tmp_path)
    expected = {
        "comparison_report.txt", "comparison_report.md", "trials.csv", "steps.parquet", "max_batch.csv",
        "1_memory_vs_batch_size.png", "2_speed_vs_batch_size.png", "3_memory_speed_tradeoff.png",
        "4_technique_comparison_bs4.png", "5_window_size_comparison.png", "6_memory_savings_vs_baseline.png",
        "7_loss_curves.png", "8_max_batch.png",
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
                   "Max batch size that fits", "Compared at batch size 4", "MFU", "compile (s)",
                   # the legacy trial is named as the one that fell back to the skip-first-steps rule
                   "these trials predate the warm-up flag): bf16_window8_bs4"):
        assert needle in text, needle
    from analysis.report import comparison_table

    table = comparison_table(results)
    cells = {(r[0], r[1]): dict(zip(table.headers, r)) for r in table.rows}
    assert cells[("bf16_flash", "4")]["compile (s)"] == "1.0" and cells[("baseline", "4")]["compile (s)"] == "off"
    assert cells[("bf16_window8", "4")]["compile (s)"] == "-" and cells[("bf16_window8", "4")]["MFU"] == "-"
    assert cells[("bf16_flash", "4")]["MFU"] == f"{100 * by_name(results).loc['bf16_flash_bs4', 'mfu']:.1f}%"
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


def test_max_batch_search_experiment(search_experiment, tmp_path):
    """Probe trials are listed (kind probe) but not compared as training runs; the report has the search's
    section with the prediction and the seeded vs unseeded cost, and plot 8 is the only plot."""
    from analysis.__main__ import main
    from analysis import load

    results = load(search_experiment)
    trials = by_name(results)
    assert sorted(trials.index) == sorted(f"probe_{t}_bs{bs}" for t, bs, _ in PROBE_CASES)
    assert (trials["kind"] == "probe").all() and len(results.probes) == len(PROBE_CASES)
    assert results.training().trials.empty
    assert main([str(search_experiment), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["8_max_batch.png"]
    text = (tmp_path / "comparison_report.txt").read_text()
    for needle in ("this experiment is a max-batch search (4 probe trials", "Max batch size that fits",
                   "Probe trials (max-batch search)", "probe_baseline_bs8", "Plots 1-7 skipped",
                   "bf16_window16 (1 GB): search not finished (1 probes ran",
                   "Seeded by the memory model: 3 probes in 2 rounds; the unseeded search would have run 12 probes "
                   "in 7 rounds"):
        assert needle in text, needle
    assert "OOM trials" not in text  # a probe's OOM is the search's answer, not a failure
    from analysis.report import max_batch_table

    rows = {r[0]: r for r in max_batch_table(results).rows}
    # technique, window, GPU limit, max batch, peak, predicted, probes/rounds, unseeded, parallelism, ...
    assert rows["baseline"][2:9] == ["1 GB", "4", "412", "5", "2/1", "7/4", "2"]
    assert rows["bf16_flash"][3] == ">=8"  # the search hit its upper bound
    assert "| baseline | - | 1 GB | 4 |" in (tmp_path / "comparison_report.md").read_text()


def test_combined_experiments(experiment, search_experiment):
    from analysis import load, load_many

    both = load_many([experiment, search_experiment])
    assert len(both.trials) == len(CASES) + len(PROBE_CASES)
    assert set(both.trials["experiment"]) == {"fake_sweep", "fake_search"}
    assert len(both.max_batch) == len(MAX_BATCH) + len(SEARCH_RECORDS)
    assert len(both.training().trials) == len(CASES)
    assert len(both.steps) == len(load(experiment).steps) + len(load(search_experiment).steps)


def test_plot_max_batch_groups_memory_limits():
    from analysis import SweepResults
    from analysis.plots import plot_max_batch

    records = pd.DataFrame([
        {"technique": "baseline", "max_batch_size": 150, "gpu_memory_limit_gb": 32.0, "predicted_max_batch": 140},
        {"technique": "bf16_flash", "max_batch_size": 260, "gpu_memory_limit_gb": 32.0, "predicted_max_batch": None},
        {"technique": "bf16_flash", "max_batch_size": 1240, "gpu_memory_limit_gb": None, "predicted_max_batch": 1157},
        {"technique": "gradcp", "max_batch_size": None, "gpu_memory_limit_gb": None, "status": "error"},
    ])
    trials = pd.DataFrame({"gpu_name": ["H200"], "kind": ["train"]})
    name, fig = plot_max_batch(SweepResults(path="x", trials=trials, steps=pd.DataFrame(), max_batch=records))
    ax = fig.axes[0]
    assert name == "8_max_batch.png"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bf16_flash", "baseline", "gradcp"]
    assert sorted(p.get_height() for p in ax.patches) == [0.0, 150, 260, 1240]
    labels = ax.get_legend_handles_labels()[1]
    assert {"32 GB limit", "full GPU", "predicted by the memory model"} <= set(labels)
    assert "error" in [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("limit_gb, total_mib, line", [(1.0, 1e6, True), (None, 1e6, False), (None, 1500.0, True)])
def test_memory_plot_draws_the_limit_only_when_it_matters(results, limit_gb, total_mib, line):
    """An emulated limit is always drawn; the GPU's total only when the data reaches half of it (else the
    curves would be squashed), and then the title names it."""
    from analysis import SweepResults
    from analysis.plots import plot_memory_vs_batch

    trials = results.trials.assign(gpu_memory_limit_gb=limit_gb, gpu_total_mib=total_mib)
    _, fig = plot_memory_vs_batch(SweepResults(path=results.path, trials=trials, steps=results.steps))
    ax = fig.axes[0]
    limit_lines = [ln for ln in ax.get_lines() if "memory" in str(ln.get_label())]
    assert bool(limit_lines) == line
    assert ("MiB total" in ax.get_title()) == (not line)
    assert ax.get_ylim()[1] < 2 * trials["peak_mem_mib"].max() or line


def test_report_files_are_readable_by_others(tmp_path):
    """Reports are shared: atomic writes must not leave the 0600 mode of a private temp file."""
    import os
    import stat

    from analysis.report import _atomic_write

    old = os.umask(0o022)
    try:
        path = _atomic_write(tmp_path / "r.txt", lambda p: p.write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_a_restarted_trial_counts_each_step_once_from_its_resumed_run():
    """Steps after the last checkpoint are reported by the killed attempt and again by the resumed one."""
    import pandas as pd

    from analysis.load import step_rows

    history = pd.DataFrame({
        "step": [1, 2, 3, 4, 3, 4, 5, 5],
        "loss": [9.0, 8.0, 7.5, 7.0, 7.4, 6.9, 6.5, 6.5],  # killed after step 4; resumed from the step-2 checkpoint
        "final": [False] * 7 + [True],
        "oom": [False] * 8,
    })
    rows = step_rows(history)
    assert rows["step"].tolist() == [1, 2, 3, 4, 5]
    assert rows["loss"].tolist() == [9.0, 8.0, 7.4, 6.9, 6.5]
