"""Plots 5-7: sliding-window size, memory saving against the baseline, and the loss curves."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from contract.techniques import BASELINE_LABELS

from .load import SweepResults
from .plot_style import HUMAN, SkipPlot, log2_axis, not_measured, predicted_badge, technique_colors
from .selection import (
    PREDICTED_NOTE, baseline_label, memory_savings, memory_source, no_memory_reason, ok_trials,
)
from .speed import step_rows

IDENTICAL_RTOL = 1e-6  # loss curves equal within this relative tolerance at every step are one curve


def plot_window_comparison(results: SweepResults) -> tuple[str, Figure]:
    trials = results.trials
    ok = ok_trials(results)
    windowed = ok[ok["window"].fillna(0) > 0]
    if windowed.empty:
        raise SkipPlot("5_window_size_comparison.png skipped: no completed sliding-window trials")
    full = ok[ok["window"].fillna(0) <= 0]
    source = memory_source(ok)
    memory = source.column if source else "peak_mem_mib"
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    panels = ((memory, source.axis if source else "peak GPU memory (MiB)"), ("tokens_per_s", "throughput (tokens/s)"),
              ("val_ppl", "validation perplexity"))
    cmap = plt.get_cmap("tab10")
    keys = ["family", "batch_size"] + (["seq_len"] if ok["seq_len"].dropna().nunique() > 1 else [])
    groups = list(windowed.sort_values("window").groupby(keys))
    for ax, (column, ylabel) in zip(axes, panels):
        if not_measured(ax, windowed[column] if column in windowed else pd.Series(dtype=float)):
            log2_axis(ax, windowed["window"], "attention window (tokens, log2 scale)")
            continue
        for i, (key, group) in enumerate(groups):
            color, name = cmap(i % cmap.N), f"{key[0]} bs{int(key[1])}" + (f" s{int(key[2])}" if len(key) > 2 else "")
            ax.plot(group["window"], group[column], "o--" if column == memory and source.predicted else "o-",
                    color=color, label=name)
            same = (full["label"] == key[0]) & (full["batch_size"] == key[1])
            if len(key) > 2:
                same &= full["seq_len"] == key[2]
            reference = full[same][column].dropna()
            if len(reference):
                ax.axhline(reference.iloc[0], color=color, ls=":", lw=1, label=f"{name} full attn")
        if column == memory and source is not None and source.predicted:
            predicted_badge(ax)
        log2_axis(ax, windowed["window"], "attention window (tokens, log2 scale)")
        ax.set_ylabel(ylabel)
        if column == "tokens_per_s":
            ax.yaxis.set_major_formatter(HUMAN)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    seq = trials["seq_len"].dropna()
    context = f"sequence length {int(seq.max())}; " if seq.nunique() == 1 else ""
    fig.suptitle(f"Sliding-window size ({context}dotted: full attention)")
    fig.tight_layout()
    return "5_window_size_comparison.png", fig


def plot_memory_savings(results: SweepResults) -> tuple[str, Figure]:
    ok = ok_trials(results)
    source = memory_source(ok)
    if source is None:
        raise SkipPlot(f"6_memory_savings_vs_baseline.png skipped: {no_memory_reason(results.trials)}")
    if baseline_label(ok) is None:
        raise SkipPlot(f"6_memory_savings_vs_baseline.png skipped: no completed baseline trial "
                       f"(technique {' / '.join(BASELINE_LABELS)})")
    savings = memory_savings(results, source)
    savings = savings.dropna(subset=["memory_saving_pct"]) if not savings.empty else savings
    if savings.empty:
        raise SkipPlot("6_memory_savings_vs_baseline.png skipped: no other technique completed at a batch size "
                       "(and seq_len) the baseline ran")
    colors = technique_colors(results.trials)
    batches = sorted(savings["batch_size"].unique())
    techniques = sorted(savings["label"].unique())
    width = 0.8 / len(techniques)
    fig, ax = plt.subplots(figsize=(max(9, 1.6 * len(batches) * max(1, len(techniques) / 3)), 6))
    for i, technique in enumerate(techniques):
        rows = savings[savings["label"] == technique].drop_duplicates("batch_size").set_index("batch_size")
        xs = [b_i + (i - (len(techniques) - 1) / 2) * width for b_i, b in enumerate(batches) if b in rows.index]
        ys = [rows.loc[b, "memory_saving_pct"] for b in batches if b in rows.index]
        bars = ax.bar(xs, ys, width=width, color=colors[str(technique)], label=technique,
                      hatch="//" if source.predicted else None, edgecolor="white" if source.predicted else None)
        ax.bar_label(bars, labels=[f"{y:+.0f}%" for y in ys], fontsize=7, padding=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size (sequences)")
    base = savings["baseline"].iloc[0]
    ax.set_ylabel(f"{'predicted ' if source.predicted else ''}peak memory saving vs {base} (%)")
    ax.set_title(f"Memory saving vs {base} at the same batch size (higher is better)"
                 + (f"\n({PREDICTED_NOTE})" if source.predicted else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return "6_memory_savings_vs_baseline.png", fig


def identical_groups(curves: list[pd.Series], rtol: float = IDENTICAL_RTOL) -> list[list[int]]:
    """Indices of loss curves (loss by step) equal within `rtol` relative at every step, grouped."""
    groups: list[list[int]] = []
    for i, curve in enumerate(curves):
        for group in groups:
            other = curves[group[0]]
            if (len(other) == len(curve) and (other.index == curve.index).all()
                    and np.allclose(curve.to_numpy(float), other.to_numpy(float), rtol=rtol, atol=0.0,
                                    equal_nan=True)):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def _curve_label(members: pd.DataFrame) -> str:
    names = [str(t["label"]) if t["status"] == "ok" else f"{t['label']} ({t['status']})"
             for _, t in members.iterrows()]
    return " = ".join(names) + (" (identical curves)" if len(names) > 1 else "")


def _panel(ax, steps: pd.DataFrame, trials: pd.DataFrame, colors: dict) -> bool:
    """One batch size's loss curves; returns whether some curves coincided."""
    ids = [t for t in trials["trial_id"] if t in set(steps["trial_id"])]
    histories = {t: step_rows(steps[steps["trial_id"] == t]).dropna(subset=["loss"]) for t in ids}
    ids = [t for t in ids if len(histories[t])]
    curves = [histories[t].set_index("step")["loss"] for t in ids]
    groups = identical_groups(curves)
    by_id = trials.set_index("trial_id")
    for rank, group in enumerate(groups):
        members = by_id.loc[[ids[i] for i in group]]
        first = members.iloc[0]
        dotted = (members["status"] != "ok").all()
        color = colors.get(str(first["label"]), "gray")
        lw = max(1.2, 3.6 - 0.9 * rank)  # wider underneath: lines that nearly coincide still show
        ax.plot(curves[group[0]].index, curves[group[0]].values, ":" if dotted else "-", color=color, lw=lw,
                label=_curve_label(members), zorder=2 + rank)
        history = steps[steps["trial_id"] == ids[group[0]]]
        if "val_loss" in history:
            val = history.dropna(subset=["step", "val_loss"])
            ax.plot(val["step"], val["val_loss"], "o", color=color, ms=4, zorder=10)
    return any(len(g) > 1 for g in groups)


def plot_loss_curves(results: SweepResults) -> tuple[str, Figure]:
    steps = results.steps
    if steps.empty or "loss" not in steps or steps["loss"].dropna().empty:
        raise SkipPlot("7_loss_curves.png skipped: no per-step loss reported")
    trials = results.trials.sort_values(["label", "name"])
    colors = technique_colors(results.trials)
    batches = sorted(trials["batch_size"].dropna().unique()) or [None]
    cols = min(3, len(batches))
    rows = -(-len(batches) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False, sharey=True)
    coincide = False
    for ax, batch in zip(axes.flat, batches):
        at = trials if batch is None else trials[trials["batch_size"] == batch]
        coincide |= _panel(ax, steps, at, colors)
        ax.set_title(f"batch size {int(batch)}" if batch is not None else "all trials")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(batches):]:
        ax.set_visible(False)
    fig.suptitle("Training loss (lines; dotted: OOM/NaN/error/incomplete) and validation loss (dots)"
                 + ("\n'a = b': techniques whose loss curves are identical (same seed and data; e.g. checkpointing "
                    "recomputes, it does not change the loss)" if coincide else ""))
    fig.tight_layout()
    return "7_loss_curves.png", fig
