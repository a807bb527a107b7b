"""Probe configs and outcomes, and where probes run: the Ray-free half of the max-batch search.

Imports neither torch nor Ray at import time: the driver classifies outcomes; the Tune worker's
`probe_trainable` forks probes from a `ProbeServer`, which imports torch.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
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
# fresh one. Starting a process is what made probes slow (a Ray worker, `import torch`: ~10 s); here each
# probe is a fork of a server that imported torch and the training code once but never touched CUDA, so the
# fork gets a fresh CUDA context and a fresh allocator at once. The server lives in the Tune worker (reused
# from probe to probe: reuse_actors), on its GPU; the worker itself never initialises CUDA.
SCOUT_KEY = "scout"  # in a probe's Tune config: search in the forked process first (`scout`)
_FD_ENV = "MEMEFF_PROBE_FD"
_SERVER: list = []  # this worker's ProbeServer


class ProbeFailed(RuntimeError):
    """A probe process failed: its own error line (an allocation failure keeps the allocator's words)."""


def probe_trainable(config: dict[str, Any]) -> None:
    """Tune function trainable of the max-batch search: run the probe in a fork of this worker's server and
    hand its reports to Tune as they come."""
    from contract.experiment import SWEEP_KEYS
    from ray import tune

    config = {k: v for k, v in config.items() if k not in SWEEP_KEYS}
    request = {"config": {k: v for k, v in config.items() if k != SCOUT_KEY}, "scout": config.get(SCOUT_KEY)}
    error, process = None, None
    for message in _server().run(request):
        if "process" in message:
            process = message["process"]
        elif "report" in message:
            tune.report({**message["report"], "probe_process": process})
        elif "error" in message:
            error = message["error"]
        elif message.get("exit"):
            error = error or f"the probe process ended with {_exit_words(message['exit'])}"
    if error is not None:
        raise ProbeFailed(error)


def _exit_words(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def _server() -> "ProbeServer":
    if not _SERVER or not _SERVER[0].alive():
        _SERVER[:] = [ProbeServer()]
    return _SERVER[0]


class ProbeServer:
    """`python -c serve()` with a message pipe: requests (JSON lines) on its stdin, messages on the pipe."""

    def __init__(self) -> None:
        import subprocess

        read, write = os.pipe()
        env = {**os.environ, _FD_ENV: str(write), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-c", "from sweep.probe import serve; serve()"],
                                     stdin=subprocess.PIPE, pass_fds=(write,), env=env, text=True)
        os.close(write)
        self.messages = os.fdopen(read, "r", encoding="utf-8")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The messages of one probe, up to and including its `exit`."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.messages:
            message = json.loads(line)
            yield message
            if "exit" in message:
                return
        yield {"exit": self.proc.wait()}  # the server itself died


def serve() -> None:
    """The probe server: import torch and the training code once, then fork one child per request. It ends
    when its stdin does (its worker exited or died), killing a child still running.

    A fork may use CUDA only if this process never initialised the CUDA driver: `is_available()` checks here
    go through NVML, and should anything have loaded the driver anyway, each probe is a new interpreter
    instead (slower, as fresh)."""
    out_fd = int(os.environ.pop(_FD_ENV))
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # a device-count check here must not initialise CUDA
    import torch
    import torch._dynamo  # noqa: F401 - torch.optim's optimizers import it on first use: 2-3 s a process

    import data_prep  # noqa: F401 - what every probe needs, imported once, before any fork
    import trainable.trial  # noqa: F401

    for line in sys.stdin:
        sys.stdout.flush()
        sys.stderr.flush()
        if torch.cuda.is_initialized() or _cuda_driver_initialised():
            os.write(out_fd, b'{"process": "spawn"}\n')  # reported with every probe: never a silent fallback
            pid = _spawn(line, out_fd)
        else:
            os.write(out_fd, b'{"process": "fork"}\n')
            pid = os.fork()
            if pid == 0:
                os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
                _child(json.loads(line), out_fd)
        os.write(out_fd, (json.dumps({"exit": _wait(pid)}) + "\n").encode())


def _cuda_driver_initialised() -> bool:
    """Whether this process initialised the CUDA driver (a fork of it could not use CUDA then).

    Torch's CUDA libraries map libcuda.so at import, so a mapped driver says nothing; an initialised one answers
    `cuDeviceGetCount`, an uninitialised one returns CUDA_ERROR_NOT_INITIALIZED (3) and stays uninitialised."""
    try:
        with open("/proc/self/maps") as f:
            if "libcuda.so" not in f.read():
                return False
    except OSError:
        return False
    try:
        import ctypes

        count = ctypes.c_int()
        return ctypes.CDLL("libcuda.so.1").cuDeviceGetCount(ctypes.byref(count)) != _CUDA_ERROR_NOT_INITIALIZED
    except (OSError, AttributeError):  # a driver we cannot ask: assume the worst (a new interpreter per probe)
        return True


_CUDA_ERROR_NOT_INITIALIZED = 3


def _spawn(line: str, out_fd: int) -> int:
    """The probe in a new interpreter (the fallback when a fork could not use CUDA); its pid."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    proc = subprocess.Popen([sys.executable, "-c", f"from sweep.probe import _child; import json, sys; "
                             f"_child(json.loads(sys.stdin.readline()), {out_fd})"],
                            stdin=subprocess.PIPE, pass_fds=(out_fd,), env=env, text=True)
    proc.stdin.write(line)
    proc.stdin.close()
    return proc.pid


def _wait(pid: int) -> int:
    """The child's exit code; if stdin becomes readable meanwhile (EOF: the worker is gone), kill it and exit.
    (No request comes while a child runs, and no death signal: it would fire when the worker's *thread*
    that started this server ends, i.e. after the first trial.)"""
    import select

    try:
        watch, timeout = os.pidfd_open(pid), None
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        watch, timeout = None, 0.05
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            readable, _, _ = select.select([sys.stdin] + ([watch] if watch is not None else []), [], [], timeout)
            if sys.stdin in readable:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os._exit(0)
    finally:
        if watch is not None:
            os.close(watch)


def _child(request: dict[str, Any], out_fd: int) -> None:
    """One probe in this fresh process; its messages on `out_fd`; never returns."""
    import threading

    code, lock = 1, threading.Lock()
    out = os.fdopen(out_fd, "w", encoding="utf-8")

    def send(message: dict[str, Any]) -> None:  # from the trial's reporter thread
        with lock:
            out.write(json.dumps(message, default=str) + "\n")
            out.flush()

    try:
        _die_with_parent()
        if request.get("scout"):
            scout(request["config"], request["scout"], send)
        else:
            from trainable import TrialConfig, run_trial

            run_trial(TrialConfig.from_dict(request["config"]), lambda metrics: send({"report": metrics}))
        code = 0
    except BaseException as exc:  # noqa: BLE001 - the probe's result is its error line
        send({"error": error_line(exc)})
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """SIGKILL this process when the thread that forked it (the server's only one) dies (Linux)."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


# -- the scout: a search inside one fresh process ---------------------------------------------------------
def scout(config: dict[str, Any], spec: dict[str, Any], send) -> None:
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
    send({"report": {**report, "scout_max_batch": result.max_batch_size if ok else None,
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
