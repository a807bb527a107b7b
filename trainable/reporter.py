"""Reports and checkpoints handed off the training loop: one background thread delivers them, in order.

Tune's `tune.report` blocks until the trial's driver side has taken the result, and a checkpoint costs a
serialisation, a write and a copy into the trial's storage (0.4 s a save on the seed model). Done on the
training loop, that time is GPU time lost. Here the loop only queues: a report is a dict; a checkpoint is
a *snapshot*, the state's tensors copied to host memory by copies queued on the GPU's stream behind the
step (so they read the state of that step while the next steps run), plus a CUDA event that says when the
copies are done. The reporter thread waits for the event, writes and reports the checkpoint together with
its step's report, then delivers the reports queued behind it. Order is kept, so a checkpoint still
belongs to the report of its step.

Host buffers for the snapshot are pinned and reused (allocating pinned memory costs more than the copy),
so a snapshot waits for the previous one only if that one is still being written (one in flight at most).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import torch

Report = Callable[[dict[str, Any]], None]
_STOP = object()


class Snapshot:
    """A state whose tensors are host copies that become valid once `ready` has passed."""

    def __init__(self, state: dict, ready: torch.cuda.Event | None):
        self.state, self.ready = state, ready

    def wait(self) -> dict:
        if self.ready is not None:
            self.ready.synchronize()
        return self.state


class Snapshotter:
    """Copies a state tree to host without waiting for the GPU, into reused pinned buffers on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self._free = threading.Event()
        self._free.set()

    def take(self, state: dict) -> Snapshot:
        """The snapshot of `state` (tensors copied asynchronously; everything else as it is). One snapshot is
        in flight at a time: a checkpoint due while the previous one is still being written waits for it (on
        CPU too, where each snapshot is a clone: they would otherwise pile up in host memory)."""
        self._free.wait()  # the previous snapshot is still being written
        self._free.clear()
        if self.device.type != "cuda":
            return Snapshot(self._copy(state, "", lambda t, _: t.detach().clone()), None)
        copied = self._copy(state, "", self._to_pinned)
        event = torch.cuda.Event()
        event.record()
        return Snapshot(copied, event)

    def release(self) -> None:
        """The last snapshot is written: its buffers may be reused."""
        self._free.set()

    def _to_pinned(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        if tensor.device.type != "cuda":
            return tensor.detach().clone()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return buffer.copy_(tensor.detach(), non_blocking=True)

    def _copy(self, value: Any, key: str, copy: Callable[[torch.Tensor, str], torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            return copy(value, key)
        if isinstance(value, dict):
            return {k: self._copy(v, f"{key}/{k}", copy) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._copy(v, f"{key}/{i}", copy) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return value


class AsyncReporter:
    """Delivers reports and checkpoints on one background thread, in the order they were submitted.

    `report(metrics)` is the sink (Tune's `tune.report`); `checkpoint_io.report_with_checkpoint` writes a
    checkpoint and reports its step. A failure on the thread (a full disk, Tune stopping the trial) is
    re-raised in the training loop at its next submit, or at `close`.
    """

    def __init__(self, report: Report, checkpoint_io=None, snapshotter: Snapshotter | None = None,
                 on_report: Callable[[dict[str, Any]], None] | None = None, max_pending: int = 256,
                 background: bool = True):
        self._report, self._checkpoint_io, self._snapshotter = report, checkpoint_io, snapshotter
        self._on_report = on_report
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.report_time_s = 0.0  # on the thread: handing reports (and checkpoints) to the sink
        self.checkpoints_written = 0
        self._thread = None
        if background:  # else every report is delivered inline (a profiler stepping on each report)
            self._thread = threading.Thread(target=self._run, name="trial-reporter", daemon=True)
            self._thread.start()

    def submit(self, metrics: dict[str, Any], snapshot: Snapshot | None = None) -> None:
        self._raise_if_failed()
        if self._thread is None:
            self._deliver(metrics, snapshot)
            self._raise_if_failed()
            return
        self._queue.put((metrics, snapshot))

    def close(self) -> None:
        """Wait until everything submitted is delivered; re-raise a failure of the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._deliver(*item)

    def _deliver(self, metrics: dict[str, Any], snapshot: Snapshot | None) -> None:
        if self._error is not None:  # after a failure nothing more is reported: the loop re-raises it
            if snapshot is not None and self._snapshotter is not None:
                self._snapshotter.release()
            return
        t0 = time.perf_counter()
        try:
            if snapshot is None:
                self._report(metrics)
            else:
                state = snapshot.wait()
                try:
                    self._checkpoint_io.report_with_checkpoint(metrics, state, self._report)
                finally:
                    if self._snapshotter is not None:
                        self._snapshotter.release()
                self.checkpoints_written += 1
            if self._on_report is not None:
                self._on_report(metrics)
        except BaseException as exc:  # noqa: BLE001 - handed to the training loop
            self._error = exc
        self.report_time_s += time.perf_counter() - t0
