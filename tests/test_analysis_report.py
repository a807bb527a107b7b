"""The report, tables and plots analysis writes, on real Ray Tune experiments (test_analysis_fake) and on
SweepResults derived from them: every file, where the memory goes, the speed winner only beyond noise, identical
loss curves, coinciding points, predicted memory for CPU trials, max batch of combined searches."""
from __future__ import annotations

import stat
import subprocess
import sys

import pandas as pd
import pytest

from contract.keys import BREAKDOWN_KEYS, MEMORY_COMPONENTS
from test_analysis_fake import BLOCK_PIPELINE, CASES, MEMORY_FACTOR, by_name, step_loss, step_memory

@pytest.mark.slow
def test_write_report_writes_every_file(full, tmp_path):
    import os

    from analysis import format_table, write_report
    from analysis.report import comparison_table

    old = os.umask(0o022)
    try:
        written = write_report(full, tmp_path)
    finally:
        os.umask(old)
    expected = {
        "comparison_report.txt", "comparison_report.md", "trials.csv", "steps.parquet", "max_batch.csv",
        "predictions.csv", "1_memory_vs_batch_size.png", "2_speed_vs_batch_size.png", "3_memory_speed_tradeoff.png",
        "4_technique_comparison_bs4.png", "5_window_size_comparison.png", "6_memory_savings_vs_baseline.png",
        "7_loss_curves.png", "8_max_batch.png", "9_memory_breakdown.png",
    }
    assert set(written) == expected
    for name, path in written.items():
        assert path == tmp_path / name and path.stat().st_size > 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, name  # shared reports: not a temp file's 0600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert pd.read_csv(tmp_path / "trials.csv")["name"].tolist() == full.trials["name"].tolist()
    assert len(pd.read_parquet(tmp_path / "steps.parquet")) == len(full.steps)

    text = (tmp_path / "comparison_report.txt").read_text()
    for needle in ("baseline_bs8", "backward", "CUDA out of memory", "Incomplete trials", "bf16_flash_compile_bs8",
                   "gradcp_bs4", "ValueError: synthetic failure at step 3", "Versus baseline (baseline)",
                   "Diverged trials (the loss went NaN or infinite)", "Max batch size that fits",
                   "Compared at batch size 4", "MFU", "compile (s)", "tokens/s (GPU)", "tokens/s (wall)",
                   "Where the memory goes (MiB)", "it differs from the median when step times vary",
                   # the legacy trial is named as the one that fell back to the skip-first-steps rule
                   "for bf16_window8_bs4: the steps after the first 3",
                   "10_seq_len.png skipped: the experiment has a single seq_len"):
        assert needle in text, needle
    assert "Seed grid predicted" not in text  # measured memory: the predicted seed grid is for GPU-less sweeps
    diverged = text[text.index("Diverged trials"):]
    assert f"bf16_bs4  4           5        {step_loss('bf16', 4, 4):.3f}" in diverged
    table = comparison_table(full)
    cells = {(r[0], r[1]): dict(zip(table.headers, r)) for r in table.rows}
    flash, base = cells[("bf16_flash_compile", "4")], cells[("baseline", "4")]
    assert flash["compile (s)"] == "1.0" and base["compile (s)"] == "off"
    assert cells[("bf16_window8", "4")]["MFU"] == "-" and cells[("bf16_window8", "4")]["tokens/s (wall)"] == "-"
    row = by_name(full).loc["bf16_flash_compile_bs4"]
    assert flash["MFU"] == f"{100 * row['mfu']:.1f}%" and flash["tokens/s (wall)"] == f"{700 * 4:,.0f}"
    assert flash["tokens/s (GPU)"] == f"{row['tokens_per_s']:,.0f}"
    assert flash["spread"] == f"±{50 * (row['tokens_per_s_q75'] - row['tokens_per_s_q25']) / row['tokens_per_s']:.0f}%"
    # bf16_flash_compile at bs4 uses 40/100 of the baseline's memory per sequence: a 60% saving (+/- the offsets).
    saving = 100 * (1 - row["peak_mem_mib"] / by_name(full).loc["baseline_bs4", "peak_mem_mib"])
    assert f"{saving:+.1f}%" in text
    assert "| bf16_flash_compile | 4 |" in (tmp_path / "comparison_report.md").read_text()
    printed = format_table(full)  # what the sweep prints: the table and one short note
    assert printed.count("\n") == len(CASES) + 4  # title, rule, header, dashes, one line per trial, the note
    assert printed.splitlines()[-1].startswith("tokens/s (GPU): median over the steady steps")


