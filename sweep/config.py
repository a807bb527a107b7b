"""What one `python -m sweep.run` does: a plain dataclass, validated once, from which the CLI is generated.

The sweep's own settings live here; every trial knob (model size, budget, optimiser, ...) is a
`TrialConfig` field and reaches the trials through `overrides`, so the sweep never re-declares one.
`validate()` checks everything a flag alone can get wrong, with no I/O beyond looking at paths, so a bad
flag fails in milliseconds, before Ray, data or torch. Checks that need the grid, the data or the
cluster are in `plan.py`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from contract.io import is_uri

from .errors import SweepError

PRESET_NAMES = ("seed", "seed-report", "cpu")
TRIAL_PROCESSES = ("fork", "worker")
VERBOSITY = {0: "errors and the final table only", 1: "one line per trial start, finish, OOM, NaN or error (default)",
             2: "Ray Tune's own progress tables"}
MAX_NAME_BYTES = 255  # one path component on every common filesystem


def _m(help: str, **meta: Any) -> dict[str, Any]:
    return {"help": help, **meta}


@dataclass
class SweepConfig:
    """Everything one sweep does. Trial knobs go in `overrides` (TrialConfig fields)."""

    # grid
    preset: str | None = field(default=None, metadata=_m(
        "a named grid: seed (the seed's 18 trials), seed-report (the seed report's 4-layer GPT-2-vocabulary model), "
        "cpu (a tiny CPU grid)", choices=PRESET_NAMES, default_help="seed with GPUs, else cpu"))
    techniques: tuple[str, ...] | None = field(default=None, metadata=_m(
        "technique presets (baseline bf16 flash window gradcp ...)", metavar="T", default_help="the preset's"))
    batch_sizes: tuple[int, ...] | None = field(default=None, metadata=_m("batch sizes", metavar="N",
                                                                          default_help="the preset's"))
    windows: tuple[int, ...] | None = field(default=None, metadata=_m("window sizes of windowed techniques",
                                                                      metavar="W", default_help="16 32"))
    seq_lens: tuple[int, ...] | None = field(default=None, metadata=_m("sequence lengths (a grid axis)", metavar="T",
                                                                       default_help="the preset's seq_len"))
    tokens_per_batch: int | None = field(default=None, metadata=_m(
        "with --seq-lens: batch size = this / seq_len, so every point trains the same tokens per step",
        metavar="N"))
    only: tuple[str, ...] = field(default=(), metadata=_m("keep trials whose name contains S", metavar="S"))
    skip: tuple[str, ...] = field(default=(), metadata=_m("drop trials whose name contains S", metavar="S"))
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"no_cli": True})  # TrialConfig fields
    # data and hardware
    data_dir: str | None = field(default=None, metadata=_m("a prepared dataset", flag="--data", metavar="DIR",
                                                           default_help="the shipped sample, prepared once"))
    device: str = field(default="auto", metadata=_m("where trials run", choices=("auto", "cuda", "cpu")))
    gpu_memory_gb: float | None = field(default=None, metadata=_m(
        "cap each trial's CUDA allocator at GB GiB (emulate a smaller GPU)", metavar="GB"))
    gpu: str | None = field(default=None, metadata=_m(
        "the GPU the memory model predicts for (h200, h100, a100-80gb, a100-40gb, rtx4090, rtx5090)",
        metavar="NAME", default_help="this node's GPU, else h200"))
    gpu_total_gb: float | None = field(default=None, metadata=_m("the predicted-for GPU's total memory (GiB)",
                                                                 metavar="GB"))
    vocab_size: int | None = field(default=None, metadata=_m("with --predict and no --data: the vocabulary",
                                                             metavar="V", default_help="10000"))
    # ray
    address: str | None = field(default=None, metadata=_m("join this Ray cluster (auto, host:port, ray://...)",
                                                          default_help="RAY_ADDRESS, else a local instance"))
    storage_path: str = field(default="results", metadata=_m("local dir, NFS or s3://... for the results"))
    shared_storage: bool = field(default=False, metadata=_m(
        "the local --storage-path is mounted by every node (NFS); required for a local path on a multi-node cluster"))
    name: str | None = field(default=None, metadata=_m("experiment name (one path component)",
                                                       default_help="<grid>-<timestamp>"))
    max_concurrent: int | None = field(default=None, metadata=_m("trials at once", default_help="one per GPU"))
    cpus_per_trial: int | None = field(default=None, metadata=_m("CPUs each trial reserves",
                                                                 default_help="the node's CPUs / GPUs, at most 8"))
    resume: bool = field(default=False, metadata=_m("continue an interrupted sweep (--name, else the latest)"))
    trial_process: str = field(default="fork", metadata=_m(
        "where a trial trains: fork (a fresh process forked from a warm server in its Tune worker: a fresh CUDA "
        "context and allocator in under a second), worker (in the Tune worker itself)", choices=TRIAL_PROCESSES))
    reuse_actors: bool | None = field(default=None, metadata=_m(
        "keep a slot's Tune worker for its next trial (with --trial-process worker: the trial trains in it, reset to "
        "a fresh process's state); --no-reuse-actors: a new worker each",
        default_help="on, but off on --resume and, with --trial-process worker, when a trial compiles "
                     "(torch.compile, or FlexAttention on a GPU: reused workers crashed after them on an H200)"))
    verbose: int = field(default=1, metadata=_m(
        "; ".join(f"{k}: {v}" for k, v in VERBOSITY.items()), choices=tuple(VERBOSITY)))
    # fault tolerance
    checkpoint_interval: int | None = field(default=None, metadata=_m(
        "steps between trial checkpoints (0: off)", metavar="N", default_help="by time: --checkpoint-minutes"))
    checkpoint_minutes: float | None = field(default=None, metadata=_m(
        "minutes between trial checkpoints, taken in the background (0: off)", metavar="MIN", default_help="5"))
    max_failures: int | None = field(default=None, metadata=_m(
        "restarts of a failed trial, each from its latest checkpoint", metavar="N", default_help="2"))
    # max-batch search
    find_max_batch: bool = field(default=False, metadata=_m("search the largest batch size per technique"))
    granularity: int = field(default=1, metadata=_m("the answer is a multiple of this"))
    start: int | None = field(default=None, metadata=_m("first batch size of an unseeded search",
                                                        default_help="32 on GPU, 1 on CPU"))
    max_batch: int | None = field(default=None, metadata=_m("upper bound of the search", flag="--max",
                                                            default_help="the dataset's training rows"))
    probe_steps: int = field(default=3, metadata=_m("training steps each probe runs"))
    seed_search: bool = field(default=True, metadata=_m(
        "start each search at the memory model's predicted max batch (--no-seed-search: grow from --start)"))

    @property
    def grid_given(self) -> bool:
        return any(x is not None for x in (self.techniques, self.batch_sizes, self.windows, self.seq_lens))

    def validate(self) -> "SweepConfig":
        """Every check a flag alone can fail (SweepError, one line); no Ray, no data, no torch."""
        self._validate_choices()
        positive = {"--max-concurrent": self.max_concurrent, "--cpus-per-trial": self.cpus_per_trial,
                    "--granularity": self.granularity, "--start": self.start, "--max": self.max_batch,
                    "--probe-steps": self.probe_steps, "--tokens-per-batch": self.tokens_per_batch}
        for flag, value in positive.items():
            if value is not None and value < 1:
                raise SweepError(f"{flag} must be >= 1, got {value}")
        for flag, values in (("--batch-sizes", self.batch_sizes), ("--windows", self.windows),
                             ("--seq-lens", self.seq_lens)):
            for value in values or ():
                if value < 1:
                    raise SweepError(f"{flag.removeprefix('--').replace('-', ' ').rstrip('s')} must be a "
                                     f"positive integer, got {value}")
        for flag, value in (("--gpu-memory-gb", self.gpu_memory_gb), ("--gpu-total-gb", self.gpu_total_gb)):
            if value is not None and not math.isfinite(value):
                raise SweepError(f"{flag} must be a finite number of GiB, got {value}")
            if value is not None and not value > 0:
                raise SweepError(f"{flag} must be positive, got {value}")
        for flag, value in (("--checkpoint-interval", self.checkpoint_interval), ("--max-failures", self.max_failures),
                            ("--checkpoint-minutes", self.checkpoint_minutes)):
            if value is not None and not math.isfinite(value):
                raise SweepError(f"{flag} must be a finite number (0: off), got {value}")
            if value is not None and not value >= 0:
                raise SweepError(f"{flag} must be >= 0 (0: off), got {value}")
            if value is not None and self.find_max_batch:
                raise SweepError(f"{flag} is for sweeps: max-batch probes never checkpoint and are never retried")
        if self.tokens_per_batch is not None and self.batch_sizes is not None:
            raise SweepError("--tokens-per-batch sets the batch size of each seq_len: drop --batch-sizes")
        if self.resume and self.find_max_batch:
            raise SweepError("--resume continues a sweep; a max-batch search starts afresh")
        if self.gpu_memory_gb is not None and self.device == "cpu":
            raise SweepError("--gpu-memory-gb limits a CUDA GPU; it cannot be used with a CPU grid")
        for key, value in self.overrides.items():  # the trial's own check would name a grid point, not the flag
            if isinstance(value, float) and not math.isfinite(value):
                raise SweepError(f"--{key.replace('_', '-')} must be a finite number, got {value}")
        self._validate_storage()
        return self

    def _validate_choices(self) -> None:
        import difflib
        from dataclasses import fields

        for f in fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SweepError(f"unknown --{f.name.replace('_', '-')} {value!r}{hint}; choose from "
                                 f"{', '.join(map(str, choices))}")

    def _validate_storage(self) -> None:
        if not str(self.storage_path).strip():
            raise SweepError("--storage-path is empty: give a directory or a URI such as s3://bucket/sweeps")
        if self.name is not None:
            check_name(self.name)
        local = local_storage(str(self.storage_path))
        if local is not None:
            if not local.strip():
                raise SweepError(f"--storage-path {self.storage_path} names no directory")
            check_writable(local)


def local_storage(storage_path: str) -> str | None:
    """The directory a storage path names on this machine (`file://DIR` is DIR), or None for a remote URI."""
    if storage_path.lower().startswith("file://"):
        return storage_path[len("file://"):]
    return None if is_uri(storage_path) else storage_path


def check_name(name: str) -> None:
    """An experiment name is one path component: it can never land outside --storage-path."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise SweepError(f"--name {name!r} must be one path component (no '/', not '.' or '..')")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise SweepError(f"--name is {len(name.encode())} bytes long; a name is at most {MAX_NAME_BYTES}")


def check_writable(path: str) -> None:
    """The storage directory exists and is writable, or can be created: said before anything runs."""
    target = os.path.abspath(os.path.expanduser(path))
    probe = target
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise SweepError(f"--storage-path {path}: {probe} is not a directory")
    if probe.startswith(("/proc", "/sys", "/dev")) or not os.access(probe, os.W_OK | os.X_OK):
        raise SweepError(f"--storage-path {path}: cannot write under {probe}")
