"""What a sweep prints while it runs: one line per trial start, finish, OOM, NaN, retry or error (Tune's tables off).

At `--verbose 1` (the default) this replaces Ray Tune's per-trial configuration and result boxes with a
compact log the user can follow (`[  41s] done   bf16_flash_bs64  [3/18]  step 100  loss 5.210  peak 15,016 MiB
1.51M tok/s`); `--verbose 0` prints trial errors only; `--verbose 2` gives Tune's own output back (the sweep
then installs no `TrialLines`).

`TrialLines` is also what makes a resumed sweep look like it works: Tune saves its experiment state every
few seconds, while trials keep checkpointing and Tune deletes all but the newest `num_to_keep` of them. A
driver killed between two saves leaves a state that lists checkpoints already deleted; on resume, Tune's
first new checkpoint then tries to delete a missing one and logs `Error handling checkpoint ...
FileNotFoundError` (the trial itself is fine). Before the first step, `forget_missing_checkpoints` takes
those from the restored trials' bookkeeping. Tune pickles its callbacks with the experiment, so a resumed
sweep runs this code too.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from ray import tune

from contract.experiment import GRID_KEY

FINISHED = ("TERMINATED", "ERROR")
# This driver's --verbose (set by `quiet_tune`): a resumed sweep runs the TrialLines Tune pickled with the
# experiment, whose own verbosity is the first run's.
_VERBOSE: int | None = None
# Tune's loggers whose lines the compact output says in its own words (or that say nothing wrong).
TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


def _num(value: Any, spec: str, unit: str = "") -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return f"{format(value, spec)}{unit}"


def _speed(value: Any) -> str | None:
    if _num(value, "g") is None:
        return None
    return f"{value / 1e6:.2f}M tok/s" if value >= 1e6 else f"{value / 1e3:.1f}k tok/s"


def summary(result: dict[str, Any]) -> str:
    """`step 100  loss 5.210  peak 15,016 MiB  1.51M tok/s` from a trial's last report (missing parts left out)."""
    if result.get("status") == "oom":
        reserved = _num(result.get("mem_reserved_mib"), ",.0f", " MiB reserved")
        return "  ".join(p for p in (f"step {result.get('step')}", f"in {result.get('oom_phase')}", reserved) if p)
    if result.get("status") == "nan":
        return f"the loss became {result.get('loss')} at step {result.get('step')}: training stopped"
    peak = _num(result.get("mem_step_peak_mib"), ",.0f", " MiB")
    speed = result.get("wall_tokens_per_s") if result.get("final") else result.get("tokens_per_s")
    loss = result.get("loss")
    parts = [f"step {result['step']}" if "step" in result else None, f"loss {loss:.3f}" if _num(loss, ".3f") else None,
             f"peak {peak}" if peak else None, _speed(speed)]
    return "  ".join(p for p in parts if p)


def _exists(checkpoint) -> bool:
    import pyarrow.fs

    try:
        return checkpoint.filesystem.get_file_info(checkpoint.path).type != pyarrow.fs.FileType.NotFound
    except OSError:
        return True  # unreachable storage: leave Tune's bookkeeping as it is


def forget_missing_checkpoints(trials) -> int:
    """Drop the checkpoints a restored experiment state lists but storage no longer holds; returns how many.

    The newest one is kept when it exists (a trial resumes from it); when even it is gone the trial falls back
    to the newest one that exists, else starts afresh, instead of failing to restore."""
    dropped = 0
    for trial in trials:
        manager = getattr(getattr(trial, "run_metadata", None), "checkpoint_manager", None)
        results = getattr(manager, "_checkpoint_results", None)
        if not results:
            continue
        kept = [r for r in results if _exists(r.checkpoint)]
        dropped += len(results) - len(kept)
        if len(kept) < len(results):
            manager._checkpoint_results = kept
            latest = manager._latest_checkpoint_result
            if latest is not None and not any(r is latest for r in kept) and not _exists(latest.checkpoint):
                manager._latest_checkpoint_result = kept[-1] if kept else None
    return dropped