@pytest.mark.slow
def test_where_the_memory_goes(full, tmp_path):
    """The final report's component keys land in `trials`, in the report's table and in plot 9."""
    from analysis.memory_tables import breakdown_table
    from analysis.plots import plot_memory_breakdown

    trials = by_name(full)
    for key in BREAKDOWN_KEYS:
        assert key in full.trials, key
    peak = step_memory("baseline", 4, 4)
    assert trials.loc["baseline_bs4", "measured_optimizer_mib"] == pytest.approx(0.2 * peak)
    assert trials.loc["baseline_bs4", "breakdown_phase"] == "backward"
    assert pd.isna(trials.loc["bf16_window16_bs4", "measured_params_mib"])
    table = breakdown_table(full.training())
    assert table.headers == ["component", "baseline", "bf16_flash_compile", "bf16_window16"]  # window8 has none
    rows = {r[0]: r[1:] for r in table.rows}
    assert list(rows)[:len(MEMORY_COMPONENTS)] == list(MEMORY_COMPONENTS)
    assert rows["optimizer"][0] == f"{0.2 * peak:,.0f} / {0.2 * peak * 1.02:,.0f} (20%)"
    assert rows["optimizer"][2].startswith("- / ")  # predicted only, its share of the predicted peak
    assert rows["largest"] == ["act_attention"] * 3
    assert rows["components sum to peak"][0] == "ok (+0.0%)"
    assert rows["components sum to peak"][1] == "OFF (-3.0%)" and rows["components sum to peak"][2] == "-"
    assert rows["peak phase"] == ["backward", "backward", "-"]
    name, fig = plot_memory_breakdown(full.training())
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert name == "9_memory_breakdown.png"
    assert ticks == ["baseline", "bf16_flash_compile", "bf16_window16\n(predicted)"]
    stacked = sum(p.get_height() for p in fig.axes[0].patches if abs(p.get_x() + p.get_width() / 2) < 1e-9)
    assert stacked == pytest.approx(peak)  # the measured baseline's bar is its measured peak
    assert any(p.get_hatch() == "//" for p in fig.axes[0].patches)
    fig.savefig(tmp_path / name)


@pytest.mark.slow
def test_best_technique_names_a_speed_winner_only_beyond_noise(full):
    from analysis import SweepResults
    from analysis.compare import best_table

    rows = {r[0]: r for r in best_table(full.training()).rows}
    assert rows["speed (highest tokens/s)"][1] == "bf16_flash_compile"  # 10 steady steps, IQRs far apart
    trials = full.trials.copy()
    window = trials["name"] == "bf16_window16_bs4"
    flash = trials.loc[trials["name"] == "bf16_flash_compile_bs4"].iloc[0]
    trials.loc[window, ["tokens_per_s", "tokens_per_s_q25", "tokens_per_s_q75"]] = [
        flash["tokens_per_s"] - 1, flash["tokens_per_s_q25"] - 5, flash["tokens_per_s_q75"] - 5]
    noisy = best_table(SweepResults(full.path, trials, full.steps).training())
    speed = {r[0]: r for r in noisy.rows}["speed (highest tokens/s)"]
    assert speed[1] == "-" and speed[2].startswith(
        "within noise: bf16_flash_compile and bf16_window16 are not distinguishable (10 and 11 steady steps")
    trials.loc[window, "speed_steps"] = 4
    few = {r[0]: r for r in best_table(SweepResults(full.path, trials, full.steps).training()).rows}
    assert few["speed (highest tokens/s)"][2].startswith("no speed winner: too few steady steps to rank "
                                                         "(bf16_window16 4; at least 10 each needed")


