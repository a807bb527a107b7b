"""Plots 1-4: memory and speed against batch size, the memory/speed trade-off, the techniques side by side.

Memory is measured GPU memory when trials measured it; on CPU it is the memory model's predicted CUDA peak
for the same configs, drawn dashed/hatched and labelled as predicted.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from .load import SweepResults
from .plot_style import (
    DASHES, HUMAN, OOM_STYLE, SkipPlot, batch_axis, gpu_title, line_groups, mark_ooms, not_measured,
    predicted_badge, several_seq_lens, short, technique_colors, technique_style,
)
from .selection import (
    PREDICTED_NOTE, PREFERRED_COMPARISON_BATCH, comparison_batch_size, memory_source, no_memory_reason, ok_trials,
)

# Without an emulated limit, the GPU's total memory is drawn as a line only when the data reaches this share of it;
# below that the line would squash every curve into the bottom of the plot, so the title names the total instead.
LIMIT_LINE_MIN_SHARE = 0.5
CLUSTER_PIXELS = 10  # points closer than this on screen share one label


def _memory_limit_mib(trials: pd.DataFrame) -> tuple[float | None, bool]:
    """The memory trials could use (MiB) and whether it was an emulated limit (`gpu_memory_gb`)."""
    limit = trials["gpu_memory_gb"].dropna() if "gpu_memory_gb" in trials else pd.Series(dtype=float)
    if len(limit) and limit.max() > 0:
        return float(limit.max()) * 1024, True
    total = trials["gpu_total_mib"].dropna() if "gpu_total_mib" in trials else pd.Series(dtype=float)
    return (float(total.max()) if len(total) else None), False


def plot_memory_vs_batch(results: SweepResults) -> tuple[str, Figure]:
    trials = results.trials
    source = memory_source(trials)
    if source is None:
        raise SkipPlot(f"1_memory_vs_batch_size.png skipped: {no_memory_reason(trials)}")
    ok = ok_trials(results).dropna(subset=[source.column, "batch_size"])
    ooms = trials[trials["status"] == "oom"].dropna(subset=["batch_size"])
    if ok.empty and ooms.empty:
        raise SkipPlot("1_memory_vs_batch_size.png skipped: no completed or OOM trial to draw")
    styles = technique_style(trials)
    fig, ax = plt.subplots(figsize=(9, 6))
    for legend, technique, i, group in line_groups(ok.sort_values("batch_size"), several_seq_lens(ok)):
        dash = "--" if source.predicted else DASHES[i % len(DASHES)]
        ax.plot(group["batch_size"], group[source.column], dash, label=legend, **styles[technique])
    limit, emulated = (None, False) if source.predicted else _memory_limit_mib(trials)
    oom_y = ooms["oom_mem_peak_mib"].fillna(ooms["peak_mem_mib"])
    data_max = max(ok[source.column].max() if not ok.empty else 0.0, oom_y.max() if oom_y.notna().any() else 0.0)
    draw_limit = bool(limit) and (emulated or data_max >= LIMIT_LINE_MIN_SHARE * limit)
    if draw_limit:
        what = "emulated GPU memory limit" if emulated else "GPU memory"
        ax.axhline(limit, color="gray", ls="--", lw=1, label=f"{what} ({limit:,.0f} MiB)")
    mark_ooms(ax, ooms, oom_y.fillna(limit if draw_limit else data_max), "OOM (memory at failure)")
    batch_axis(ax, trials["batch_size"])
    ax.set_ylim(bottom=0)
    ax.set_ylabel(source.axis)
    if source.predicted:
        ax.set_title(f"Predicted peak memory vs batch size{gpu_title(trials)}\n({PREDICTED_NOTE})")
    else:
        ax.set_title(f"Peak memory vs batch size{gpu_title(trials, None if draw_limit or emulated else limit)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return "1_memory_vs_batch_size.png", fig


def plot_speed_vs_batch(results: SweepResults) -> tuple[str, Figure]:
    trials = results.trials
    ok = ok_trials(results).dropna(subset=["tokens_per_s", "batch_size"])
    if ok.empty:
        raise SkipPlot("2_speed_vs_batch_size.png skipped: no completed trial reported tokens_per_s")
    ooms = trials[trials["status"] == "oom"].dropna(subset=["batch_size"])
    styles = technique_style(trials)
    fig, ax = plt.subplots(figsize=(9, 6))
    for legend, technique, i, group in line_groups(ok.sort_values("batch_size"), several_seq_lens(ok)):
        ax.plot(group["batch_size"], group["tokens_per_s"], DASHES[i % len(DASHES)], label=legend,
                **styles[technique])
    mark_ooms(ax, ooms, 0.0, "OOM (no throughput)")
    batch_axis(ax, trials["batch_size"])
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(HUMAN)
    ax.set_ylabel("training throughput (tokens/s, median of the steady steps)")
    ax.set_title(f"Speed vs batch size{gpu_title(trials)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return "2_speed_vs_batch_size.png", fig


def pareto_front(points: pd.DataFrame, memory: str = "peak_mem_mib") -> pd.DataFrame:
    """Trials no other trial beats on both memory (lower) and speed (higher), by increasing memory."""
    ordered = points.sort_values([memory, "tokens_per_s"], ascending=[True, False])
    front, best_speed = [], float("-inf")
    for index, row in ordered.iterrows():
        if row["tokens_per_s"] > best_speed:
            front.append(index)
            best_speed = row["tokens_per_s"]
    return ordered.loc[front]


def point_clusters(ax, xs: list[float], ys: list[float], pixels: float = CLUSTER_PIXELS) -> list[list[int]]:
    """Indices of points that fall within `pixels` of each other on screen (so their labels would overlap)."""
    ax.figure.canvas.draw()  # fixes the limits, so data -> pixel is final
    screen = ax.transData.transform(list(zip(xs, ys)))
    clusters: list[list[int]] = []
    for i, (px, py) in enumerate(screen):
        home = next((c for c in clusters if any(abs(px - screen[j][0]) <= pixels and abs(py - screen[j][1]) <= pixels
                                                 for j in c)), None)
        if home is None:
            clusters.append([i])
        else:
            home.append(i)
    return clusters


def cluster_label(rows: pd.DataFrame) -> str:
    """`bs128` for one point; `bs128: bf16_flash, bf16_window16` for coinciding points of one batch size."""
    sizes = rows["batch_size"].astype(int)
    if len(rows) == 1:
        return f"bs{sizes.iloc[0]}"
    if sizes.nunique() == 1:
        return f"bs{sizes.iloc[0]}: " + ", ".join(sorted(map(str, rows["label"])))
    return ", ".join(f"{label} bs{bs}" for label, bs in sorted(zip(map(str, rows["label"]), sizes)))


def plot_tradeoff(results: SweepResults) -> tuple[str, Figure]:
    source = memory_source(results.trials)
    if source is None:
        raise SkipPlot(f"3_memory_speed_tradeoff.png skipped: {no_memory_reason(results.trials)}")
    ok = ok_trials(results).dropna(subset=[source.column, "tokens_per_s"])
    if ok.empty:
        raise SkipPlot("3_memory_speed_tradeoff.png skipped: no completed trial has both peak memory and tokens/s")
    styles = technique_style(results.trials)
    fig, ax = plt.subplots(figsize=(9, 6))
    for technique, group in ok.groupby("label"):
        style = styles[str(technique)]
        ax.scatter(group[source.column], group["tokens_per_s"], color=style["color"], marker=style["marker"],
                   label=technique, s=45, zorder=3)
    front = pareto_front(ok, source.column)
    ax.plot(front[source.column], front["tokens_per_s"], "k--", lw=1.2, label="Pareto frontier", zorder=1)
    ax.scatter(front[source.column], front["tokens_per_s"], s=160, facecolors="none", edgecolors="black", zorder=4)
    ok = ok.reset_index(drop=True)
    for cluster in point_clusters(ax, list(ok[source.column]), list(ok["tokens_per_s"])):
        rows = ok.loc[cluster]
        ax.annotate(cluster_label(rows), (rows[source.column].mean(), rows["tokens_per_s"].mean()), fontsize=7,
                    xytext=(8, 6), textcoords="offset points")
    ax.set_xlabel(source.axis)
    ax.yaxis.set_major_formatter(HUMAN)
    ax.set_ylabel("training throughput (tokens/s)")
    title = "Memory / speed trade-off (circled: Pareto-optimal, less memory and more speed)"
    ax.set_title(title + (f"\nmemory {PREDICTED_NOTE}; speed measured{gpu_title(results.trials)}"
                          if source.predicted else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return "3_memory_speed_tradeoff.png", fig


def _comparison_labels(at_batch: pd.DataFrame) -> list[str]:
    with_seq = several_seq_lens(at_batch)
    return [f"{row['label']} s{int(row['seq_len'])}" if with_seq else str(row["label"]) for _, row in
            at_batch.iterrows()]


def _speed_error(rows: pd.DataFrame) -> list[list[float]] | None:
    """Asymmetric error bars: each completed trial's interquartile range of per-step tokens/s."""
    if "tokens_per_s_q25" not in rows:
        return None
    ok = rows["status"] == "ok"
    low = (rows["tokens_per_s"] - rows["tokens_per_s_q25"]).where(ok).fillna(0).clip(lower=0)
    high = (rows["tokens_per_s_q75"] - rows["tokens_per_s"]).where(ok).fillna(0).clip(lower=0)
    return [list(low), list(high)]


