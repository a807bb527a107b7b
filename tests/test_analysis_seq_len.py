"""Sequence length as a grid axis: plot 10 (memory and tokens/s against seq_len) and the crossover table (each
technique's peak against full-attention flash at the same seq_len), on SweepResults shaped as `analysis.load`
returns them for a `--seq-lens` sweep (trial names with `_s<seq_len>`)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

SEQ_LENS = (256, 1024, 4096)
BATCH = 8
# label -> {seq_len: (status, measured peak, predicted peak, tokens/s)}; flash runs out of memory at 4096 where
# the window (window 128) still fits; the window saves 3% over flash at 1024 and nothing at 256.
MEASURED = {
    "bf16_flash": {256: ("ok", 1000.0, 1010.0, 9e5), 1024: ("ok", 3000.0, 3050.0, 8e5),
                   4096: ("oom", 9500.0, 12000.0, None)},
    "bf16_window128": {256: ("ok", 1000.0, 1010.0, 8.5e5), 1024: ("ok", 2910.0, 2950.0, 8.8e5),
                       4096: ("ok", 9000.0, 9100.0, 8.6e5)},
    "baseline": {256: ("ok", 1500.0, 1520.0, 4e5), 1024: ("ok", 6000.0, 6100.0, 2e5),
                 4096: ("oom", 9900.0, 60000.0, None)},
}
SWITCHES = {"bf16_flash": ("bf16", "flash", None, "bf16"), "bf16_window128": ("bf16", "window", 128, "bf16"),
            "baseline": ("tf32", "standard", None, "baseline")}


def seq_len_results(measured: bool = True):
    from analysis import TRIAL_COLUMNS, SweepResults

    rows = []
    for label, by_seq in MEASURED.items():
        precision, attention, window, family = SWITCHES[label]
        for seq, (status, peak, predicted, speed) in by_seq.items():
            rows.append({
                "trial_id": f"{label}_{seq}", "name": f"{label}_s{seq}_bs{BATCH}", "kind": "train", "label": label,
                "family": family, "status": status, "precision": precision, "attention": attention, "window": window,
                "checkpointing": "none", "loss": "standard", "compile": False, "batch_size": BATCH, "seq_len": seq,
                "peak_mem_mib": peak if measured else math.nan, "predicted_peak_mib": predicted,
                "tokens_per_s": speed, "device": "cuda" if measured else "cpu",
                "gpu_name": "NVIDIA H200" if measured else None, "val_ppl": 50.0 if status == "ok" else None,
                "oom_mem_peak_mib": peak if status == "oom" and measured else math.nan,
            })
    trials = pd.DataFrame(rows).reindex(columns=list(TRIAL_COLUMNS))
    return SweepResults(path="seq", trials=trials, steps=pd.DataFrame(columns=["trial_id", "name", "step"]))


def test_crossover_table_says_where_windows_start_to_pay():
    from analysis.seq_tables import seq_len_table
    from analysis.text import render_text

    table = seq_len_table(seq_len_results())
    rows = {(r[0], r[2]): dict(zip(table.headers, r)) for r in table.rows}
    assert rows[("256", "bf16_flash")]["memory vs reference"] == "reference"
    assert rows[("256", "bf16_window128")]["memory vs reference"] == "+0.0%"
    assert rows[("1024", "bf16_window128")]["memory vs reference"] == "-3.0%"
    assert rows[("1024", "bf16_window128")]["speed vs reference"] == "+10.0%"
    assert rows[("4096", "bf16_window128")]["memory vs reference"] == "fits; bf16_flash OOM"
    assert rows[("4096", "bf16_window128")]["peak (MiB)"] == "9,100 (p)"  # flash OOM: both sides predicted
    assert rows[("1024", "baseline")]["reference"] == "bf16_flash"  # no flash of its own: plain flash
    assert rows[("4096", "baseline")]["memory vs reference"] == "OOM (needs +400.0%, p)"
    text = render_text(table)
    assert "bf16_window128 starts to pay at seq_len 1024 (-3.0% memory vs bf16_flash)." in text


def test_crossover_on_cpu_compares_with_standard_attention_from_predictions():
    """A CPU sweep runs no flash (it needs CUDA): windows are compared with their standard-attention family, on
    predicted peaks, and say so."""
    from analysis import SweepResults
    from analysis.seq_tables import seq_len_table

    results = seq_len_results(measured=False)
    trials = results.trials[results.trials["label"] != "bf16_flash"].copy()
    bf16 = trials[trials["label"] == "baseline"].assign(label="bf16", precision="bf16", family="bf16", status="ok",
                                                        trial_id=lambda f: "bf16_" + f["trial_id"])
    table = seq_len_table(SweepResults("cpu", pd.concat([trials, bf16]), results.steps))
    rows = {(r[0], r[2]): dict(zip(table.headers, r)) for r in table.rows}
    assert rows[("1024", "bf16_window128")]["reference"] == "bf16"
    assert rows[("1024", "bf16_window128")]["memory vs reference"] == f"{100 * (2950 / 6100 - 1):+.1f}% (p)"
    assert any("(p): predicted by the memory model for a CUDA GPU; not measured" in n for n in table.notes)


def test_seq_len_plot_draws_measured_solid_and_predicted_dashed(tmp_path):
    from analysis.plots import plot_seq_len

    name, fig = plot_seq_len(seq_len_results())
    left, right = fig.axes
    assert name == "10_seq_len.png"
    assert [t.get_text() for t in left.get_xticklabels()] == [str(s) for s in SEQ_LENS]
    assert left.get_xscale() == "log"
    lines = {ln.get_label(): ln for ln in left.get_lines()}
    assert list(lines["bf16_flash"].get_xdata()) == [256, 1024]  # measured where it completed
    assert lines["bf16_flash (predicted)"].get_linestyle() == "--"
    # from the last measured point on to what it would have needed at 4096
    assert list(lines["bf16_flash (predicted)"].get_ydata()) == [3000.0, 12000.0]
    assert lines["bf16_window128"].get_linestyle() == "-"
    assert "OOM" in left.get_legend_handles_labels()[1]
    speeds = {ln.get_label(): list(ln.get_ydata()) for ln in right.get_lines()}
    assert speeds["bf16_window128"] == [8.5e5, 8.8e5, 8.6e5]
    fig.savefig(tmp_path / name)


def test_seq_len_plot_on_cpu_is_all_predicted():
    from analysis.plots import plot_seq_len

    _, fig = plot_seq_len(seq_len_results(measured=False))
    labels = [ln.get_label() for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert labels and all(label.endswith("(predicted)") for label in labels)
    assert "predicted by the memory model for a CUDA GPU; not measured" in fig._suptitle.get_text()


def test_a_single_seq_len_skips_the_plot_and_the_table():
    from analysis import SweepResults
    from analysis.plots import SkipPlot, plot_seq_len
    from analysis.seq_tables import seq_len_table

    results = seq_len_results()
    one = SweepResults("one", results.trials[results.trials["seq_len"] == 1024], results.steps)
    with pytest.raises(SkipPlot, match="10_seq_len.png skipped: the experiment has a single seq_len"):
        plot_seq_len(one)
    assert seq_len_table(one) is None


def test_report_shows_seq_len_beside_each_trial():
    from analysis import format_report

    text = format_report(seq_len_results())
    assert "Sequence length: techniques vs full attention (flash where it ran)" in text
    comparison = text[text.index("Comparison"):text.index("Memory details")]
    assert "seq_len" in comparison.splitlines()[2]
    assert "Model:" not in text or "seq_len" not in text.splitlines()[3]  # several seq_lens: not one model line