@pytest.mark.slow
def test_loss_curves_name_identical_curves(results):
    """gradcp recomputes activations: its loss curve is the baseline's, and the legend says so."""
    from analysis.plots import plot_loss_curves

    _, fig = plot_loss_curves(results.training())
    legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes
               if ax.get_legend() is not None}
    assert "baseline = gradcp (identical curves)" in legends["batch size 2"]
    assert "bf16_flash_compile" in legends["batch size 2"]  # 0.01 nats apart: not identical
    assert "bf16 (nan)" in legends["batch size 4"] and "gradcp (error)" in legends["batch size 4"]
    assert "identical" in fig._suptitle.get_text()


@pytest.mark.slow
def test_tradeoff_labels_coinciding_points_once(results):
    from analysis import SweepResults
    from analysis.plots import plot_tradeoff

    trials = results.trials.copy()
    same = trials["name"].isin(["bf16_window16_bs4", "bf16_window8_bs4"])
    trials.loc[same, ["peak_mem_mib", "tokens_per_s"]] = [321.0, 7000.0]
    _, fig = plot_tradeoff(SweepResults(results.path, trials, results.steps))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "bs4: bf16_window16, bf16_window8" in texts
    assert not any(t == "bs4bs4" or t.count("bs4") > 1 for t in texts)


@pytest.mark.slow
def test_plots_degrade_without_windows_or_baseline(results, tmp_path):
    from analysis import SweepResults, write_report

    trials = results.trials[(results.trials["label"] != "baseline") & results.trials["window"].isna()]
    subset = SweepResults(path=results.path, trials=trials, steps=results.steps[results.steps["trial_id"].isin(
        trials["trial_id"])])
    written = write_report(subset, tmp_path)
    assert "5_window_size_comparison.png" not in written and "6_memory_savings_vs_baseline.png" not in written
    assert "max_batch.csv" not in written and "predictions.csv" not in written
    text = (tmp_path / "comparison_report.txt").read_text()
    assert "5_window_size_comparison.png skipped" in text
    assert "6_memory_savings_vs_baseline.png skipped: no completed baseline trial" in text


@pytest.mark.slow
def test_cpu_trials_show_predicted_memory_and_say_so(results):
    """Trials that measured no GPU memory: plots 1, 3, 6 and the memory tables use the predicted CUDA peaks,
    labelled as predictions; without predictions, plot 6 gives the true reason."""
    from analysis import SweepResults, format_report
    from analysis.load import MEMORY_AGGREGATES
    from analysis.plots import SkipPlot, plot_memory_savings, plot_memory_vs_batch, plot_tradeoff

    ok = results.trials["status"] == "ok"
    cpu = results.trials[ok].assign(device="cpu", gpu_name=None, gpu_total_mib=float("nan"),
                                    **{c: float("nan") for c in MEMORY_AGGREGATES})
    cpu["predicted_peak_mib"] = 100.0 + cpu["batch_size"] * cpu["label"].map(MEMORY_FACTOR)
    predicted = SweepResults(results.path, cpu, results.steps)
    text = format_report(predicted)
    for needle in ("Device: CPU (GPU memory not measured; the memory figures below are the memory model's",
                   "Memory details (MiB), predicted for a CUDA GPU", "predicted peak (MiB)",
                   "memory (lowest peak)         bf16_flash_compile  260 MiB (predicted; not measured)"):
        assert needle in text, needle
    for plot in (plot_memory_vs_batch, plot_tradeoff, plot_memory_savings):
        _, fig = plot(predicted)
        titles = " ".join(t.get_text() for ax in fig.axes for t in (ax.title,)) + fig.axes[0].get_ylabel()
        assert "predicted" in titles, plot.__name__
    _, fig = plot_memory_vs_batch(predicted)
    assert "predicted by the memory model for a CUDA GPU; not measured" in fig.axes[0].get_title()
    bare = SweepResults(results.path, cpu.assign(predicted_peak_mib=float("nan")), results.steps)
    for plot in (plot_memory_vs_batch, plot_memory_savings):
        with pytest.raises(SkipPlot, match="no GPU memory was measured \\(CPU trials\\) and the experiment has no "
                                           "memory-model predictions"):
            plot(bare)


