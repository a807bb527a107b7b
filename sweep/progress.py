"""What a sweep prints while it runs: one line per trial start, finish, OOM or error (Tune's tables off).

At `--verbose 1` (the default) this replaces Ray Tune's per-trial configuration and result boxes with a
compact log the user can follow (`[3/18] done bf16_flash_bs64  step 100  loss 5.21  peak 15,016 MiB
1.51M tok/s`); `--verbose 0` prints errors only; `--verbose 2` gives Tune's own output back.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray import tune

from contract.experiment import GRID_KEY


def _num(value: Any, spec: str, unit: str = "") -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return f"{format(value, spec)}{unit}"


def _speed(value: Any) -> str | None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return f"{value / 1e6:.2f}M tok/s" if value >= 1e6 else f"{value / 1e3:.1f}k tok/s"


def summary(result: dict[str, Any]) -> str:
    """`step 100  loss 5.21  peak 15,016 MiB  1.51M tok/s` from a trial's last report (missing parts left out)."""
    peak = _num(result.get("mem_step_peak_mib"), ",.0f", " MiB")
    speed = result.get("wall_tokens_per_s") if result.get("final") else result.get("tokens_per_s")
    parts = [f"step {result['step']}" if "step" in result else None,
             f"loss {result['loss']:.3f}" if _num(result.get("loss"), ".3f") else None,
             f"peak {peak}" if peak else None, _speed(speed)]
    return "  ".join(p for p in parts if p)


class TrialLines(tune.Callback):
    """Prints one line per trial event to stderr; errors always, the rest at verbose >= 1."""

    def __init__(self, total: int, verbose: int = 1):
        self.total, self.verbose = total, verbose
        self.done = 0
        self.last: dict[str, dict[str, Any]] = {}
        self.t0 = time.monotonic()

    def _print(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f}s] {text}", file=sys.stderr, flush=True)

    @staticmethod
    def _name(trial) -> str:
        return str(trial.config.get(GRID_KEY) or trial)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if self.verbose >= 1:
            self._print(f"start  {self._name(trial)}")

    def on_trial_restore(self, iteration, trials, trial, **info) -> None:
        if self.verbose >= 1:
            self._print(f"resume {self._name(trial)} from its last checkpoint")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last[trial.trial_id] = result

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        result = self.last.get(trial.trial_id) or trial.last_result or {}
        status = result.get("status", "ok")
        word = {"oom": "OOM   ", "nan": "NaN   "}.get(status, "done  ")
        if self.verbose >= 1 or status != "ok":
            self._print(f"{word} {self._name(trial)}  [{self.done}/{self.total}]  {summary(result)}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        from contract.io import error_line

        try:
            error = trial.get_error()
        except Exception:  # noqa: BLE001 - the error file may be unreadable; the line still says which trial
            error = None
        self._print(f"error  {self._name(trial)}  [{self.done}/{self.total}]  "
                    f"{error_line(error) if error is not None else 'see its error.txt'}")
