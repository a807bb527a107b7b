"""Probe configs and outcomes, and where probes run: the Ray-free half of the max-batch search.

Imports neither torch nor Ray at import time: the driver classifies outcomes; the Tune worker's
`probe_trainable` has each probe forked by `trainable.fork_server`, which imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.io import error_line

from .search import Outcome


@dataclass(frozen=True)
class MaxBatchSettings:
    start: int = 1
    max_bound: int = 65536  # the largest batch size to try (--max, at most the training rows), not the answer
    granularity: int = 1
    probe_steps: int = 3
    parallelism: int = 1
    scout: bool = True  # search inside one fresh process first, then confirm with fresh probes


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


# -- each probe in a fresh process, forked from a warm server ---------------------------------------------
# A probe's answer near the memory edge may depend on what ran before it in its process, so every probe gets a
# fresh one: a fork of its Tune worker's `trainable.fork_server` (reused from probe to probe: reuse_actors),
# which imported torch and the training code once and never touched CUDA.
SCOUT_KEY = "scout"  # in a probe's Tune config: search in the forked process first (`scout`)
TARGET = "sweep.probe:probe_child"


class ProbeFailed(RuntimeError):
    """A probe process failed: its own error line (an allocation failure keeps the allocator's words)."""


def probe_trainable(config: dict[str, Any]) -> None:
    """Tune function trainable of the max-batch search: run the probe in a fork of this worker's server and
    hand its reports to Tune as they come."""
    from contract.experiment import SWEEP_KEYS
    from ray import tune
    from trainable.fork_server import fork_server, preload_for, process_start_time

    config = {k: v for k, v in config.items() if k not in SWEEP_KEYS}
    payload = {"config": {k: v for k, v in config.items() if k != SCOUT_KEY}, "scout": config.get(SCOUT_KEY),
               "worker_start_time": process_start_time()}
    error = None
    for message in fork_server().run(TARGET, payload, preload_for(payload["config"])):
        if "report" in message:
            tune.report(message["report"])
        elif "error" in message:
            error = message["error"]
        elif "exit" in message and message["exit"] != 0:
            error = error or f"the probe process ended with {_exit_words(message['exit'])}"
    if error is not None:
        raise ProbeFailed(error)


def _exit_words(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def probe_child(payload: dict[str, Any], send) -> None:
    """The probe in its fresh process (`fork_server` target): a scout's search, or one probe."""
    from trainable import TrialConfig, run_trial
    from trainable.fork_server import origin

    if payload.get("scout"):
        scout(payload["config"], payload["scout"], send, origin(payload))
    else:
        run_trial(TrialConfig.from_dict(payload["config"]), lambda metrics: send({"report": metrics}),
                  origin=origin(payload))


# -- the scout: a search inside one fresh process ---------------------------------------------------------
def scout(config: dict[str, Any], spec: dict[str, Any], send, origin: dict[str, Any] | None = None) -> None:
    """Search the max batch inside this process, one in-process probe after another (each trial after the
    first starts from `trainable.setup.reset_process`); report the best sub-probe's final report with the
    outcomes. Cheap (no process start per probe) but not proof: the search confirms the answer with fresh
    probes (`search.MaxBatchSearch(expect=...)`)."""
    from .search import MaxBatchSearch

    steps, outcomes, finals = spec["probe_steps"], [], {}

    def probe(sizes: list[int]) -> dict[int, Outcome]:
        answers = {}
        for bs in sizes:
            final, error, peak = _in_process(config, bs, steps)
            answers[bs] = classify_probe(final, error, steps, peak)
            outcomes.append([bs, answers[bs].kind.value, peak])
            finals[bs] = final
        return answers

    result = MaxBatchSearch(start=spec["start"], max_bound=spec["max_bound"],
                            granularity=spec["granularity"], hint=spec.get("hint")).run(probe)
    ok = result.status == "ok"
    report = finals.get(result.max_batch_size) if ok else None
    report = report or next((f for f in reversed(list(finals.values())) if f), {})
    how = dict(origin or {})  # the sub-probes ran in this process, forked as `origin` says
    send({"report": {**report, **how, "scout_max_batch": result.max_batch_size if ok else None,
                     "scout_outcomes": outcomes, "scout_error": result.error}})


def _in_process(config: dict[str, Any], batch_size: int, steps: int) -> tuple[dict | None, str | None, float | None]:
    """(final report, error line, peak MiB) of one probe run in this process."""
    import math

    from trainable import TrialConfig, run_trial

    reports: list[dict] = []
    try:
        final = run_trial(TrialConfig.from_dict({**config, "batch_size": batch_size}), reports.append)
        error = None
    except Exception as exc:  # noqa: BLE001 - an error is an outcome; its frames go with it
        final, error = None, error_line(exc)
    peaks = [r["mem_step_peak_mib"] for r in reports if not math.isnan(r.get("mem_step_peak_mib", math.nan))]
    return final, error, max(peaks) if peaks else None