@pytest.mark.slow
def test_cli_runs_in_an_interpreter_that_cannot_import_the_pipeline(experiment_full, tmp_path):
    """A fresh interpreter in which importing torch, trainable, sweep or data_prep raises loads the experiment and
    writes the report: analysis reads plain files only."""
    code = BLOCK_PIPELINE + (
        "from analysis.__main__ import main; rc = main([sys.argv[1], '--out', sys.argv[2]]); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, str(experiment_full), str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "comparison_report.md").is_file() and (tmp_path / "8_max_batch.png").is_file()
    assert "bf16_flash_compile" in run.stdout


def test_plot_max_batch_shows_every_technique_of_combined_records():
    """Records from several experiments (each a part of the techniques, some under a 32 GB limit, some not):
    every technique with a record gets its bars, and one record per technique and limit is drawn."""
    from analysis import SweepResults, combine
    from analysis.plots import plot_max_batch

    def part(trial_id: str, records: list[dict]) -> SweepResults:
        return SweepResults(path=trial_id, trials=pd.DataFrame({"gpu_name": ["H200"], "kind": ["train"],
                                                                "trial_id": [trial_id]}),
                            steps=pd.DataFrame(), max_batch=pd.DataFrame(records))

    first = part("a", [{"label": "baseline", "max_batch_size": 156, "gpu_memory_gb": 32.0, "predicted_max_batch": 146},
                  {"label": "bf16_flash", "max_batch_size": 260, "gpu_memory_gb": 32.0},
                  {"label": "bf16_flash", "max_batch_size": 1240, "gpu_memory_gb": None, "predicted_max_batch": 1157}])
    second = part("b", [{"label": "bf16_window16", "window": 16, "max_batch_size": 1137, "gpu_memory_gb": None},
                   {"label": "bf16_flash", "max_batch_size": 260, "gpu_memory_gb": 32.0},
                   {"label": "gradcp", "max_batch_size": None, "gpu_memory_gb": None, "status": "error"}])
    name, fig = plot_max_batch(combine([first, second]))
    ax = fig.axes[0]
    assert name == "8_max_batch.png"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bf16_flash", "bf16_window16", "baseline", "gradcp"]
    assert sorted(p.get_height() for p in ax.patches) == [0.0, 156, 260, 1137, 1240]
    labels = ax.get_legend_handles_labels()[1]
    assert {"32 GB limit", "full GPU", "predicted by the memory model (when the search ran)"} <= set(labels)
    assert "error" in [t.get_text() for t in ax.texts]


@pytest.mark.slow
@pytest.mark.parametrize("limit_gb, total_mib, line", [(1.0, 1e6, True), (None, 1e6, False), (None, 1500.0, True)])
def test_memory_plot_draws_the_limit_only_when_it_matters(results, limit_gb, total_mib, line):
    """An emulated limit is always drawn; the GPU's total only when the data reaches half of it (else the
    curves would be squashed), and then the title names it."""
    from analysis import SweepResults
    from analysis.plots import plot_memory_vs_batch

    trials = results.trials.assign(gpu_memory_gb=limit_gb, gpu_total_mib=total_mib)
    _, fig = plot_memory_vs_batch(SweepResults(path=results.path, trials=trials, steps=results.steps))
    ax = fig.axes[0]
    limit_lines = [ln for ln in ax.get_lines() if "memory" in str(ln.get_label())]
    assert bool(limit_lines) == line
    assert ("MiB total" in ax.get_title()) == (not line)
    assert ax.get_ylim()[1] < 2 * trials["peak_mem_mib"].max() or line
