"""Stage 3: the technique x window x batch-size grid on Ray Tune, and the OOM-aware max-batch search.

    from sweep import SweepConfig, run_sweep, find_max_batch_size
    results, path = run_sweep(SweepConfig(preset="cpu"))         # a Tune ResultGrid + STORAGE/NAME
    records, path = find_max_batch_size(SweepConfig(techniques=("bf16", "flash")))

`python -m sweep.run --help` is the CLI over these.
"""
from .grid import PRESETS, SweepError, build_grid, trial_name
from .probe import MAX_BATCH_FILE, classify_probe
from .runner import SweepConfig, SweepPlan, find_max_batch_size, plan_sweep, prepare, run_sweep
from .search import MaxBatchSearch, Outcome, OutcomeKind, SearchResult, search_max_batch

__all__ = [
    "MAX_BATCH_FILE", "MaxBatchSearch", "Outcome", "OutcomeKind", "PRESETS", "SearchResult", "SweepConfig",
    "SweepError", "SweepPlan", "build_grid", "classify_probe", "find_max_batch_size", "plan_sweep", "prepare",
    "run_sweep", "search_max_batch", "trial_name",
]
