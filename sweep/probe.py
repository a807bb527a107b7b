"""Probe configs, probe outcomes and the max-batch table: the Ray-free half of the max-batch search."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .search import Outcome
from .tuning import format_rows

MAX_BATCH_FILE = "max_batch.json"


@dataclass(frozen=True)
class MaxBatchSettings:
    start: int = 1
    max_batch_size: int = 65536
    granularity: int = 1
    probe_steps: int = 3
    parallelism: int = 1


def probe_config(base: dict[str, Any], batch_size: int, probe_steps: int) -> dict[str, Any]:
    """A short run at one batch size: `probe_steps` full steps, one tiny validation, no checkpoints."""
    return {**base, "batch_size": batch_size, "max_steps": probe_steps, "epochs": None, "max_tokens": None,
            "eval_interval": 0, "eval_batches": 1, "checkpoint_interval": 0, "warmup_steps": 0}


def _is_oom(error: BaseException | str) -> bool:
    """`trainable.is_oom_error` on the exception (unwrapped from Ray's wrapper) or on its text."""
    from trainable import is_oom_error

    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None)  # RayTaskError keeps the trial's own exception here
        if is_oom_error(error) or (isinstance(cause, BaseException) and is_oom_error(cause)):
            return True
    # The text of a wrapped or re-raised allocation failure (only its message survived).
    return is_oom_error(RuntimeError(str(error)))


def _error_line(error: BaseException | str) -> str:
    """`Type: message` of the trial's own exception, not Ray's wrapper and traceback."""
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None)
        exc = cause if isinstance(cause, BaseException) else error
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not ln.startswith(("File ", "^", "~", "Traceback", "Failure #"))]
    return (meaningful or lines or ["unknown error"])[-1][:300]


def classify_probe(result: dict[str, Any] | None, error: BaseException | str | None, probe_steps: int,
                   peak_mem_mib: float | None = None) -> Outcome:
    """One probe trial's outcome from its last report and its error, if any.

    An OOM is what the trial says (`oom: True`) or an error that is an allocation failure in disguise
    (e.g. `CUBLAS_STATUS_ALLOC_FAILED` in a RuntimeError); any other error is an ERROR.
    """
    result = result or {}
    if error is not None:
        if _is_oom(error):
            return Outcome.oom(_error_line(error), peak_mem_mib)
        return Outcome.error(_error_line(error))
    if result.get("oom") is True or result.get("status") == "oom":
        return Outcome.oom(f"out of memory in {result.get('oom_phase', 'training')}", peak_mem_mib)
    steps = result.get("step")
    if result.get("status") == "ok" and (steps is None or steps >= probe_steps):
        return Outcome.fits(peak_mem_mib)
    if result.get("status") == "ok":
        return Outcome.error(f"the probe ran {steps} of {probe_steps} steps: the dataset is too small for this batch")
    return Outcome.error("the probe ended without a final report")


def _probes_and_rounds(probes: Any, rounds: Any) -> str | None:
    return None if probes is None else f"{probes}/{rounds if rounds is not None else '-'}"


def format_max_batch(records: list[dict[str, Any]]) -> str:
    """The search's table: the answer, the prediction it was seeded with, and probes/rounds used vs unseeded."""
    rows = [{
        "technique": r["technique"],
        "max_batch": ("-" if r["max_batch_size"] is None
                      else f"{r['max_batch_size']}{'+' if r.get('hit_upper_bound') else ''}"),
        "predicted": r.get("predicted_max_batch"),
        "peak_mem_mib": r["peak_mem_mib"],
        "probes/rounds": _probes_and_rounds(r["probes"], r.get("rounds")),
        "unseeded": _probes_and_rounds(r.get("unseeded_probes"), r.get("unseeded_rounds")),
        "wall_time_s": r["wall_time_s"],
        "status": r["status"],
        "error": r["error"] or "",
    } for r in records]
    table = format_rows(rows)
    if any(r.get("hit_upper_bound") for r in records):
        table += "\n(+ = reached the --max bound; the real limit may be higher)"
    saving = search_saving(records)
    if saving:
        table += "\n" + saving
    return table


def search_saving(records: list[dict[str, Any]]) -> str | None:
    """One line: probes and rounds of the seeded searches vs the unseeded search replayed on the same answers."""
    done = [r for r in records if r.get("seeded") and r.get("unseeded_probes") is not None]
    if not done:
        return None
    probes, rounds = sum(r["probes"] for r in done), sum(r["rounds"] for r in done)
    unseeded_probes, unseeded_rounds = sum(r["unseeded_probes"] for r in done), sum(r["unseeded_rounds"] for r in done)
    wall = sum(r["wall_time_s"] or 0.0 for r in done)
    per_round = wall / rounds if rounds else 0.0
    return (f"seeded by the memory model: {probes} probes in {rounds} rounds; the unseeded search would have "
            f"needed {unseeded_probes} probes in {unseeded_rounds} rounds (replayed on the same answers)"
            + (f", ~{per_round * (unseeded_rounds - rounds):.0f} s more at {per_round:.1f} s per round"
               if rounds and unseeded_rounds > rounds else ""))
