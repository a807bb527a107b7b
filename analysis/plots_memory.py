"""Plots 8-10: the largest batch that fits, where the memory goes, and memory and speed against seq_len."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from contract.keys import MEMORY_COMPONENTS

from .breakdown import breakdown_rows
from .load import SweepResults
from .plot_style import HUMAN, SkipPlot, gpu_title, log2_axis, technique_colors, technique_style
from .selection import PREDICTED_NOTE, comparison_batch_size, comparison_note, ok_trials


def _limit_label(limit_gb) -> str:
    return f"{limit_gb:g} GB limit" if pd.notna(limit_gb) and limit_gb > 0 else "full GPU"


def _max_batch_frame(frame: pd.DataFrame) -> pd.DataFrame:
    nan = float("nan")
    return frame.assign(
        label=frame["label"].astype(str),
        limit=frame["gpu_memory_gb"].map(_limit_label) if "gpu_memory_gb" in frame else "full GPU",
        max_batch_size=pd.to_numeric(frame["max_batch_size"], errors="coerce"),
        predicted=pd.to_numeric(frame["predicted_max_batch"], errors="coerce") if "predicted_max_batch" in frame
        else nan,
    )


def plot_max_batch(results: SweepResults) -> tuple[str, Figure]:
    """Max batch per technique; one bar group per GPU memory limit when the records span several. Records of
    one technique and limit from several experiments (the same search run twice) are drawn once, the last."""
    frame = results.max_batch
    if frame.empty or "max_batch_size" not in frame or "label" not in frame:
        raise SkipPlot("8_max_batch.png skipped: no max-batch search records")
    frame = _max_batch_frame(frame)
    order = frame.groupby("label")["max_batch_size"].max().sort_values(ascending=False, na_position="last")
    techniques, limits = list(order.index), sorted(frame["limit"].unique(), key=lambda lim: (lim == "full GPU", lim))
    colors, cmap = technique_colors(frame), plt.get_cmap("tab10")
    width = 0.8 / len(limits)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(techniques) * max(1, len(limits) / 1.5)), 5.5))
    labelled: set[str] = set()
    for j, limit in enumerate(limits):
        rows = frame[frame["limit"] == limit].drop_duplicates("label", keep="last").set_index("label")
        for i, technique in enumerate(techniques):
            if technique not in rows.index:
                continue
            row, x = rows.loc[technique], i + (j - (len(limits) - 1) / 2) * width
            color = colors[technique] if len(limits) == 1 else cmap(j % cmap.N)
            height = row["max_batch_size"] if pd.notna(row["max_batch_size"]) else 0.0
            ax.bar([x], [height], width=width * 0.95, color=color,
                   label=limit if len(limits) > 1 and limit not in labelled else None)
            labelled.add(limit)
            if height:  # the value inside the bar, clear of the prediction tick near its top
                ax.annotate(f"{int(height)}", (x, height / 2), ha="center", va="center", fontsize=8, color="white",
                            fontweight="bold")
            else:
                ax.annotate(str(row.get("status", "error")), (x, 0), xytext=(0, 3), textcoords="offset points",
                            ha="center", fontsize=8, color="red")
            if pd.notna(row["predicted"]):
                predicted = "predicted by the memory model (when the search ran)"
                ax.scatter([x], [row["predicted"]], marker="_", s=400 * width, color="black", linewidths=2,
                           zorder=5, label=None if predicted in labelled else predicted)
                labelled.add(predicted)
    ax.set_xticks(range(len(techniques)))
    ax.set_xticklabels(techniques, rotation=20, ha="right")
    ax.set_xlim(-1.0 if len(techniques) == 1 else -0.6, len(techniques) - (0.0 if len(techniques) == 1 else 0.4))
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.08)
    ax.set_ylabel("max batch size that fits (sequences)")
    seq = pd.to_numeric(frame["seq_len"], errors="coerce").dropna() if "seq_len" in frame else pd.Series(dtype=float)
    gpus = sorted(str(n) for n in results.trials["gpu_name"].dropna().unique()) if "gpu_name" in results.trials else []
    context = gpus + ([limits[0]] if len(limits) == 1 else []) + ([f"seq_len {int(seq.max())}"] if len(seq) else [])
    ax.set_title("Largest batch that fits (OOM-aware search)" + (f"\n{', '.join(context)}" if context else ""))
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return "8_max_batch.png", fig


COMPONENT_COLORS = dict(zip(MEMORY_COMPONENTS, plt.get_cmap("tab10").colors))


def plot_memory_breakdown(results: SweepResults) -> tuple[str, Figure]:
    """One stacked bar per technique at the comparison batch size: the peak's memory by component, measured when
    the trial measured it, else the memory model's prediction (hatched, labelled)."""
    batch = comparison_batch_size(results)
    rows = breakdown_rows(results, batch) if batch is not None else []
    if not rows:
        raise SkipPlot("9_memory_breakdown.png skipped: no completed trial reported where its memory goes "
                       "(measured_/predicted_<component>_mib)")
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows) + 3), 6))
    for x, row in enumerate(rows):
        bottom = 0.0
        for component in MEMORY_COMPONENTS:
            value = row.values.get(component)
            if value is None or pd.isna(value) or value <= 0:
                continue
            ax.bar([x], [value], bottom=bottom, color=COMPONENT_COLORS[component], width=0.7,
                   hatch="//" if row.predicted else None, edgecolor="white", linewidth=0.5)
            bottom += value
        ax.annotate(f"{bottom:,.0f}", (x, bottom), xytext=(0, 2), textcoords="offset points", ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    mixed = len({r.predicted for r in rows}) > 1  # say which bars are predictions; all of them: the title says it
    ax.set_xticklabels([f"{r.name}\n(predicted)" if r.predicted and mixed else r.name for r in rows], rotation=30,
                       ha="right", fontsize=8)
    handles = [Patch(color=COMPONENT_COLORS[c], label=c) for c in reversed(MEMORY_COMPONENTS)
               if any(pd.notna(r.values.get(c)) and (r.values.get(c) or 0) > 0 for r in rows)]
    if any(r.predicted for r in rows):
        handles.append(Patch(facecolor="lightgray", hatch="//", edgecolor="white", label=f"hatched: {PREDICTED_NOTE}"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_ylabel("allocated memory at the peak (MiB)")
    ax.set_title(f"Where the memory goes at batch size {batch}{comparison_note(batch)}{gpu_title(results.trials)}"
                 + (f"\n({PREDICTED_NOTE})" if all(r.predicted for r in rows) else ""))
    ax.grid(axis="y", alpha=0.3)
    return "9_memory_breakdown.png", fig


def _seq_lines(trials: pd.DataFrame):
    """(legend label, technique, rows) per line: one per technique, or per technique and batch size when a
    technique ran several batch sizes at one seq_len."""
    several = trials.groupby(["label", "seq_len"])["batch_size"].nunique().max() > 1
    keys = ["label", "batch_size"] if several else ["label"]
    for key, rows in trials.sort_values("seq_len").groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        yield (f"{key[0]} bs{int(key[1])}" if several else str(key[0])), str(key[0]), rows


def _bridged(measured: pd.DataFrame, guess: pd.DataFrame) -> tuple[list, list]:
    """The predicted points in seq_len order, joined to the measured point next to them, so a line goes on dashed
    where measurement stops (an OOM) instead of ending."""
    points = sorted([(s, m, False) for s, m in zip(measured["seq_len"], measured["peak_mem_mib"])]
                    + [(s, p, True) for s, p in zip(guess["seq_len"], guess["predicted_peak_mib"])])
    keep = [i for i, (_, _, predicted) in enumerate(points) if predicted
            or (i > 0 and points[i - 1][2]) or (i + 1 < len(points) and points[i + 1][2])]
    return [points[i][0] for i in keep], [points[i][1] for i in keep]


def plot_seq_len(results: SweepResults) -> tuple[str, Figure]:
    """Peak memory (left) and tokens/s (right) against seq_len per technique: measured solid, predicted dashed
    (hollow markers) where the trial measured none, OOM marked."""
    trials = results.trials[results.trials["status"].isin(["ok", "oom"])].dropna(subset=["seq_len"])
    if trials["seq_len"].nunique() < 2:
        raise SkipPlot("10_seq_len.png skipped: the experiment has a single seq_len (the sweep's --seq-lens varies it)")
    styles = technique_style(results.trials)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    predicted_any = False
    for legend, technique, rows in _seq_lines(trials):
        style = {k: v for k, v in styles[technique].items() if k != "marker"}
        marker = styles[technique]["marker"]
        ok = rows[rows["status"] == "ok"]
        measured = ok.dropna(subset=["peak_mem_mib"])
        if len(measured):
            left.plot(measured["seq_len"], measured["peak_mem_mib"], "-", marker=marker, label=legend, **style)
        guess = rows[~rows.index.isin(measured.index)].dropna(subset=["predicted_peak_mib"])
        if len(guess):
            predicted_any = True
            xs, ys = _bridged(measured, guess)
            left.plot(xs, ys, "--", **style, label=f"{legend} (predicted)")
            left.plot(guess["seq_len"], guess["predicted_peak_mib"], "none", marker=marker, mfc="none",
                      color=style["color"], markersize=style["markersize"])
        speed = ok.dropna(subset=["tokens_per_s"])
        if len(speed):
            right.plot(speed["seq_len"], speed["tokens_per_s"], "-", marker=marker, label=legend, **style)
        ooms = rows[rows["status"] == "oom"]
        for _, oom in ooms.iterrows():
            y = oom["oom_mem_peak_mib"] if pd.notna(oom.get("oom_mem_peak_mib")) else oom.get("predicted_peak_mib")
            if pd.notna(y):
                left.scatter([oom["seq_len"]], [y], marker="x", color="red", s=80, zorder=6)
            right.scatter([oom["seq_len"]], [0], marker="x", color="red", s=80, zorder=6)
    for ax, ylabel in ((left, "peak memory per step (MiB)"), (right, "training throughput (tokens/s)")):
        log2_axis(ax, trials["seq_len"], "sequence length (tokens, log2 scale)")
        ax.set_ylim(bottom=0)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    right.yaxis.set_major_formatter(HUMAN)
    peaks = pd.concat([trials["peak_mem_mib"], trials["predicted_peak_mib"]]).dropna()
    if len(peaks) and peaks.min() > 0 and peaks.max() / peaks.min() > 20:  # quadratic attention: a log scale
        left.set_yscale("log")
        left.set_ylim(peaks.min() / 1.5, peaks.max() * 1.5)
        left.set_ylabel("peak memory per step (MiB, log scale)")
    left.yaxis.set_major_formatter(HUMAN)
    if trials["status"].eq("oom").any():
        left.scatter([], [], marker="x", color="red", label="OOM")
        left.legend(fontsize=7)
    note = f"; dashed, hollow: {PREDICTED_NOTE}" if predicted_any else ""
    fig.suptitle(f"Memory and speed against sequence length{gpu_title(results.trials)}{note}")
    fig.tight_layout()
    return "10_seq_len.png", fig


__all__ = ["plot_max_batch", "plot_memory_breakdown", "plot_seq_len", "ok_trials"]
