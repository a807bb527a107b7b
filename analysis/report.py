"""The comparison report (text and Markdown) and everything `write_report` puts in an output directory."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from contract.io import atomic_write

from .compare import STATUS_ORDER, baseline_table, best_table, comparison_table, failures_tables
from .load import SweepResults
from .memory_tables import breakdown_table, memory_table, seed_grid_tables
from .plots import PLOTS, SkipPlot, plot_technique_comparison
from .search_tables import max_batch_table, probes_table
from .selection import comparison_batch_size, comparison_note, memory_source
from .seq_tables import seq_len_table
from .text import Table, missing, params, render_markdown, render_text

__all__ = ["comparison_table", "format_max_batch_table", "format_report", "format_table", "max_batch_table",
           "report_tables", "write_report"]


def report_tables(results: SweepResults) -> list[Table]:
    training = results.training()
    search_only = training.trials.empty and len(results.probes) > 0
    tables = [comparison_table(results)]
    if not search_only:
        tables += [memory_table(training)]
        tables += [t for t in (breakdown_table(training),) if t is not None]
        tables += [baseline_table(training), best_table(training)]
        tables += [t for t in (seq_len_table(training),) if t is not None]
        tables += seed_grid_tables(results)
    tables += [t for t in (max_batch_table(results), probes_table(results)) if t is not None]
    return tables + ([] if search_only else failures_tables(results))


def summary_lines(results: SweepResults) -> list[str]:
    trials = results.trials
    counts = trials["status"].value_counts()
    status = ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if s in counts)
    empty = pd.Series(dtype=object)
    gpus = sorted(str(g) for g in trials.get("gpu_name", empty).dropna().unique())
    lines = [f"Experiment: {results.path}", f"Trials: {len(trials)} ({status or 'none'})"]
    if len(results.probes):
        lines.append(f"Max-batch search: {len(results.probes)} of these trials are its probes")
    if gpus:
        lines.append(f"GPU: {', '.join(gpus)}")
    elif trials.get("device", empty).eq("cpu").any():
        source = memory_source(results.training().trials)
        lines.append("Device: CPU (GPU memory not measured" + (
            "; the memory figures below are the memory model's predictions for a CUDA GPU)"
            if source is not None and source.predicted else ")"))
    limits = pd.to_numeric(trials.get("gpu_memory_gb", empty), errors="coerce").dropna()
    if len(limits) and limits.max() > 0:
        lines.append(f"GPU memory limit: {limits.max():g} GB")
    sizes = trials.get("num_params", empty).dropna().unique()
    if len(sizes) == 1:
        lines.append(f"Model: {params(sizes[0])} parameters" + _model_shape(trials))
    return lines


def _model_shape(trials: pd.DataFrame) -> str:
    parts = []
    for column, name in (("n_layers", "layers"), ("d_model", "d_model"), ("seq_len", "seq_len")):
        values = trials[column].dropna().unique() if column in trials else []
        if len(values) == 1 and not missing(values[0]):
            parts.append(f"{name} {int(values[0])}")
    return f" ({', '.join(parts)})" if parts else ""


def format_table(results: SweepResults) -> str:
    """The comparison table as aligned text with one short note (what the sweep prints at the end of a run)."""
    return render_text(comparison_table(results, brief=True))


def format_max_batch_table(results: SweepResults) -> str:
    """The max-batch table as aligned text ('' when the experiment ran no search)."""
    table = max_batch_table(results)
    return render_text(table) if table is not None else ""


def format_report(results: SweepResults, plot_notes: list[str] = (), markdown: bool = False) -> str:
    render = render_markdown if markdown else render_text
    header = summary_lines(results)
    parts = (["# Sweep comparison report", ""] + [f"{line}  " for line in header]) if markdown else header
    blocks = ["\n".join(parts)] + [render(t) for t in report_tables(results)]
    if plot_notes:
        blocks.append(render(Table("Plots", [], [], list(plot_notes))))
    return "\n\n".join(blocks) + "\n"


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (e.g. window None/int, bool/NaN) become strings Arrow can store."""
    import pyarrow as pa

    frame = frame.copy()
    for column in frame.columns[frame.dtypes == object]:
        try:
            pa.array(frame[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            frame[column] = frame[column].map(lambda v: None if missing(v) else str(v))
    return frame


def draw_plots(results: SweepResults, out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Every plot the data supports (plots 1-7, 9, 10 over the training trials only); the reasons for the others."""
    import matplotlib.pyplot as plt

    written, notes = {}, []
    training = results.training()
    search_only = training.trials.empty and len(results.probes) > 0
    if search_only:
        notes.append("Plots 1-7, 9 and 10 skipped: no training trials (a max-batch search; its probes are not "
                     "compared).")
    plots = [(plot, training if on_training else results) for plot, on_training in PLOTS
             if not (search_only and on_training)]
    for plot, source in plots:
        try:
            name, fig = plot(source)
        except SkipPlot as skip:
            notes.append(str(skip))
            continue
        try:
            written[name] = atomic_write(out_dir / name, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight",
                                                                                format="png"))
        finally:
            plt.close(fig)
        if plot is plot_technique_comparison:
            batch = comparison_batch_size(source)
            notes.append(f"{name}: techniques compared at batch size {batch}{comparison_note(batch)}")
    return written, notes


def write_report(results: SweepResults, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Reports, plots and tables into `out_dir`; returns {file name: path} of everything written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, plot_notes = draw_plots(results, out)
    for name, markdown in (("comparison_report.txt", False), ("comparison_report.md", True)):
        text = format_report(results, plot_notes, markdown=markdown)
        written[name] = atomic_write(out / name, lambda p, t=text: p.write_text(t, encoding="utf-8"))
    written["trials.csv"] = atomic_write(out / "trials.csv", lambda p: results.trials.to_csv(p, index=False))
    steps = _parquet_safe(results.steps)
    written["steps.parquet"] = atomic_write(out / "steps.parquet", lambda p: steps.to_parquet(p, index=False))
    if not results.max_batch.empty:
        written["max_batch.csv"] = atomic_write(
            out / "max_batch.csv", lambda p: results.max_batch.to_csv(p, index=False))
    if not results.predictions.empty:
        written["predictions.csv"] = atomic_write(
            out / "predictions.csv", lambda p: results.predictions.to_csv(p, index=False))
    return dict(sorted(written.items()))
