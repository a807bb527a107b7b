"""Per-step measurement that stays off the GPU's critical path, and the OOM classifier.

Memory: the CUDA caching allocator keeps its statistics on the host, so resetting and reading the
peak between phases costs no synchronisation. Time: a CUDA event pair per step, read one step
later (by then the GPU is past it, so reading it rarely waits and never idles the GPU).

On CPU there is no allocator to ask: every memory key is NaN ("not measured"), never 0.0, so
an average over trials cannot mistake "unknown" for "free"; time is host wall-clock.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Protocol

import torch

from .oom import is_oom_error  # noqa: F401 - re-exported: the trial's OOM classifier

MIB = float(1 << 20)
NOT_MEASURED = math.nan

class MemoryProbe(Protocol):
    def reset_peak(self) -> None: ...
    def peak_mib(self) -> float: ...
    def allocated_mib(self) -> float: ...
    def reserved_mib(self) -> float: ...


class CudaMemory:
    """The caching allocator's counters for one device (host-side reads, no sync)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / MIB

    def allocated_mib(self) -> float:
        return torch.cuda.memory_allocated(self.device) / MIB

    def reserved_mib(self) -> float:
        return torch.cuda.memory_reserved(self.device) / MIB


class NoMemory:
    """CPU: memory is not measured (NaN)."""

    def reset_peak(self) -> None:
        pass

    def peak_mib(self) -> float:
        return NOT_MEASURED

    allocated_mib = reserved_mib = peak_mib


class CudaTimer:
    """Step time as GPU time between two events recorded around the step."""

    def start(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started) -> tuple:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return started, event

    @staticmethod
    def seconds(span: tuple) -> float:
        started, stopped = span
        stopped.synchronize()
        return started.elapsed_time(stopped) / 1000.0

    @staticmethod
    def between(earlier: tuple, later: tuple) -> float:
        """Seconds on the GPU's clock from the end of one step to the end of a later one: that step's time plus
        every gap before it in which the GPU waited for the host (reporting, evaluation, checkpoint copies)."""
        later[1].synchronize()
        return earlier[1].elapsed_time(later[1]) / 1000.0


class HostTimer:
    """CPU: the step ran synchronously, wall-clock is its time."""

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, started: float) -> tuple[float, float]:
        return started, time.perf_counter()

    @staticmethod
    def seconds(span: tuple[float, float]) -> float:
        return span[1] - span[0]

    @staticmethod
    def between(earlier: tuple[float, float], later: tuple[float, float]) -> float:
        return later[1] - earlier[1]


def to_host_async(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of `tensor` that is valid once the GPU has passed this point (the step's stop event).

    `.item()` on a CUDA tensor copies on the current stream, behind everything queued since: read one
    step later, it would wait for the NEXT step to finish and leave the GPU idle while the host queues
    the one after. A pinned copy queued with the step is read for free once the step's event is done.
    """
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return tensor
    return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor, non_blocking=True)


def probes_for(device: torch.device) -> tuple[MemoryProbe, CudaTimer | HostTimer]:
    if device.type == "cuda":
        return CudaMemory(device), CudaTimer()
    return NoMemory(), HostTimer()


def gpu_facts(device: torch.device) -> dict:
    """Run facts about the accelerator (None / NaN on CPU)."""
    if device.type != "cuda":
        return {"gpu_name": None, "gpu_total_mib": NOT_MEASURED}
    props = torch.cuda.get_device_properties(device)
    return {"gpu_name": props.name, "gpu_total_mib": props.total_memory / MIB}


# -- where a trial's start goes ----------------------------------------------------------------------
TIMELINE_KEYS = ("worker_start_time", "server_start_time", "process_start_time", "imports_done_time", "trial_start_time", "data_ready_time", "cuda_ready_time",
                 "model_ready_time", "first_step_start_time", "first_step_end_time", "trial_end_time")


class Timeline:
    """Unix times of one trial's start-up milestones (`TIMELINE_KEYS`), reported once, in its final report.

    Unix rather than monotonic time, so milestones of different processes on one node (one trial's end, the
    next one's first step) line up in one timeline.
    """

    def __init__(self, imports_done: float, trials_before: int, process_start: float,
                 origin: dict[str, Any] | None = None):
        """`origin`: how this process came to be, for a trial forked by `fork_server` (`trial_process`, the
        `worker_start_time` of the Tune worker that asked for it, its server's `server_start_time`); without it
        the trial trains in the worker itself."""
        origin = origin or {"trial_process": "worker", "worker_start_time": process_start}
        self.times = dict.fromkeys(TIMELINE_KEYS, NOT_MEASURED)
        self.times.update(process_start_time=process_start, imports_done_time=imports_done,
                          trial_start_time=time.time())
        self.times.update({k: float(origin[k]) for k in ("worker_start_time", "server_start_time") if k in origin})
        self.trial_process = str(origin["trial_process"])
        self.trials_before = trials_before

    def mark(self, key: str) -> None:
        """Record `key` now, the first time only (a resumed or repeated milestone keeps its first time)."""
        if math.isnan(self.times[key]):
            self.times[key] = time.time()

    def report(self, device: torch.device) -> dict[str, Any]:
        self.mark("trial_end_time")
        uuid = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
        return {**self.times, "trial_process": self.trial_process, "process_trials_before": self.trials_before,
                "process_id": os.getpid(), "gpu_uuid": uuid}


def cuda_ready(device: torch.device) -> None:
    """Create the CUDA context now (timed apart from the model build) without allocating through the caching
    allocator, so the allocator's state at the first step is what it was without this call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
