"""Stage 3: the technique x window x batch-size grid on Ray Tune, and the OOM-aware max-batch search.

    from sweep import SweepConfig, run_sweep, find_max_batch_size
    results, path = run_sweep(SweepConfig(preset="cpu"))         # a Tune ResultGrid + STORAGE/NAME
    records, path = find_max_batch_size(SweepConfig(techniques=("bf16", "flash")))

`python -m sweep.run --help` is the CLI over these. Importing `sweep` imports neither torch nor Ray.
"""
from __future__ import annotations

import importlib
from typing import Any

from .config import SweepConfig
from .errors import SweepError
from .grid import PRESETS, build_grid, trial_name
from .plan import SweepPlan, plan_sweep

_LAZY = {"find_max_batch_size": "orchestrate", "prepare": "orchestrate", "run_sweep": "orchestrate",
         "MaxBatchSearch": "search", "Outcome": "search", "OutcomeKind": "search", "SearchResult": "search",
         "search_max_batch": "search", "classify_probe": "probe"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sweep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["PRESETS", "SweepConfig", "SweepError", "SweepPlan", "build_grid", "plan_sweep", "trial_name", *_LAZY]
