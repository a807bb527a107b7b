"""The comparison plots (the seed's six, loss curves, max batch), drawn from `SweepResults` with matplotlib's Agg.

Each plot is a function `SweepResults -> (file name, Figure)` in `PLOTS`; a plot that the data cannot support raises
`SkipPlot` with the reason, which the report prints instead of failing.
"""
from __future__ import annotations

from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from contract.techniques import BASELINE_LABELS  # noqa: E402

from .load import SweepResults, step_rows  # noqa: E402

PREFERRED_COMPARISON_BATCH = 128
OOM_STYLE = dict(marker="x", color="red", s=90, linewidths=2.5, zorder=5)


class SkipPlot(Exception):
    """Why a plot was not drawn; the message goes into the report."""


def ok_trials(results: SweepResults) -> pd.DataFrame:
    """Completed training trials (a max-batch search's probes are not training runs)."""
    trials = results.trials
    is_probe = trials["kind"].eq("probe") if "kind" in trials else False
    return trials[(trials["status"] == "ok") & ~is_probe]


def comparison_batch_size(results: SweepResults) -> int | None:
    """128 when completed trials ran at it, else the largest batch size with completed trials."""
    sizes = ok_trials(results)["batch_size"].dropna()
    if sizes.empty:
        return None
    return PREFERRED_COMPARISON_BATCH if (sizes == PREFERRED_COMPARISON_BATCH).any() else int(sizes.max())


def baseline_label(trials: pd.DataFrame) -> str | None:
    """The reference technique the sweep ran (first of BASELINE_LABELS present)."""
    present = set(trials["label"].dropna())
    return next((label for label in BASELINE_LABELS if label in present), None)


def technique_colors(trials: pd.DataFrame) -> dict[str, tuple]:
    """One colour per technique, the same in every plot."""
    techniques = sorted(str(t) for t in trials["label"].dropna().unique())
    cmap = plt.get_cmap("tab10" if len(techniques) <= 10 else "tab20")
    return {t: cmap(i % cmap.N) for i, t in enumerate(techniques)}


# Techniques often measure the same memory (flash and sliding window at one batch size); distinct markers, drawn
# smaller for later techniques, keep every line visible where they overlap.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def technique_style(trials: pd.DataFrame) -> dict[str, dict]:
    """Line-plot style per technique: its colour, a distinct marker, and shrinking sizes so overlaps show."""
    colors = technique_colors(trials)
    return {t: dict(color=c, marker=MARKERS[i % len(MARKERS)], markersize=max(4.0, 10.0 - 1.2 * i),
                    lw=max(1.0, 2.6 - 0.3 * i))
            for i, (t, c) in enumerate(colors.items())}


