"""One training run of one configuration, measured step by step; the Ray Tune function trainable.

`run_trial(cfg, report)` trains the decoder and calls `report(metrics)` once per step with the
Contract 2 keys (docs/architecture.md). What it guarantees:

* Fair comparison: the same seed gives the same initial weights (built on CPU, then moved) and the
  same data order (the reader's permutation depends on seed and epoch only) for every technique
  and batch size; validation is always the first `eval_batches * eval_batch_size` val rows.
* Cheap measurement: per-phase peaks come from the allocator's host-side counters; step k is
  reported only after step k + 1 has been queued, and its loss is read from a pinned host copy
  queued with the step (never `.item()` on the GPU tensor, which would wait for step k + 1 too),
  so the training loop never synchronises with more than the step it reports and never idles the
  GPU. Only eval and checkpoint steps are reported right away (they synchronise anyway).
* Compilation is not speed: with the `compile` switch (or the flex kernel, always compiled on CUDA)
  the steps during which torch.compile ran are reported with `compiling: True`; every step with
  `warmup: True` (the compiling ones and the first step of the process) is left out of the final
  `steady_tokens_per_s`, and `compile_time_s` sums the step times of the compiling steps.
* MFU: every step reports `mfu` = tokens_per_s x `model_flops_per_token` / `peak_flops` (flops.py;
  NaN when the GPU's peak is unknown and no `peak_flops` is configured, and on CPU).
* Live metrics: inside Ray, a few per-step numbers are also exported as Ray metrics (observe.py).
* OOM is a result: an allocation failure in any phase ends the trial with a final report
  `oom: True, status: "oom", oom_phase` and returns normally; any other exception propagates.
* Resumable: every `checkpoint_interval` steps the full state (model, optimizer, scheduler, data
  position, RNG) is saved together with that step's report; a restarted trial continues at the
  next step and reproduces the uninterrupted run exactly.

Memory keys on CPU are NaN (not measured), see `measure.py`.
"""
from __future__ import annotations

import contextlib
import gc
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .attention import AttentionKernel, select_kernel
from .checkpoint_io import CheckpointIO, TuneCheckpointIO
from .checkpointing import apply_checkpointing
from .compile_policy import CompileWatch, build_forward_loss, release_compiled
from .config import TrialConfig, technique_label
from .errors import ConfigError
from .flops import mfu, model_flops_per_token, peak_bf16_flops
from .losses import LOSSES
from .measure import NOT_MEASURED, gpu_facts, is_oom_error, probes_for, to_host_async
from .model import GPT, ModelConfig
from .observe import RayMetricsExporter
from .precision import PRECISIONS, Precision, tf32_matmuls

Report = Callable[[dict[str, Any]], None]
STATE_FORMAT = 1
# Config keys that may differ between a checkpoint and the run resuming it (they do not change the math).
RESUME_MAY_DIFFER = ("data_dir", "device", "gpu_memory_gb", "checkpoint_interval", "eval_interval", "peak_flops")


# -- set-up helpers -----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """`auto` -> the current CUDA device when there is one, else CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())


@dataclass
class TrialData:
    """The prepared dataset as one trial uses it."""

    train: Any  # data_prep.TokenSplit
    val_rows: torch.Tensor  # (n, seq_len + 1) int64, on the host
    vocab_size: int
    steps_per_epoch: int


def open_trial_data(cfg: TrialConfig) -> TrialData:
    """Open and check the dataset against the config (before any GPU work); ConfigError on problems."""
    from data_prep import DataPrepError, open_dataset

    path = Path(cfg.data_dir)
    if not path.is_dir():
        raise ConfigError(f"data_dir {path} does not exist: prepare one with `python -m data_prep prepare`")
    try:
        dataset = open_dataset(path)
        train, val = dataset.split("train"), dataset.split("val")
    except DataPrepError as exc:
        raise ConfigError(f"data_dir {path}: {exc}") from None
    if cfg.vocab_size is not None and cfg.vocab_size != dataset.vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} does not match the dataset's {dataset.vocab_size} "
                          f"({path}); leave vocab_size unset to use the dataset's")
    if cfg.seq_len > dataset.seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} is longer than the dataset's rows ({dataset.seq_len} tokens, {path}):"
                          f" prepare it with --seq-len {cfg.seq_len} or use seq_len <= {dataset.seq_len}")
    steps_per_epoch = train.num_rows // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch size {cfg.batch_size} is larger than the train split ({train.num_rows} rows, {path})")
    n_val = min(cfg.eval_batches * cfg.eval_batch_size, val.num_rows)
    val_rows = next(val.iter_batches(n_val, seed=0, shuffle=False)) if n_val else np.zeros((0, cfg.seq_len + 1))
    return TrialData(train, torch.from_numpy(val_rows[:, : cfg.seq_len + 1]).long(), dataset.vocab_size,
                     steps_per_epoch)


