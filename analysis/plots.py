"""The comparison plots, drawn from `SweepResults` with matplotlib's Agg backend.

Each plot is a function `SweepResults -> (file name, Figure)`; a plot that the data cannot support raises
`SkipPlot` with the reason, which the report prints instead of failing.

 1 memory vs batch size, 2 speed vs batch size, 3 memory/speed trade-off, 4 techniques at one batch size
 (plots_batch); 5 sliding-window size, 6 memory saving vs the baseline, 7 loss curves (plots_runs); 8 max batch,
 9 where the memory goes, 10 memory and speed vs seq_len (plots_memory). On CPU, memory is the memory model's
 predicted CUDA peak, labelled as predicted.
"""
from __future__ import annotations

from typing import Callable

from matplotlib.figure import Figure

from .load import SweepResults
from .plot_style import SkipPlot, technique_colors, technique_style
from .plots_batch import (
    pareto_front, plot_memory_vs_batch, plot_speed_vs_batch, plot_technique_comparison, plot_tradeoff,
)
from .plots_memory import plot_max_batch, plot_memory_breakdown, plot_seq_len
from .plots_runs import identical_groups, plot_loss_curves, plot_memory_savings, plot_window_comparison
from .selection import PREFERRED_COMPARISON_BATCH, baseline_label, comparison_batch_size, memory_savings, ok_trials

Plot = Callable[[SweepResults], tuple[str, Figure]]
# Every plot in number order, and whether it compares the training trials only (probes left out) or reads the
# max-batch search.
PLOTS: tuple[tuple[Plot, bool], ...] = (
    (plot_memory_vs_batch, True), (plot_speed_vs_batch, True), (plot_tradeoff, True),
    (plot_technique_comparison, True), (plot_window_comparison, True), (plot_memory_savings, True),
    (plot_loss_curves, True), (plot_max_batch, False), (plot_memory_breakdown, True), (plot_seq_len, True),
)

__all__ = ["PLOTS", "PREFERRED_COMPARISON_BATCH", "SkipPlot", "baseline_label", "comparison_batch_size",
           "identical_groups", "memory_savings", "ok_trials", "pareto_front", "plot_loss_curves", "plot_max_batch",
           "plot_memory_breakdown", "plot_memory_savings", "plot_memory_vs_batch", "plot_seq_len",
           "plot_speed_vs_batch", "plot_technique_comparison", "plot_tradeoff", "plot_window_comparison",
           "technique_colors", "technique_style"]