def _human(value: float, _pos=None) -> str:
    """1.5M, 600k: tick labels for throughputs, instead of matplotlib's separate 1e6 offset."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


HUMAN = FuncFormatter(_human)


def _batch_axis(ax, sizes) -> None:
    sizes = sorted({int(s) for s in sizes if pd.notna(s)})
    if not sizes:
        return
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (sequences, log2 scale)")


# Without an emulated limit, the GPU's total memory is drawn as a line only when the data reaches this share of it;
# below that the line would squash every curve into the bottom of the plot, so the title names the total instead.
LIMIT_LINE_MIN_SHARE = 0.5


def _memory_limit_mib(trials: pd.DataFrame) -> tuple[float | None, bool]:
    """The memory trials could use (MiB) and whether it was an emulated limit (`gpu_memory_gb`)."""
    limit = trials["gpu_memory_gb"].dropna()
    if len(limit) and limit.max() > 0:
        return float(limit.max()) * 1024, True
    total = trials["gpu_total_mib"].dropna()
    return (float(total.max()) if len(total) else None), False


def _gpu_title(trials: pd.DataFrame, total_mib: float | None = None) -> str:
    names = sorted(str(n) for n in trials["gpu_name"].dropna().unique())
    parts = [", ".join(names)] if names else []
    if total_mib:
        parts.append(f"{total_mib:,.0f} MiB total")
    return f" ({'; '.join(parts)})" if parts else ""


def _mark_ooms(ax, ooms: pd.DataFrame, y: pd.Series | float, label: str) -> None:
    if ooms.empty:
        return
    ys = list(y) if isinstance(y, pd.Series) else [y] * len(ooms)
    ax.scatter(ooms["batch_size"], ys, label=label, **OOM_STYLE)
    seen: dict[float, int] = {}
    for x, y_at, technique in zip(ooms["batch_size"], ys, ooms["label"]):
        stack = seen[x] = seen.get(x, -1) + 1  # several OOMs at one batch size: labels stack upwards
        ax.annotate(str(technique), (x, y_at), xytext=(6, 4 + 9 * stack), textcoords="offset points",
                    color="red", fontsize=7)


def plot_memory_vs_batch(results: SweepResults) -> tuple[str, Figure]:
    trials = results.trials
    ok = ok_trials(results).dropna(subset=["peak_mem_mib", "batch_size"])
    ooms = trials[trials["status"] == "oom"].dropna(subset=["batch_size"])
    if ok.empty and ooms.empty:
        raise SkipPlot("1_memory_vs_batch_size.png skipped: no trial reported peak memory")
    styles = technique_style(trials)
    fig, ax = plt.subplots(figsize=(9, 6))
    for technique, group in ok.sort_values("batch_size").groupby("label"):
        ax.plot(group["batch_size"], group["peak_mem_mib"], "-", label=technique, **styles[str(technique)])
    limit, emulated = _memory_limit_mib(trials)
    oom_y = ooms["oom_mem_peak_mib"].fillna(ooms["peak_mem_mib"])
    data_max = max(ok["peak_mem_mib"].max() if not ok.empty else 0.0, oom_y.max() if oom_y.notna().any() else 0.0)
    draw_limit = bool(limit) and (emulated or data_max >= LIMIT_LINE_MIN_SHARE * limit)
    if draw_limit:
        what = "emulated GPU memory limit" if emulated else "GPU memory"
        ax.axhline(limit, color="gray", ls="--", lw=1, label=f"{what} ({limit:,.0f} MiB)")
    oom_y = oom_y.fillna(limit if draw_limit else data_max)
    _mark_ooms(ax, ooms, oom_y, "OOM (memory at failure)")
    _batch_axis(ax, trials["batch_size"])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("peak GPU memory per step (MiB)")
    ax.set_title(f"Peak memory vs batch size{_gpu_title(trials, None if draw_limit or emulated else limit)}")
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
    for technique, group in ok.sort_values("batch_size").groupby("label"):
        ax.plot(group["batch_size"], group["tokens_per_s"], "-", label=technique, **styles[str(technique)])
    _mark_ooms(ax, ooms, 0.0, "OOM (no throughput)")
    _batch_axis(ax, trials["batch_size"])
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(HUMAN)
    ax.set_ylabel("training throughput (tokens/s, median after warm-up)")
    ax.set_title(f"Speed vs batch size{_gpu_title(trials)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return "2_speed_vs_batch_size.png", fig


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Trials no other trial beats on both memory (lower) and speed (higher), by increasing memory."""
    ordered = points.sort_values(["peak_mem_mib", "tokens_per_s"], ascending=[True, False])
    front, best_speed = [], float("-inf")
    for index, row in ordered.iterrows():
        if row["tokens_per_s"] > best_speed:
            front.append(index)
            best_speed = row["tokens_per_s"]
    return ordered.loc[front]