def total_steps(cfg: TrialConfig, steps_per_epoch: int) -> int:
    """The budget in optimizer steps: the smallest of the limits given (one epoch when none is)."""
    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    if cfg.max_tokens is not None:
        limits.append(math.ceil(cfg.max_tokens / cfg.tokens_per_step))
    if cfg.epochs is not None or not limits:
        limits.append((cfg.epochs or 1) * steps_per_epoch)
    return min(limits)


def lr_multiplier(cfg: TrialConfig, steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to `min_lr_ratio` (or constant); `s` = optimizer steps taken."""
    def multiplier(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


def build_optimizer(model: torch.nn.Module, cfg: TrialConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only (nanoGPT), the fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def model_config(cfg: TrialConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, seq_len=cfg.seq_len, n_layers=cfg.n_layers,
                       d_model=cfg.d_model, n_heads=cfg.n_heads, ff_dim=cfg.ff_dim)


def build_model(cfg: TrialConfig, vocab_size: int, kernel: AttentionKernel) -> GPT:
    """The seeded model with its attention kernel and checkpointing policy (on CPU: same init everywhere)."""
    model_cfg = model_config(cfg, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg, kernel.bind(cfg.window))
    return apply_checkpointing(model, cfg.checkpointing)


@contextlib.contextmanager
def gpu_memory_limit(gb: float | None, device: torch.device) -> Iterator[None]:
    """Cap this process's CUDA allocator at `gb` GiB for the duration (emulates a smaller card)."""
    if gb is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = gb * (1 << 30) / total
    if fraction > 1:
        raise ConfigError(f"gpu_memory_gb {gb} is more than the GPU has ({total / (1 << 30):.1f} GiB)")
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _normalised_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with switches it predates (e.g. `compile`) filled in with their defaults."""
    try:
        return TrialConfig.from_dict(dict(saved)).to_dict()
    except ConfigError:  # written by another version: compare what is there
        return dict(saved)


# -- the run ------------------------------------------------------------------------------------------
@dataclass
class Position:
    """Where training stands; saved in checkpoints. (epoch, batch) is the NEXT batch to train on."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    compile_time_s: float = 0.0  # summed step time of the steps during which torch.compile ran
    steady_tokens: int = 0  # tokens and step time of the steps that are not warm-up
    steady_time_s: float = 0.0


@dataclass
class StepRecord:
    """A queued step whose numbers are read later (device tensors and timing handles)."""

    step: int
    loss: torch.Tensor  # on the host (pinned), valid once `span` has ended
    lr: float
    span: Any
    mem: dict[str, float]
    compiling: bool = False  # torch.compile ran during this step
    warmup: bool = False  # left out of the steady-state throughput


@dataclass
class OOMFailure:
    phase: str
    step: int
    message: str
    mem: dict[str, float] = field(default_factory=dict)


class _Trial:
    def __init__(self, cfg: TrialConfig, data: TrialData, device: torch.device, precision: Precision,
                 kernel: AttentionKernel, report: Report, checkpoint_io: CheckpointIO | None,
                 exporter: RayMetricsExporter | None = None):
        self.cfg, self.data, self.device, self.precision = cfg, data, device, precision
        self.kernel, self._report, self.checkpoint_io = kernel, report, checkpoint_io
        self.exporter = exporter if exporter is not None else RayMetricsExporter()
        self.loss_fn = LOSSES[cfg.loss]
        self.forward_loss = None  # the (possibly compiled) training forward, built in _setup
        self.compile_watch = CompileWatch()
        self.first_step = 1  # the first step this process trains (warm-up even without compilation)
        self.memory, self.timer = probes_for(device)
        self.total_steps = total_steps(cfg, data.steps_per_epoch)
        self.pos = Position()
        self.phase = "setup"
        self.pending: StepRecord | None = None
        self.current_step = 1  # the step being trained or evaluated (the OOM report's step)
        self.step_mem: dict[str, float] = {}
        self.report_time_s = 0.0
        self._time_before, self._started = 0.0, None
        self.model = build_model(cfg, data.vocab_size, kernel)
        self.flops_per_token = model_flops_per_token(model_config(cfg, data.vocab_size), cfg.window)
        self.facts = self._facts()

    def _facts(self) -> dict[str, Any]:
        gpu = gpu_facts(self.device)
        return {
            "technique": technique_label(self.cfg),
            "precision": self.cfg.precision,
            "attention": self.cfg.attention,
            "attention_kernel": self.kernel.name,
            "dtype": str(self.precision.compute_dtype).removeprefix("torch."),
            "tf32": self.precision.tf32_active(self.device.type),
            "checkpointing": self.cfg.checkpointing,
            "loss_fn": self.cfg.loss,
            "compile": self.cfg.compile,
            "batch_size": self.cfg.batch_size,
            "window": self.cfg.window,
            "seq_len": self.cfg.seq_len,
            "num_params": self.model.num_params(),
            "model_flops_per_token": self.flops_per_token,
            "peak_flops": peak_bf16_flops(gpu["gpu_name"], self.cfg.peak_flops),
            "device": self.device.type,
            **gpu,
            "gpu_memory_limit_gb": self.cfg.gpu_memory_gb,
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
        }

    # -- lifecycle --
    def run(self) -> dict[str, Any]:
        with self.compile_watch:
            return self._run()

    def _run(self) -> dict[str, Any]:
        try:
            self._setup()
            return self._train()
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
            if not is_oom_error(exc):
                raise
            failure = OOMFailure(self.phase, self.current_step, str(exc).strip().splitlines()[0][:300],
                                 self._memory_now())
        # Outside the except block the traceback (and the tensors its frames hold) is gone.
        self._flush_pending()
        self._free()
        metrics = self._oom_metrics(failure, self._train_time_s())
        self._emit(metrics)
        return metrics

    def _setup(self) -> None:
        self.phase = "setup"
        self.model.to(self.device)
        if self.kernel.prepare is not None:
            self.kernel.prepare(self.cfg.seq_len, self.cfg.window, self.device)
        self.forward_loss = build_forward_loss(self.model, self.cfg.loss, self.loss_fn, self.cfg.compile)
        self.optimizer = build_optimizer(self.model, self.cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(self.cfg, self.total_steps))
        state = self.checkpoint_io.load() if self.checkpoint_io is not None else None
        if state is not None:
            self._restore(state)

    def _free(self) -> None:
        self.pending = None
        self.model = self.optimizer = self.scheduler = self.forward_loss = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- training loop --
    def _batches(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch index, rows) from the saved position on, epoch after epoch."""
        epoch, start = self.pos.epoch, self.pos.batch
        while True:
            batches = self.data.train.iter_batches(self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,
                                                   start_batch=start)
            for index, rows in enumerate(batches, start=start):
                yield epoch, index, rows
            epoch, start = epoch + 1, 0

    def _to_device(self, rows: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.as_tensor(rows)[:, : self.cfg.seq_len + 1]
        if self.device.type == "cuda":
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]

    def _train_time_s(self) -> float:
        """Training wall time so far (steps, eval, reporting; excludes set-up), across resumes."""
        if self._started is None:
            return self.pos.train_time_s
        return self._time_before + time.perf_counter() - self._started

    def _train(self) -> dict[str, Any]:
        if self.pos.step >= self.total_steps:  # resumed from the final checkpoint: nothing left to do
            return {}
        self.current_step = self.first_step = self.pos.step + 1
        self._time_before, self._started = self.pos.train_time_s, time.perf_counter()
        for epoch, index, rows in self._batches():
            self.phase, self.current_step = "forward", self.pos.step + 1
            inputs, targets = self._to_device(rows)
            record = self._train_step(self.pos.step + 1, inputs, targets)
            self._advance(epoch, index)
            self._flush_pending()  # step k - 1, now that step k is queued
            step = record.step
            is_last = step == self.total_steps
            eval_due = is_last or (self.cfg.eval_interval > 0 and step % self.cfg.eval_interval == 0)
            checkpoint_due = (self.checkpoint_io is not None and self.cfg.checkpoint_interval > 0
                              and step % self.cfg.checkpoint_interval == 0)
            if not (eval_due or checkpoint_due):
                self.pending = record
                continue
            metrics = self._step_metrics(record)
            if eval_due:
                metrics.update(self._evaluate())
            self.pos.train_time_s = self._train_time_s()
            if is_last:
                metrics.update(final=True, status="ok", train_time_s=self.pos.train_time_s,
                               report_time_s=self.report_time_s, **self._steady_metrics())
            if checkpoint_due:
                self._emit(metrics, state=self._state())
            else:
                self._emit(metrics)
            if is_last:
                return metrics
        raise AssertionError("unreachable: the batch stream is endless")

    def _advance(self, epoch: int, index: int) -> None:
        pos = self.pos
        pos.step += 1
        pos.tokens_seen += self.cfg.tokens_per_step
        pos.epoch, pos.batch = (epoch, index + 1) if index + 1 < self.data.steps_per_epoch else (epoch + 1, 0)
        pos.train_time_s = self._train_time_s()

    def _train_step(self, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> StepRecord:
        """Queue one optimizer step; nothing here waits for the GPU."""
        memory, model, optimizer = self.memory, self.model, self.optimizer
        self.step_mem = {}
        compile_events = self.compile_watch.events
        started = self.timer.start()

        self.phase = "forward"
        memory.reset_peak()
        with self.precision.autocast(self.device.type):
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
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
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
        return StepRecord(step, loss, lr, span, mem, compiling=compiling,
                          warmup=compiling or step == self.first_step)

    def _step_metrics(self, record: StepRecord) -> dict[str, Any]:
        """The report of a queued step; reading the timer waits for that step only (and makes its loss valid)."""
        seconds = self.timer.seconds(record.span)
        tokens = self.cfg.tokens_per_step
        tokens_per_s = tokens / seconds if seconds > 0 else math.inf
        if record.compiling:
            self.pos.compile_time_s += seconds
        if not record.warmup:
            self.pos.steady_tokens += tokens
            self.pos.steady_time_s += seconds
        return {
            "step": record.step,
            "loss": record.loss.item(),
            "lr": record.lr,
            "tokens_seen": record.step * tokens,
            "step_time_s": seconds,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.facts["peak_flops"]),
            **record.mem,
            "oom": False,
            "compiling": record.compiling,
            "warmup": record.warmup,
            "compile_time_s": self.pos.compile_time_s,
            **self.facts,
        }

    def _steady_metrics(self) -> dict[str, float]:
        """Throughput over the steps that are not warm-up (NaN when every step was warm-up)."""
        pos = self.pos
        steady = pos.steady_tokens / pos.steady_time_s if pos.steady_time_s > 0 else math.nan
        return {"steady_tokens_per_s": steady,
                "steady_mfu": mfu(steady, self.flops_per_token, self.facts["peak_flops"]),
                "compile_time_s": pos.compile_time_s}

    def _flush_pending(self) -> None:
        if self.pending is not None:
            record, self.pending = self.pending, None
            self._emit(self._step_metrics(record))

    def _emit(self, metrics: dict[str, Any], state: dict | None = None) -> None:
        """Report (with a checkpoint when `state` is given), timing what reporting costs."""
        t0 = time.perf_counter()
        if state is None:
            self._report(metrics)
        else:
            self.checkpoint_io.report_with_checkpoint(metrics, state, self._report)
        self.exporter.record(metrics)
        self.report_time_s += time.perf_counter() - t0

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Mean token loss over the fixed validation rows, in chunks of eval_batch_size."""
        self.phase = "eval"
        rows = self.data.val_rows
        if len(rows) == 0:
            return {"val_loss": NOT_MEASURED, "val_ppl": NOT_MEASURED}
        self.model.eval()  # the uncompiled model: evaluation never compiles a second graph
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for chunk in rows.split(self.cfg.eval_batch_size):
            inputs, targets = self._to_device(chunk)
            with self.precision.autocast(self.device.type):
                hidden = self.model(inputs)
                loss = self.loss_fn(hidden, self.model.output_weight, targets)
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
            "rng": _rng_state(self.device),
            "report_time_s": self.report_time_s,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        saved, current = _normalised_config(state["config"]), self.cfg.to_dict()
        differs = [k for k in current if k not in RESUME_MAY_DIFFER and saved.get(k) != current[k]]
        if differs:
            raise ConfigError(f"the checkpoint to resume was written by a different configuration "
                              f"(differs in: {', '.join(differs)})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.device)
        self.pos = Position(**state["position"])
        self.report_time_s = state.get("report_time_s", 0.0)

    # -- OOM --
    def _memory_now(self) -> dict[str, float]:
        return {"oom_mem_peak_mib": self.memory.peak_mib(), "mem_allocated_mib": self.memory.allocated_mib(),
                "mem_reserved_mib": self.memory.reserved_mib()}

    def _oom_metrics(self, failure: OOMFailure, train_time_s: float) -> dict[str, Any]:
        nan = math.nan
        mem = {k: self.step_mem.get(k, nan) for k in
               ("mem_fwd_peak_mib", "mem_bwd_peak_mib", "mem_opt_peak_mib")}
        if failure.phase in ("forward", "backward"):
            mem[f"mem_{'fwd' if failure.phase == 'forward' else 'bwd'}_peak_mib"] = failure.mem["oom_mem_peak_mib"]
        known = [v for v in (*mem.values(), failure.mem["oom_mem_peak_mib"]) if not math.isnan(v)]
        return {
            "step": failure.step,
            "loss": nan,
            "lr": nan,
            "tokens_seen": self.pos.tokens_seen,
            "step_time_s": nan,
            "tokens_per_s": nan,
            **mem,
            "mem_step_peak_mib": max(known) if known else nan,
            **failure.mem,
            "val_loss": nan,
            "val_ppl": nan,
            **self.facts,
            "mfu": nan,
            "compiling": False,
            "warmup": False,
            **self._steady_metrics(),
            "oom": True,
            "oom_phase": failure.phase,
            "oom_message": failure.message,
            "final": True,
            "status": "oom",
            "train_time_s": train_time_s,
            "report_time_s": self.report_time_s,
        }


def run_trial(cfg: TrialConfig, report: Report, *, checkpoint_io: CheckpointIO | None = None,
              exporter: RayMetricsExporter | None = None) -> dict[str, Any]:
    """Train `cfg`, calling `report(metrics)` every step; returns the final report.

    Raises ConfigError (one line) for a configuration this machine or dataset cannot run, before
    any GPU work. Returns normally on OOM (final report has `oom: True`). `exporter` (default: a
    `RayMetricsExporter`, active only inside Ray) also receives every report.
    """
    device = resolve_device(cfg.device)
    data = open_trial_data(cfg)
    precision = PRECISIONS[cfg.precision]
    kernel = select_kernel(cfg.attention, cfg.precision, device.type, cfg.kernel)
    try:
        with tf32_matmuls(precision.tf32_active(device.type)), gpu_memory_limit(cfg.gpu_memory_gb, device):
            return _Trial(cfg, data, device, precision, kernel, report, checkpoint_io, exporter).run()
    finally:
        if cfg.compile:
            release_compiled()
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def tune_trainable(config: dict) -> None:
    """Ray Tune function trainable: one trial per config dict (see TrialConfig for the keys)."""
    import logging

    from ray import tune

    # One INFO line per checkpoint would flood the driver's console; the results keep every checkpoint's path.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = TrialConfig.from_dict(config)
    run_trial(cfg, tune.report, checkpoint_io=TuneCheckpointIO())
