"""What every plot shares: matplotlib's Agg backend, one colour and marker per technique, axes helpers.

A plot is a function `SweepResults -> (file name, Figure)`; one that the data cannot support raises `SkipPlot`
with the reason, which the report prints instead of failing.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

OOM_STYLE = dict(marker="x", color="red", s=90, linewidths=2.5, zorder=5)
# Techniques often measure the same memory (flash and sliding window at one batch size); distinct markers, drawn
# smaller for later techniques, keep every line visible where they overlap.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
DASHES = ("-", "--", "-.", ":")


class SkipPlot(Exception):
    """Why a plot was not drawn; the message goes into the report."""


def technique_colors(frame: pd.DataFrame) -> dict[str, tuple]:
    """One colour per technique label, the same in every plot."""
    techniques = sorted(str(t) for t in frame["label"].dropna().unique()) if "label" in frame else []
    cmap = plt.get_cmap("tab10" if len(techniques) <= 10 else "tab20")
    return {t: cmap(i % cmap.N) for i, t in enumerate(techniques)}


def technique_style(frame: pd.DataFrame) -> dict[str, dict]:
    """Line-plot style per technique: its colour, a distinct marker, and shrinking sizes so overlaps show."""
    colors = technique_colors(frame)
    return {t: dict(color=c, marker=MARKERS[i % len(MARKERS)], markersize=max(4.0, 10.0 - 1.2 * i),
                    lw=max(1.0, 2.6 - 0.3 * i))
            for i, (t, c) in enumerate(colors.items())}


def human(value: float, _pos=None) -> str:
    """1.5M, 600k: tick labels for throughputs, instead of matplotlib's separate 1e6 offset."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


HUMAN = FuncFormatter(human)


def short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def log2_axis(ax, values, label: str) -> None:
    """A log2 x axis ticked at exactly the values present (batch sizes, windows, seq_lens)."""
    ticks = sorted({int(v) for v in values if pd.notna(v)})
    if not ticks:
        return
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    if len(ticks) == 1:  # one tick: keep it in the middle, not at an edge of a default range
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    ax.set_xlabel(label)


def batch_axis(ax, sizes) -> None:
    log2_axis(ax, sizes, "batch size (sequences, log2 scale)")


def gpu_title(trials: pd.DataFrame, total_mib: float | None = None) -> str:
    """` (NVIDIA H200; 143,771 MiB total)`, or ` (CPU)` for CPU trials, for a plot's title."""
    names = sorted(str(n) for n in trials["gpu_name"].dropna().unique()) if "gpu_name" in trials else []
    parts = [", ".join(names)] if names else []
    if not names and "device" in trials and trials["device"].eq("cpu").any():
        parts.append("trials ran on CPU")
    if total_mib:
        parts.append(f"{total_mib:,.0f} MiB total")
    return f" ({'; '.join(parts)})" if parts else ""


def mark_ooms(ax, ooms: pd.DataFrame, y: pd.Series | float, label: str, x: str = "batch_size") -> None:
    """Red crosses at the OOM trials, each named (several at one x stack their names upwards)."""
    if ooms.empty:
        return
    ys = list(y) if isinstance(y, pd.Series) else [y] * len(ooms)
    ax.scatter(ooms[x], ys, label=label, **OOM_STYLE)
    seen: dict[float, int] = {}
    for x_at, y_at, technique in zip(ooms[x], ys, ooms["label"]):
        stack = seen[x_at] = seen.get(x_at, -1) + 1
        ax.annotate(str(technique), (x_at, y_at), xytext=(6, 4 + 9 * stack), textcoords="offset points",
                    color="red", fontsize=7)


def not_measured(ax, values: pd.Series, why: str = "not measured\n(e.g. CPU trials)") -> bool:
    """Say so inside a panel whose quantity no trial measured (e.g. GPU memory on CPU trials)."""
    if values.notna().any():
        return False
    ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_yticks([])
    return True


def predicted_badge(ax) -> None:
    """The title of a panel that shows memory-model predictions, not measurements."""
    ax.set_title("predicted by the memory model for a CUDA GPU; not measured", fontsize=8, color="dimgray",
                 style="italic")


def several_seq_lens(trials: pd.DataFrame) -> bool:
    return "seq_len" in trials and trials["seq_len"].dropna().nunique() > 1


def line_groups(frame: pd.DataFrame, by_seq: bool):
    """(legend label, technique, seq_len index, rows) per line: one per technique, and per seq_len when the
    experiment has several (a line across seq_lens would mix two experiments' worth of memory)."""
    seqs = sorted(frame["seq_len"].dropna().unique()) if by_seq else []
    for technique, group in frame.groupby("label", sort=True):
        if not by_seq:
            yield str(technique), str(technique), 0, group
            continue
        for i, seq in enumerate(seqs):
            rows = group[group["seq_len"] == seq]
            if len(rows):
                yield f"{technique} s{int(seq)}", str(technique), i, rows
