"""analysis.load on real Ray Tune experiments (test_analysis_fake): one row per trial with every status, the
numbers the trials reported, each step once, search and prediction frames, URIs, combined experiments."""
from __future__ import annotations

import pandas as pd
import pytest

from contract.experiment import GRID_KEY, KIND_KEY, MAX_BATCH_RECORD_KEYS
from test_analysis_fake import (
    CASES, FLOPS_PER_TOKEN, NUM_STEPS, PEAK_FLOPS, PREDICTIONS, PROBE_ENDINGS, PROBES, RESTART_END, SEARCH_RECORDS,
    SEQ_LEN, by_name, is_warmup, labelled, step_loss, step_memory, step_speed,
)

@pytest.mark.slow
def test_one_row_per_trial_with_statuses(results):
    trials = by_name(results)
    assert len(results.trials) == len(CASES) and results.trials["trial_id"].is_unique
    expected = {labelled(s): {"legacy": "ok", "restarted": "ok"}.get(e, e) for s, e in CASES}
    assert trials["status"].to_dict() == expected
    assert (trials["kind"] == "train").all()
    assert trials.loc["bf16_window16_bs4", "technique"] == "window"  # the preset; the label is derived
    assert trials.loc["bf16_window16_bs4", "label"] == "bf16_window16"
    assert trials.loc["bf16_window16_bs4", "family"] == "bf16"
    assert trials.loc["baseline_bs8", "oom_phase"] == "backward"
    assert trials.loc["baseline_bs8", "oom_mem_peak_mib"] == 1000.0
    assert trials.loc["baseline_bs8", "oom_message"].startswith("CUDA out of memory")
    assert trials.loc["gradcp_bs4", "error"] == "ValueError: synthetic failure at step 3"
    assert trials.loc["gradcp_bs4", "tune_status"] == "ERROR" and trials.loc["gradcp_bs4", "label"] == "gradcp"
    assert pd.isna(trials.loc["baseline_bs4", "error"])
    assert trials.loc["bf16_flash_compile_bs8", "tune_status"] == "TERMINATED"
    assert trials.loc["bf16_bs4", "steps_reported"] == 5 and pd.isna(trials.loc["bf16_bs4", "final_loss"])
    assert GRID_KEY not in results.trials and KIND_KEY not in results.trials


@pytest.mark.slow
def test_numbers_match_what_trials_reported(results):
    trials = by_name(results)
    for switches, ending in CASES:
        name = labelled(switches)
        row, label, bs = trials.loc[name], trials.loc[name, "label"], switches["batch_size"]
        last = {"oom": 2, "error": 2, "incomplete": 3, "nan": 5, "restarted": RESTART_END}.get(ending, NUM_STEPS)
        memory = [step_memory(label, bs, s) for s in range(1, last + 1)]
        assert row["peak_mem_mib"] == pytest.approx(max(memory + ([1000.0] if ending == "oom" else [])))
        assert row["steps_reported"] == last
        assert row["fwd_peak_mean_mib"] == pytest.approx(sum(memory) / len(memory) - 10)
        assert row["bwd_peak_max_mib"] == pytest.approx(max(memory))
        assert row["reserved_mib"] == pytest.approx(max(memory) + 30)
        assert row["batch_size"] == bs and row["seq_len"] == SEQ_LEN and row["num_params"] == 123456
        assert row["gpu_name"] == "Fake GPU"
        if ending not in ("ok", "legacy"):
            continue
        if ending == "legacy":  # no warm-up flag: the first 3 steps are skipped
            rule, measured = "skip_first_3", range(4, NUM_STEPS + 1)
            for column in ("mfu", "steady_tokens_per_s", "wall_tokens_per_s", "compile_time_s"):
                assert pd.isna(row[column]), column
        else:
            rule, measured = "warmup_flag", [s for s in range(1, NUM_STEPS + 1) if not is_warmup(label, s)]
            median = pd.Series([step_speed(label, bs, s) for s in measured]).median()
            assert row["mfu"] == pytest.approx(median * FLOPS_PER_TOKEN / PEAK_FLOPS)
            # the trial's own figures, beside analysis's median: each column one meaning
            assert row["steady_tokens_per_s"] == 777.0 * bs and row["wall_tokens_per_s"] == 700.0 * bs
            assert row["steady_mfu"] == 0.25 and row["compile_time_s"] == (1.0 if "compile" in label else 0.0)
        speeds = pd.Series([step_speed(label, bs, s) for s in measured])
        assert row["tokens_per_s"] == pytest.approx(speeds.median())
        assert row["tokens_per_s_q25"] == pytest.approx(speeds.quantile(0.25))
        assert row["tokens_per_s_q75"] == pytest.approx(speeds.quantile(0.75))
        assert row["speed_rule"] == rule and row["speed_steps"] == len(measured)
        assert row["speed_warmup_steps"] == NUM_STEPS - len(measured)
        assert row["val_loss"] == pytest.approx(3.0 + 0.01 * bs + (0.2 if "window" in label else 0.0))
        assert row["train_time_s"] == pytest.approx(1.25 * bs)
        assert row["final_loss"] == pytest.approx(step_loss(label, bs, NUM_STEPS))
    assert trials.loc["bf16_window8_bs4", "window"] == 8
    assert trials.loc["bf16_flash_compile_bs4", "attention_kernel"] == "sdpa_flash"
    assert trials.loc["bf16_flash_compile_bs4", "compile"] == True  # noqa: E712
    assert trials.loc["baseline_bs4", "loss"] == "standard" and trials.loc["gradcp_bs2", "checkpointing"] == "full"


