"""Sweep results -> pandas DataFrames, a comparison report and plots.

Reads a Ray Tune experiment directory (local or remote) through Tune's result API; never imports `trainable`,
`sweep` or `data_prep`, so it runs anywhere pandas and Ray are installed, no GPU needed.

    from analysis import load, write_report
    results = load("results/my_sweep")
    results.trials      # one row per trial (status ok | oom | error | incomplete)
    results.steps       # per-step history of every trial
    results.max_batch   # max-batch search records (empty if none)
    results.probes      # the max-batch search's probe trials (trials with kind == "probe")
    both = load_many(["results/search_32gb", "results/search_full"])  # several experiments as one
    write_report(results, "results/my_sweep/analysis")
"""
from .load import WARMUP_STEPS, AnalysisError, SweepResults, combine, load, load_many
from .report import format_max_batch_table, format_report, format_table, write_report

__all__ = ["AnalysisError", "SweepResults", "WARMUP_STEPS", "combine", "format_max_batch_table", "format_report",
           "format_table", "load", "load_many", "write_report"]
