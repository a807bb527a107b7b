"""Sweep results -> pandas DataFrames, a comparison report and plots.

Reads a Ray Tune experiment directory (local or remote) from its plain files (JSON, JSON lines); never imports
`trainable`, `sweep`, `data_prep` or torch, so it runs anywhere pandas and pyarrow are installed, no GPU needed.

    from analysis import load, write_report
    results = load("results/my_sweep")
    results.trials       # one row per trial (status ok | oom | nan | error | incomplete)
    results.steps        # per-step history of every trial, each step once
    results.max_batch    # max-batch search records (no rows if none; the columns are there)
    results.predictions  # the memory model's predicted peaks the sweep wrote (no rows if none)
    results.probes       # the max-batch search's probe trials (trials with kind == "probe")
    both = load_many(["results/search_32gb", "results/search_full"])  # several experiments as one
    write_report(results, "results/my_sweep/analysis")

Throughput, one meaning per column (steady steps = those not flagged warm-up; `analysis.speed`):
`tokens_per_s` = median over the steady steps of each step's GPU-time throughput; `steady_tokens_per_s` = total
steady tokens / total steady GPU time (the trial's own figure); `wall_tokens_per_s` = steady tokens / the wall
time between their reports (what the user's clock saw: reporting, evaluation, checkpoints included). The median
and the total differ when step times vary.
"""
from .files import AnalysisError
from .load import PREDICTION_COLUMNS, TRIAL_COLUMNS, SweepResults, combine, load, load_many
from .report import format_max_batch_table, format_report, format_table, write_report
from .speed import MIN_SPEED_STEPS, WARMUP_STEPS

__all__ = ["AnalysisError", "MIN_SPEED_STEPS", "PREDICTION_COLUMNS", "SweepResults", "TRIAL_COLUMNS",
           "WARMUP_STEPS", "combine", "format_max_batch_table", "format_report", "format_table", "load", "load_many",
           "write_report"]