@pytest.mark.slow
def test_a_restarted_trial_shows_each_step_once_from_its_latest_attempt(results):
    """result.json holds steps 1..6, then 5..8 again (a worker killed after step 6 resumed from a checkpoint)."""
    trial = by_name(results).loc["bf16_bs2"]
    steps = results.steps[results.steps["name"] == "bf16_bs2"]
    assert steps["step"].tolist() == list(range(1, RESTART_END + 1))
    assert steps["loss"].tolist() == pytest.approx([step_loss("bf16", 2, s) for s in range(1, RESTART_END + 1)])
    assert trial["steps_reported"] == RESTART_END and trial["status"] == "ok"
    assert trial["speed_warmup_steps"] == 2  # the first step of each process: 1 and 5


@pytest.mark.slow
def test_steps_is_long_format_history(results):
    steps = results.steps
    assert {"trial_id", "name", "step", "loss", "mem_step_peak_mib", "tokens_per_s", "oom", "val_ppl"} <= set(steps)
    assert not any(c.startswith("config/") for c in steps.columns)
    per_trial = steps[steps["name"] == "baseline_bs4"]
    assert per_trial["step"].tolist() == list(range(1, NUM_STEPS + 1))
    assert per_trial["mem_step_peak_mib"].max() == by_name(results).loc["baseline_bs4", "peak_mem_mib"]
    assert set(steps["trial_id"]) == set(results.trials["trial_id"])


@pytest.mark.slow
def test_a_grid_sweep_has_empty_search_and_prediction_frames_that_keep_their_columns(results):
    from analysis import PREDICTION_COLUMNS

    assert results.max_batch.empty and list(results.max_batch.columns[:len(MAX_BATCH_RECORD_KEYS)]) == list(
        MAX_BATCH_RECORD_KEYS)
    assert results.predictions.empty and list(results.predictions.columns) == list(PREDICTION_COLUMNS)
    assert results.probes.empty and list(results.probes.columns) == list(results.trials.columns)
    for frame in (results.max_batch, results.predictions, results.probes):
        assert frame["label"].tolist() == [] and frame["technique"].tolist() == []
    assert results.trials["predicted_peak_mib"].isna().all()


