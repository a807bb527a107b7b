"""One training run of one configuration, measured step by step; the Ray Tune function trainable.

`run_trial(cfg, report)` trains the decoder and calls `report(metrics)` once per step with the keys of
`contract.keys`. What it guarantees:

* Fair comparison: the same seed gives the same initial weights (built on CPU, then moved) and the
  same data order (the reader's permutation depends on seed and epoch only) for every technique
  and batch size; validation is always the first `eval_batches * eval_batch_size` val rows.
* Measurement never idles the GPU: per-phase peaks come from the allocator's host-side counters;
  step k is read only after step k + 1 has been queued, its loss from a pinned host copy queued with
  the step, so the loop waits for nothing but step k's own stop event. Reports and checkpoints are
  handed to a background thread (`reporter.py`): a checkpoint is a host snapshot queued behind the
  step, written and registered while training goes on.
* Two speeds: `tokens_per_s` is GPU time (CUDA events around the step); `wall_tokens_per_s` (final)
  is what the user's clock saw over the same steady steps, reporting, evaluation and checkpoints included.
* Compilation is not speed: the steps during which torch.compile ran are reported `compiling: True`;
  every `warmup: True` step (those and the first step of a process) is left out of the steady figures.
* OOM is a result: an allocation failure in any phase ends the trial with a final report `oom: True,
  status: "oom"`; a loss that goes NaN or infinite ends it with `status: "nan"`; both return normally.
  Any other exception propagates.
* Resumable: every `checkpoint_interval` steps or `checkpoint_minutes` minutes the full state (model,
  optimizer, scheduler, data position, RNG) is saved with that step's report; a restarted trial
  continues at the next step and reproduces the uninterrupted run exactly.
* Reusable: a process may run trial after trial (Tune's reuse_actors); each one after the first starts from
  `setup.reset_process`, what a fresh process has. The final report says where the start went (`Timeline`).
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from contract.io import first_line

from .breakdown_probe import BreakdownProbe
from .checkpoint_io import CheckpointIO, TuneCheckpointIO, check_resumable
from .compile_policy import CompileWatch, build_forward_loss, release_compiled
from .config import TrialConfig
from .losses import LOSSES, loss_for
from .fork_server import process_start_time
from .measure import NOT_MEASURED, Timeline, is_oom_error, probes_for, to_host_async
from .observe import RayMetricsExporter
from .precision import tf32_matmuls
from .reporter import AsyncReporter, Snapshotter
from .reports import Position, oom_report, run_facts, step_report, totals
from .setup import (Run, build_optimizer, build_run, gpu_memory_limit, lr_multiplier, prepare_process, rng_state,
                    set_rng_state)

Report = Callable[[dict[str, Any]], None]
# This process: when it had imported torch and the training code, and how many trials it has run (a Tune
# actor reused for the next trial, a max-batch scout's sub-probes: see `setup.reset_process`).
_PROCESS = {"imported": time.time(), "trials": 0}
STATE_FORMAT = 2


@dataclass
class StepRecord:
    """A queued step whose numbers are read later (host copies valid once `span` has ended)."""

    step: int
    loss: torch.Tensor
    lr: float
    span: Any
    mem: dict[str, float]
    compiling: bool = False
    warmup: bool = False


class _OOM(Exception):
    def __init__(self, phase: str, step: int, message: str):
        super().__init__(message)
        self.phase, self.step, self.message = phase, step, message


class _Trial:
    def __init__(self, run: Run, reporter: AsyncReporter, snapshotter: Snapshotter,
                 checkpoint_io: CheckpointIO | None, started: float, timeline: Timeline):
        self.run, self.cfg, self.device, self.timeline = run, run.cfg, run.device, timeline
        self.reporter, self.snapshotter, self.checkpoint_io, self.started = reporter, snapshotter, checkpoint_io, started
        self.loss_fn = loss_for(self.cfg.loss, self.cfg.loss_precision)  # what training minimises
        self.eval_loss_fn = LOSSES[self.cfg.loss]  # validation the same way for every switch (fp32 softmax)
        # flex compiles its own kernel on CUDA; nothing else compiles unless the compile switch is on
        self.compile_watch = CompileWatch(active=self.cfg.compile or (run.kernel.name == "flex" and run.device.type == "cuda"))
        self.memory, self.timer = probes_for(self.device)
        self.pos = Position()
        self.phase, self.current_step, self.first_step = "setup", 1, 1
        self.pending: StepRecord | None = None
        self.step_mem: dict[str, float] = {}
        self.setup_time_s = 0.0
        self._time_before, self._clock = 0.0, None
        self._wall_mark: Any = None  # the span of the last step read (wall time is measured between spans)
        self._last_checkpoint = time.monotonic()
        self.model = run.build_model()
        self.facts = run_facts(run, self.model.num_params())
        self.breakdown = BreakdownProbe(self.cfg, run.data.vocab_size, run.kernel.name, self.device)

    # -- lifecycle --
    def train(self) -> dict[str, Any]:
        with self.compile_watch:
            try:
                self._setup()
                return self._loop()
            except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
                if not is_oom_error(exc):
                    raise
                failure = _OOM(self.phase, self.current_step, first_line(exc))
                memory_now = self._memory_now()
        # Outside the except block the traceback (and the tensors its frames hold) is gone.
        self._flush_pending()
        self._free()
        metrics = oom_report(failure.step, failure.phase, failure.message, self.pos, self.facts, self.step_mem,
                             memory_now, self.reporter.report_time_s, self.setup_time_s)
        metrics.update(self.timeline.report(self.device))
        metrics.update(self.breakdown.report())
        self.reporter.submit(metrics)
        return metrics

    def _setup(self) -> None:
        self.phase = "setup"
        self.model.to(self.device)
        if self.run.kernel.prepare is not None:
            self.run.kernel.prepare(self.cfg.seq_len, self.cfg.window, self.device)
        self.forward_loss = build_forward_loss(self.model, self.cfg.loss, self.loss_fn, self.cfg.compile)
        self.optimizer = build_optimizer(self.model, self.cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_multiplier(self.cfg, self.run.total_steps))
        state = self.checkpoint_io.load() if self.checkpoint_io is not None else None
        if state is not None:
            self._restore(state)
        self.timeline.mark("model_ready_time")

    def _free(self) -> None:
        self.pending = None
        self.model = self.optimizer = self.scheduler = self.forward_loss = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- training loop --
    def _loop(self) -> dict[str, Any]:
        if self.pos.step >= self.run.total_steps:  # resumed from the final checkpoint: nothing left to do
            return {}
        self.current_step = self.first_step = self.pos.step + 1
        self._time_before, self._clock = self.pos.train_time_s, time.perf_counter()
        self.setup_time_s = self._clock - self.started
        self.timeline.mark("first_step_start_time")
        for epoch, index, rows in self.run.batches(self.pos.epoch, self.pos.batch):
            self.phase, self.current_step = "forward", self.pos.step + 1
            inputs, targets = self._to_device(rows)
            record = self.breakdown.step(self._train_step, self.pos.step + 1, self.first_step, inputs, targets,
                                         self.model, self.optimizer)  # recorded once: where the memory goes
            self._advance(epoch, index)
            final = self._flush_pending()  # step k - 1, now that step k is queued
            if final is not None:
                return final
            final = self._after_step(record)
            if final is not None:
                return final
        raise AssertionError("unreachable: the batch stream is endless")

    def _after_step(self, record: StepRecord) -> dict[str, Any] | None:
        """Report `record` now when it evaluates, checkpoints or ends the run; else leave it pending."""
        step, cfg = record.step, self.cfg
        is_last = step == self.run.total_steps
        eval_due = is_last or (cfg.eval_interval > 0 and step % cfg.eval_interval == 0)
        checkpoint_due = self._checkpoint_due(step)
        if not (eval_due or checkpoint_due):
            self.pending = record
            return None
        metrics = self._step_metrics(record)
        if metrics.get("status") == "nan":
            return self._finish(metrics)
        if eval_due:
            metrics.update(self._evaluate())
        self.pos.train_time_s = self._train_time_s()
        if is_last:
            metrics = {**metrics, **self._totals(), "final": True, "status": "ok"}
        if checkpoint_due:
            t0 = time.perf_counter()
            snapshot = self.snapshotter.take(self._state())
            self.pos.checkpoint_time_s += time.perf_counter() - t0
            self._last_checkpoint = time.monotonic()
            self.reporter.submit(metrics, snapshot)
        else:
            self.reporter.submit(metrics)
        return metrics if is_last else None

    def _checkpoint_due(self, step: int) -> bool:
        cfg = self.cfg
        if self.checkpoint_io is None:
            return False
        by_steps = cfg.checkpoint_interval > 0 and step % cfg.checkpoint_interval == 0
        by_time = cfg.checkpoint_minutes > 0 and time.monotonic() - self._last_checkpoint >= 60 * cfg.checkpoint_minutes
        return by_steps or by_time

    def _to_device(self, rows: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.as_tensor(rows)[:, : self.cfg.seq_len + 1]
        if self.device.type == "cuda":
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]

    def _train_time_s(self) -> float:
        """Training wall time so far (steps, eval, reporting; excludes set-up), across resumes."""
        if self._clock is None:
            return self.pos.train_time_s
        return self._time_before + time.perf_counter() - self._clock

    def _advance(self, epoch: int, index: int) -> None:
        pos = self.pos
        pos.step += 1
        pos.tokens_seen += self.cfg.tokens_per_step
        pos.epoch, pos.batch = (epoch, index + 1) if index + 1 < self.run.data.steps_per_epoch else (epoch + 1, 0)
        pos.train_time_s = self._train_time_s()

    def _train_step(self, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> StepRecord:
        """Queue one optimizer step; nothing here waits for the GPU."""
        memory, optimizer = self.memory, self.optimizer
        self.step_mem = {}
        compile_events = self.compile_watch.events
        started = self.timer.start()

        self.phase = "forward"
        memory.reset_peak()
        with self.run.precision.autocast(self.device.type):
            loss = self.forward_loss(inputs, targets)
        self.step_mem["mem_fwd_peak_mib"] = memory.peak_mib()

        self.phase = "backward"
        memory.reset_peak()
        loss.backward()
        self.step_mem["mem_bwd_peak_mib"] = memory.peak_mib()

        self.phase = "optimizer"
        memory.reset_peak()
        lr = optimizer.param_groups[0]["lr"]
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_mem["mem_opt_peak_mib"] = memory.peak_mib()

        loss = to_host_async(loss)  # queued before the stop event, so valid once the step time is read
        span = self.timer.stop(started)
        mem = dict(self.step_mem)
        peaks = list(mem.values())
        mem["mem_step_peak_mib"] = NOT_MEASURED if any(map(math.isnan, peaks)) else max(peaks)
        mem["mem_allocated_mib"] = memory.allocated_mib()
        mem["mem_reserved_mib"] = memory.reserved_mib()
        if self.compile_watch.available:
            compiling = self.compile_watch.events > compile_events
        else:  # no compilation callbacks in this torch: assume compile work happens in the first step
            compiling = self.cfg.compile and step == self.first_step
        return StepRecord(step, loss, lr, span, mem, compiling=compiling, warmup=compiling or step == self.first_step)

    def _step_metrics(self, record: StepRecord) -> dict[str, Any]:
        """The report of a queued step; reading the timer waits for that step only (and makes its loss valid)."""
        seconds = self.timer.seconds(record.span)
        if record.step == self.first_step:
            self.timeline.mark("first_step_end_time")
        tokens, pos = self.cfg.tokens_per_step, self.pos
        if record.compiling:
            pos.compile_time_s += seconds
        if not record.warmup:
            pos.steady_tokens += tokens
            pos.steady_time_s += seconds
            if self._wall_mark is not None:  # the previous step's span: wall time on the GPU's clock
                pos.steady_wall_s += self.timer.between(self._wall_mark, record.span)
                pos.steady_wall_tokens += tokens
        self._wall_mark = record.span
        loss = record.loss.item()
        metrics = step_report(record.step, loss, record.lr, seconds, tokens, record.mem, record.compiling,
                              record.warmup, pos, self.facts)
        if not math.isfinite(loss):
            pos.train_time_s = self._train_time_s()
            metrics.update(self._totals(), final=True, status="nan")
        return metrics

    def _totals(self) -> dict[str, Any]:
        """The final report's totals and the start-up timeline."""
        return {**totals(self.pos, self.facts, self.reporter.report_time_s, self.setup_time_s),
                **self.timeline.report(self.device), **self.breakdown.report()}

    def _flush_pending(self) -> dict[str, Any] | None:
        """Report the pending step; returns its metrics when they end the run (a non-finite loss)."""
        if self.pending is None:
            return None
        record, self.pending = self.pending, None
        metrics = self._step_metrics(record)
        if metrics.get("status") == "nan":
            return self._finish(metrics)
        self.reporter.submit(metrics)
        return None

    def _finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        self.pending = None
        self.reporter.submit(metrics)
        return metrics

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Mean token loss over the fixed validation rows, in chunks of eval_batch_size."""
        self.phase = "eval"
        rows = self.run.data.val_rows
        if len(rows) == 0:
            return {"val_loss": NOT_MEASURED, "val_ppl": NOT_MEASURED}
        self.model.eval()  # the uncompiled model: evaluation never compiles a second graph
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for chunk in rows.split(self.cfg.eval_batch_size):
            inputs, targets = self._to_device(chunk)
            with self.run.precision.autocast(self.device.type):
                loss = self.eval_loss_fn(self.model(inputs), self.model.output_weight, targets)
            total += loss.double() * targets.numel()
        self.model.train()
        val_loss = (total / (rows.size(0) * self.cfg.seq_len)).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss < 700 else math.inf}

    # -- checkpoints --
    def _state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": self.cfg.to_dict(),
            "position": asdict(self.pos),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.device),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        check_resumable(state["config"], self.cfg)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.device)
        known = Position.__dataclass_fields__
        self.pos = Position(**{k: v for k, v in state["position"].items() if k in known})

    # -- OOM --
    def _memory_now(self) -> dict[str, float]:
        return {"oom_mem_peak_mib": self.memory.peak_mib(), "mem_allocated_mib": self.memory.allocated_mib(),
                "mem_reserved_mib": self.memory.reserved_mib()}


def run_trial(cfg: TrialConfig, report: Report, *, checkpoint_io: CheckpointIO | None = None,
              exporter: RayMetricsExporter | None = None, background_reports: bool = True,
              origin: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `cfg`, calling `report(metrics)` every step (from a background thread, in order); returns the
    final report once every report has been delivered.

    Raises ConfigError (one line) for a configuration this machine or dataset cannot run, before any GPU
    work. Returns normally on OOM (`status: "oom"`) and on a non-finite loss (`status: "nan"`). `exporter`
    (default: a `RayMetricsExporter`, active only inside Ray) also receives every report.
    `background_reports=False` delivers each report on the training loop (a profiler stepping on reports).
    `origin`: how this process was started, when `fork_server` forked it (see `measure.Timeline`).
    """
    started = time.perf_counter()
    timeline = Timeline(_PROCESS["imported"], _PROCESS["trials"], process_start_time(), origin)  # a fork's own start
    reused, _PROCESS["trials"] = _PROCESS["trials"] > 0, _PROCESS["trials"] + 1
    run = build_run(cfg)
    prepare_process(run, reused, timeline)
    exporter = exporter if exporter is not None else RayMetricsExporter(cfg.label, cfg.batch_size)
    snapshotter = Snapshotter(run.device)
    reporter = AsyncReporter(report, checkpoint_io, snapshotter, on_report=exporter.record,
                             background=background_reports)
    final: dict[str, Any] = {}
    try:
        with tf32_matmuls(run.precision.tf32_active(run.device.type)), \
                gpu_memory_limit(cfg.gpu_memory_gb, run.device):
            final = _Trial(run, reporter, snapshotter, checkpoint_io, started, timeline).train()
    except BaseException:
        try:
            reporter.close()  # deliver what was measured before the failure
        except BaseException:  # noqa: BLE001 - the original failure is the one to raise
            pass
        raise
    finally:
        if origin is None:  # this process goes on (a forked one exits: nothing to tidy for a next trial)
            if cfg.compile:
                release_compiled()
            if run.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
    reporter.close()
    return final


def tune_trainable(config: dict) -> None:
    """Ray Tune function trainable: one trial per config dict (see TrialConfig for the keys)."""
    import logging

    from ray import tune

    # One INFO line per checkpoint would flood the driver's console; the results keep every checkpoint's path.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = TrialConfig.from_dict(config)
    run_trial(cfg, tune.report, checkpoint_io=TuneCheckpointIO())