def plot_technique_comparison(results: SweepResults) -> tuple[str, Figure]:
    batch = comparison_batch_size(results)
    if batch is None:
        raise SkipPlot("4_technique_comparison_bsN.png skipped: no completed trial to compare")
    trials, colors = results.trials, technique_colors(results.trials)
    at_batch = trials[(trials["batch_size"] == batch) & trials["status"].isin(["ok", "oom"])]
    at_batch = at_batch.sort_values(["label", "seq_len"] if "seq_len" in at_batch else ["label"])
    labels, source = _comparison_labels(at_batch), memory_source(at_batch)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    memory = source.column if source else "peak_mem_mib"
    panels = ((memory, source.axis if source else "peak GPU memory (MiB)"), ("tokens_per_s", "throughput "
              "(tokens/s; bars: median, whiskers: interquartile range)"), ("val_ppl", "validation perplexity"))
    for ax, (column, ylabel) in zip(axes, panels):
        if column not in at_batch:
            at_batch = at_batch.assign(**{column: float("nan")})
        not_measured(ax, at_batch.loc[at_batch["status"] == "ok", column])
        heights = [row[column] if row["status"] == "ok" and pd.notna(row[column]) else 0.0
                   for _, row in at_batch.iterrows()]
        predicted = column == memory and source is not None and source.predicted
        ax.bar(range(len(labels)), heights, color=[colors[str(t)] for t in at_batch["label"]],
               hatch="//" if predicted else None, edgecolor="white" if predicted else None,
               yerr=_speed_error(at_batch) if column == "tokens_per_s" else None, capsize=3)
        if predicted:
            predicted_badge(ax)
        for x, (_, row) in enumerate(at_batch.iterrows()):
            if row["status"] == "oom":
                ax.scatter([x], [0], **OOM_STYLE)
                ax.annotate("OOM", (x, 0), xytext=(0, 10), textcoords="offset points", ha="center",
                            color="red", fontsize=8, fontweight="bold")
            elif pd.notna(row[column]):
                shown = f"{row[column]:,.0f}" if column == memory else short(row[column])
                ax.annotate(shown, (x, row[column]), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=9)
        if column == "tokens_per_s":
            ax.yaxis.set_major_formatter(HUMAN)
        ax.grid(axis="y", alpha=0.3)
    note = ("" if batch == PREFERRED_COMPARISON_BATCH
            else f" (largest completed batch size; no bs{PREFERRED_COMPARISON_BATCH})")
    fig.suptitle(f"Techniques at batch size {batch}{note}{gpu_title(trials)}")
    fig.tight_layout()
    return f"4_technique_comparison_bs{batch}.png", fig