def plot_tradeoff(results: SweepResults) -> tuple[str, Figure]:
    colors = technique_colors(results.trials)
    ok = ok_trials(results).dropna(subset=["peak_mem_mib", "tokens_per_s"])
    if ok.empty:
        raise SkipPlot("3_memory_speed_tradeoff.png skipped: "
                       "no completed trial reported both peak memory and tokens_per_s")
    fig, ax = plt.subplots(figsize=(9, 6))
    for technique, group in ok.groupby("label"):
        ax.scatter(group["peak_mem_mib"], group["tokens_per_s"], color=colors[str(technique)], label=technique, s=45)
    for _, row in ok.iterrows():
        ax.annotate(f"bs{int(row['batch_size'])}", (row["peak_mem_mib"], row["tokens_per_s"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    front = pareto_front(ok)
    ax.plot(front["peak_mem_mib"], front["tokens_per_s"], "k--", lw=1.2, label="Pareto frontier", zorder=1)
    ax.scatter(front["peak_mem_mib"], front["tokens_per_s"], s=160, facecolors="none", edgecolors="black", zorder=4)
    ax.set_xlabel("peak GPU memory per step (MiB)")
    ax.yaxis.set_major_formatter(HUMAN)
    ax.set_ylabel("training throughput (tokens/s)")
    ax.set_title("Memory / speed trade-off (circled: Pareto-optimal, less memory and more speed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return "3_memory_speed_tradeoff.png", fig


def plot_technique_comparison(results: SweepResults) -> tuple[str, Figure]:
    batch = comparison_batch_size(results)
    if batch is None:
        raise SkipPlot("4_technique_comparison_bsN.png skipped: no completed trial to compare")
    trials, colors = results.trials, technique_colors(results.trials)
    at_batch = trials[(trials["batch_size"] == batch) & trials["status"].isin(["ok", "oom"])]
    at_batch = at_batch.sort_values("label")
    labels = [str(t) for t in at_batch["label"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    panels = (("peak_mem_mib", "peak GPU memory (MiB)"), ("tokens_per_s", "throughput (tokens/s)"),
              ("val_ppl", "validation perplexity"))
    for ax, (column, ylabel) in zip(axes, panels):
        _not_measured(ax, at_batch.loc[at_batch["status"] == "ok", column])
        heights = [row[column] if row["status"] == "ok" and pd.notna(row[column]) else 0.0
                   for _, row in at_batch.iterrows()]
        ax.bar(range(len(labels)), heights, color=[colors[label] for label in labels])
        for x, (_, row) in enumerate(at_batch.iterrows()):
            if row["status"] == "oom":
                ax.scatter([x], [0], **OOM_STYLE)
                ax.annotate("OOM", (x, 0), xytext=(0, 10), textcoords="offset points", ha="center",
                            color="red", fontsize=8, fontweight="bold")
            elif pd.notna(row[column]):
                ax.annotate(_short(row[column]), (x, row[column]), xytext=(0, 2), textcoords="offset points",
                            ha="center", fontsize=7)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if column == "tokens_per_s":
            ax.yaxis.set_major_formatter(HUMAN)
        ax.grid(axis="y", alpha=0.3)
    note = ("" if batch == PREFERRED_COMPARISON_BATCH
            else f" (largest completed batch size; no bs{PREFERRED_COMPARISON_BATCH})")
    fig.suptitle(f"Techniques at batch size {batch}{note}")
    fig.tight_layout()
    return f"4_technique_comparison_bs{batch}.png", fig


def _not_measured(ax, values: pd.Series) -> bool:
    """Say so inside a panel whose quantity no trial measured (e.g. GPU memory on CPU trials)."""
    if values.notna().any():
        return False
    ax.text(0.5, 0.5, "not measured\n(e.g. CPU trials)", transform=ax.transAxes, ha="center", va="center",
            color="gray")
    ax.set_yticks([])
    return True


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def plot_window_comparison(results: SweepResults) -> tuple[str, Figure]:
    trials = results.trials
    ok = ok_trials(results)
    windowed = ok[ok["window"].fillna(0) > 0]
    if windowed.empty:
        raise SkipPlot("5_window_size_comparison.png skipped: no completed sliding-window trials")
    full = ok[ok["window"].fillna(0) <= 0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    panels = (("peak_mem_mib", "peak GPU memory (MiB)"), ("tokens_per_s", "throughput (tokens/s)"),
              ("val_ppl", "validation perplexity"))
    cmap = plt.get_cmap("tab10")
    groups = list(windowed.sort_values("window").groupby(["family", "batch_size"]))
    for ax, (column, ylabel) in zip(axes, panels):
        _not_measured(ax, windowed[column])
        for i, ((family, batch), group) in enumerate(groups):
            color = cmap(i % cmap.N)
            ax.plot(group["window"], group[column], "o-", color=color, label=f"{family} bs{int(batch)}")
            reference = full[(full["label"] == family) & (full["batch_size"] == batch)][column].dropna()
            if len(reference):
                ax.axhline(reference.iloc[0], color=color, ls=":", lw=1, label=f"{family} bs{int(batch)} full attn")
        ax.set_xscale("log", base=2)
        windows = sorted(int(w) for w in windowed["window"].unique())
        ax.set_xticks(windows)
        ax.set_xticklabels([str(w) for w in windows])
        ax.minorticks_off()
        ax.set_xlabel("attention window (tokens, log2 scale)")
        ax.set_ylabel(ylabel)
        if column == "tokens_per_s":
            ax.yaxis.set_major_formatter(HUMAN)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    seq = trials["seq_len"].dropna()
    fig.suptitle("Sliding-window size" + (f" (sequence length {int(seq.max())}; dotted: full attention)" if len(seq)
                                          else " (dotted: full attention)"))
    fig.tight_layout()
    return "5_window_size_comparison.png", fig


def memory_savings(results: SweepResults) -> pd.DataFrame:
    """Each completed non-baseline trial vs the baseline at the same batch size: memory saving and speed change."""
    ok = ok_trials(results)
    label = baseline_label(ok)
    if label is None:
        return pd.DataFrame()
    base = ok[ok["label"] == label].drop_duplicates("batch_size").set_index("batch_size")
    rows = []
    for _, row in ok[ok["label"] != label].iterrows():
        if row["batch_size"] not in base.index:
            continue
        ref = base.loc[row["batch_size"]]
        rows.append({
            "label": row["label"], "batch_size": int(row["batch_size"]), "baseline": label,
            "peak_mem_mib": row["peak_mem_mib"], "baseline_peak_mem_mib": ref["peak_mem_mib"],
            "memory_saving_pct": 100 * (1 - row["peak_mem_mib"] / ref["peak_mem_mib"]),
            "tokens_per_s": row["tokens_per_s"], "baseline_tokens_per_s": ref["tokens_per_s"],
            "speed_change_pct": 100 * (row["tokens_per_s"] / ref["tokens_per_s"] - 1),
            "val_ppl": row["val_ppl"], "baseline_val_ppl": ref["val_ppl"],
        })
    return pd.DataFrame(rows)


def plot_memory_savings(results: SweepResults) -> tuple[str, Figure]:
    savings = memory_savings(results)
    if baseline_label(ok_trials(results)) is None:
        raise SkipPlot(f"6_memory_savings_vs_baseline.png skipped: no completed baseline trial "
                       f"(technique {' / '.join(BASELINE_LABELS)})")
    savings = savings.dropna(subset=["memory_saving_pct"]) if not savings.empty else savings
    if savings.empty:
        raise SkipPlot("6_memory_savings_vs_baseline.png skipped: no technique completed at a baseline batch size")
    colors = technique_colors(results.trials)
    batches = sorted(savings["batch_size"].unique())
    techniques = sorted(savings["label"].unique())
    width = 0.8 / len(techniques)
    fig, ax = plt.subplots(figsize=(max(9, 1.6 * len(batches) * max(1, len(techniques) / 3)), 6))
    for i, technique in enumerate(techniques):
        rows = savings[savings["label"] == technique].set_index("batch_size")
        xs = [b_i + (i - (len(techniques) - 1) / 2) * width for b_i, b in enumerate(batches) if b in rows.index]
        ys = [rows.loc[b, "memory_saving_pct"] for b in batches if b in rows.index]
        bars = ax.bar(xs, ys, width=width, color=colors[str(technique)], label=technique)
        ax.bar_label(bars, labels=[f"{y:+.0f}%" for y in ys], fontsize=7, padding=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel(f"peak memory saving vs {savings['baseline'].iloc[0]} (%)")
    ax.set_title(f"Memory saving vs {savings['baseline'].iloc[0]} at the same batch size (higher is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return "6_memory_savings_vs_baseline.png", fig


def plot_loss_curves(results: SweepResults) -> tuple[str, Figure]:
    steps = results.steps
    if steps.empty or "loss" not in steps or steps["loss"].dropna().empty:
        raise SkipPlot("7_loss_curves.png skipped: no per-step loss reported")
    names = results.trials.set_index("trial_id")
    colors = technique_colors(results.trials)
    batches = sorted(results.trials["batch_size"].dropna().unique()) or [None]
    cols = min(3, len(batches))
    rows = -(-len(batches) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False, sharey=True)
    for ax, batch in zip(axes.flat, batches):
        for trial_id, history in steps.groupby("trial_id"):
            trial = names.loc[trial_id]
            if batch is not None and trial["batch_size"] != batch:
                continue
            color = colors.get(str(trial["label"]), "gray")
            train = step_rows(history).dropna(subset=["loss"])
            style = "-" if trial["status"] == "ok" else ":"
            label = trial["label"] if trial["status"] == "ok" else f"{trial['label']} ({trial['status']})"
            ax.plot(train["step"], train["loss"], style, color=color, lw=1.2, label=label)
            if "val_loss" in history:
                val = history.dropna(subset=["step", "val_loss"])
                ax.plot(val["step"], val["val_loss"], "o", color=color, ms=4)
        ax.set_title(f"batch size {int(batch)}" if batch is not None else "all trials")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(batches):]:
        ax.set_visible(False)
    fig.suptitle("Training loss (lines; dotted: OOM/error/incomplete) and validation loss (dots)")
    fig.tight_layout()
    return "7_loss_curves.png", fig


def _limit_label(limit_gb) -> str:
    return f"{limit_gb:g} GB limit" if pd.notna(limit_gb) and limit_gb > 0 else "full GPU"


def plot_max_batch(results: SweepResults) -> tuple[str, Figure]:
    """Max batch per technique; one bar group per GPU memory limit when the records span several."""
    frame = results.max_batch
    if frame.empty or "max_batch_size" not in frame:
        raise SkipPlot("8_max_batch.png skipped: no max-batch search records")
    frame = frame.assign(
        label=frame["label"].astype(str),
        limit=frame["gpu_memory_gb"].map(_limit_label) if "gpu_memory_gb" in frame else "full GPU",
        max_batch_size=pd.to_numeric(frame["max_batch_size"], errors="coerce"),
        predicted=pd.to_numeric(frame["predicted_max_batch"], errors="coerce") if "predicted_max_batch" in frame
        else float("nan"),
    )
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
                predicted = "predicted by the memory model"
                ax.scatter([x], [row["predicted"]], marker="_", s=400 * width, color="black", linewidths=2,
                           zorder=5, label=None if predicted in labelled else predicted)
                labelled.add(predicted)
    ax.set_xticks(range(len(techniques)))
    ax.set_xticklabels(techniques, rotation=20, ha="right")
    ax.set_xlim(-1.0 if len(techniques) == 1 else -0.6, len(techniques) - (0.0 if len(techniques) == 1 else 0.4))
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.08)
    ax.set_ylabel("max batch size that fits (sequences)")
    seq = pd.to_numeric(frame["seq_len"], errors="coerce").dropna() if "seq_len" in frame else pd.Series(dtype=float)
    gpus = sorted(str(n) for n in results.trials["gpu_name"].dropna().unique())
    context = gpus + ([limits[0]] if len(limits) == 1 else []) + ([f"seq_len {int(seq.max())}"] if len(seq) else [])
    ax.set_title("Largest batch that fits (OOM-aware search)" + (f"\n{', '.join(context)}" if context else ""))
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return "8_max_batch.png", fig


# Plots over the training trials (probes left out), then plots of the max-batch search.
TRAINING_PLOTS: tuple[Callable[[SweepResults], tuple[str, Figure]], ...] = (
    plot_memory_vs_batch, plot_speed_vs_batch, plot_tradeoff, plot_technique_comparison,
    plot_window_comparison, plot_memory_savings, plot_loss_curves,
)
SEARCH_PLOTS: tuple[Callable[[SweepResults], tuple[str, Figure]], ...] = (plot_max_batch,)