@pytest.mark.slow
def test_predictions_are_joined_by_trial_name(full):
    trials = by_name(full)
    assert trials.loc["baseline_bs4", "predicted_peak_mib"] == 420.0
    assert trials.loc["bf16_flash_compile_bs4", "predicted_upper_bound"] == True  # noqa: E712
    assert trials["predicted_peak_mib"].notna().sum() == 2
    assert set(full.predictions["scope"]) == {"trial", "seed_grid"}
    assert (full.predictions["budget_source"] == PREDICTIONS["budget"]).all()
    from analysis.memory_tables import memory_table

    table = memory_table(full.training())
    cells = {(r[0], r[1]): dict(zip(table.headers, r)) for r in table.rows}
    measured = trials.loc["baseline_bs4", "peak_mem_mib"]
    assert cells[("baseline", "4")]["predicted peak"] == "420"
    assert cells[("baseline", "4")]["model error"] == f"{100 * (420.0 / measured - 1):+.1f}%"


@pytest.mark.slow
def test_loads_through_a_storage_uri(experiment_full, full):
    """A URI goes through pyarrow's filesystem, as remote storage (s3://, gs://) does."""
    from analysis import load

    remote = load(f"file://{experiment_full}")
    assert remote.trials["status"].tolist() == full.trials["status"].tolist()
    assert len(remote.steps) == len(full.steps) and len(remote.max_batch) == 2 and len(remote.predictions) == 3


@pytest.mark.slow
def test_loads_a_relative_path(experiment, results, monkeypatch):
    """`python -m analysis results/NAME` from the working directory, as the sweep prints it."""
    from analysis import load

    monkeypatch.chdir(experiment.parent)
    relative = load(experiment.name)
    assert relative.trials["status"].tolist() == results.trials["status"].tolist()
    assert relative.path == str(experiment.resolve())


@pytest.mark.parametrize("make_path", [lambda tmp: tmp, lambda tmp: tmp / "missing"])
def test_not_an_experiment_is_one_line_exit_2(make_path, tmp_path, capsys):
    from analysis.__main__ import main

    assert main([str(make_path(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "analysis").exists()


@pytest.mark.slow
def test_max_batch_search_experiment(search_experiment, tmp_path):
    """Probe trials are listed (kind probe) but not compared as training runs; the report has the search's
    section with the prediction and the seeded vs unseeded cost, and plot 8 is the only plot."""
    from analysis import load
    from analysis.__main__ import main
    from analysis.search_tables import max_batch_table

    results = load(search_experiment)
    trials = by_name(results)
    assert sorted(trials.index) == sorted(PROBE_ENDINGS)
    assert (trials["kind"] == "probe").all() and len(results.probes) == len(PROBES)
    assert results.training().trials.empty
    assert main([str(search_experiment), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["8_max_batch.png"]
    text = (tmp_path / "comparison_report.txt").read_text()
    for needle in ("this experiment is a max-batch search (4 probe trials", "Max batch size that fits",
                   "Probe trials (max-batch search)", "probe_baseline_bs8", "Plots 1-7, 9 and 10 skipped",
                   "bf16_window16 (1 GB): search not finished (1 probes ran",
                   "Seeded by the memory model: 3 probes in 2 rounds; the unseeded search would have run 12 probes "
                   "in 7 rounds"):
        assert needle in text, needle
    assert "OOM trials" not in text  # a probe's OOM is the search's answer, not a failure
    rows = {r[0]: r for r in max_batch_table(results).rows}
    # technique, window, GPU limit, max batch, peak, predicted, probes/rounds, unseeded, parallelism, ...
    assert rows["baseline"][2:9] == ["1 GB", "4", "412", "5", "2/1", "7/4", "2"]
    assert rows["bf16_flash"][3] == ">=8"  # the search hit its upper bound
    assert "| baseline | - | 1 GB | 4 |" in (tmp_path / "comparison_report.md").read_text()


@pytest.mark.slow
def test_combined_experiments(experiment_full, search_experiment):
    from analysis import load, load_many

    both = load_many([experiment_full, search_experiment])
    assert len(both.trials) == len(CASES) + len(PROBES)
    assert set(both.trials["experiment"]) == {"fake_full", "fake_search"}
    assert len(both.max_batch) == 2 * len(SEARCH_RECORDS)
    assert set(both.predictions["experiment"]) == {"fake_full"}
    assert len(both.training().trials) == len(CASES)
    assert len(both.steps) == len(load(experiment_full).steps) + len(load(search_experiment).steps)
    assert by_name(both).loc["baseline_bs4", "predicted_peak_mib"] == 420.0