class MissingCheckpoints(tune.Callback):
    """`forget_missing_checkpoints` once, before the run's first step (also of a restored run: Tune pickles its
    callbacks with the experiment). TrialLines is one; a sweep without TrialLines (--verbose 2) can install
    this alone."""

    def setup(self, **info) -> None:
        self.reconciled = False

    def on_step_begin(self, iteration, trials, **info) -> None:
        if not getattr(self, "reconciled", False):
            self.reconciled = True
            forget_missing_checkpoints(trials)


class TrialLines(MissingCheckpoints):
    """Prints one line per trial event to stderr: errors always, the rest at verbose >= 1."""

    def __init__(self, total: int, verbose: int = 1):
        self.total, self.verbose = total, verbose
        self.t0 = time.monotonic()
        self.reconciled = False

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        """Also called when a pickled instance starts a resumed run: the clock starts again."""
        super().setup()
        self.t0 = time.monotonic()
        self.total = total_num_samples or self.total
        self.verbose = self.verbose if _VERBOSE is None else min(_VERBOSE, 1)

    def _print(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f}s] {text}", file=sys.stderr, flush=True)

    @staticmethod
    def _name(trial) -> str:
        return str(trial.config.get(GRID_KEY) or trial)

    def _count(self, trials, trial) -> str:
        done = 1 + sum(t.status in FINISHED for t in trials if t is not trial)
        return f"[{done}/{max(self.total, len(trials))}]"

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if self.verbose < 1:
            return
        latest = getattr(trial, "latest_checkpoint_result", None)
        step = (latest.metrics or {}).get("step") if latest is not None else None
        self._print(f"resume {self._name(trial)} from its step-{step} checkpoint" if step is not None
                    else f"start  {self._name(trial)}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        if self.verbose >= 1:
            self._print(f"retry  {self._name(trial)}  (failure {trial.run_metadata.num_failures}): "
                        f"{self._error(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        status = result.get("status", "ok")
        word = {"oom": "OOM   ", "nan": "NaN   "}.get(status, "done  ")
        if self.verbose >= 1:
            self._print(f"{word} {self._name(trial)}  {self._count(trials, trial)}  {summary(result)}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._print(f"error  {self._name(trial)}  {self._count(trials, trial)}  {self._error(trial)}")

    @staticmethod
    def _error(trial) -> str:
        from contract.io import error_line

        try:
            error = trial.get_error()
        except Exception:  # noqa: BLE001 - the error file may be unreadable; the line still says which trial
            error = None
        return error_line(error) if error is not None else "see its error.txt"


class TuneNoise(logging.Filter):
    """Tune's interrupt and restore lines, replaced by the sweep's own (at --verbose < 2).

    Dropped: the Ctrl-C banner (replaced by one line), "Experiment has been interrupted ... Tuner.restore(...)"
    (the sweep prints its --resume command), "Trials did not complete" (each error has its line and the sweep
    counts them), and "Failed to fetch metrics" when every trial it names simply has not reported yet (a
    trial that started just before an interrupt: nothing is lost)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Stop signal received"):
            print("stopping: Ctrl-C received, saving the sweep's state (Ctrl-C again quits at once)",
                  file=sys.stderr, flush=True)
            return False
        if text.startswith(("Experiment has been interrupted", "Trials did not complete")):
            return False
        lines = text.splitlines()
        return not (lines[0].startswith("Failed to fetch metrics")
                    and all("were not found" in line for line in lines[1:]))


def quiet_tune(verbose: int) -> None:
    """This driver's output level: `TuneNoise` on Tune's loggers below --verbose 2 (once per process), and the
    level every TrialLines of the run prints at, a restored one included."""
    global _VERBOSE
    _VERBOSE = verbose
    if verbose >= 2:
        return
    for name in TUNE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TuneNoise) for f in logger.filters):
            logger.addFilter(TuneNoise())
