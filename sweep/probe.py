"""Probe configs, probe outcomes and the max-batch table: the Ray-free half of the max-batch search."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.io import error_line

from .search import Outcome


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
    from trainable.oom import is_oom_error

    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None)  # RayTaskError keeps the trial's own exception here
        if is_oom_error(error) or (isinstance(cause, BaseException) and is_oom_error(cause)):
            return True
    # The text of a wrapped or re-raised allocation failure (only its message survived).
    return is_oom_error(RuntimeError(str(error)))


def classify_probe(result: dict[str, Any] | None, error: BaseException | str | None, probe_steps: int,
                   peak_mem_mib: float | None = None) -> Outcome:
    """One probe trial's outcome from its last report and its error, if any.

    An OOM is what the trial says (`oom: True`) or an error that is an allocation failure in disguise
    (e.g. `CUBLAS_STATUS_ALLOC_FAILED` in a RuntimeError); any other error is an ERROR.
    """
    result = result or {}
    if error is not None:
        if _is_oom(error):
            return Outcome.oom(error_line(error), peak_mem_mib)
        return Outcome.error(error_line(error))
    if result.get("oom") is True or result.get("status") == "oom":
        return Outcome.oom(f"out of memory in {result.get('oom_phase', 'training')}", peak_mem_mib)
    steps = result.get("step")
    if result.get("status") == "ok" and (steps is None or steps >= probe_steps):
        return Outcome.fits(peak_mem_mib)
    if result.get("status") == "ok":
        return Outcome.error(f"the probe ran {steps} of {probe_steps} steps: the dataset is too small for this batch")
    return Outcome.error("the probe ended without a final report")
