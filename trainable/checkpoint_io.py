"""Where resumable trial state goes: a directory, or Ray Tune; written whole or not at all, loaded without pickle.

A checkpoint directory holds `STATE_FILE` (torch.save of tensors and plain Python data only) and
`MANIFEST_FILE`, written last, naming the state file with its size and sha256. A reader trusts only a
manifest whose file matches it, so a write killed at any moment never leaves a checkpoint that points at a
partial file. States are loaded with `torch.load(weights_only=True)`: a checkpoint in shared storage that
holds anything but tensors and plain data (which could run code when unpickled) is refused.

A checkpoint is reported together with the report of the step it belongs to, so the metrics history and
the checkpoint never disagree: after a restart the trial resumes at the next step. `run_trial` only sees
the `CheckpointIO` interface, so it is tested without Ray.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from contract.io import atomic_write

from .config import TrialConfig
from .errors import ConfigError

Report = Callable[[dict[str, Any]], None]
STATE_FILE = "trial_state.pt"
MANIFEST_FILE = "checkpoint.json"
FORMAT = 2


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted: missing, partial, altered, or holding more than tensors and data."""


class CheckpointIO(Protocol):
    def load(self) -> dict | None:
        """The latest saved state, or None to start fresh."""

    def report_with_checkpoint(self, metrics: dict, state: dict, report: Report) -> None:
        """Persist `state`, then report `metrics` as the step that state belongs to."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(state: dict, directory: Path) -> None:
    """STATE_FILE, flushed to disk, then MANIFEST_FILE naming it with its checksum (both atomic renames)."""
    directory.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    path = atomic_write(directory / STATE_FILE, save)
    manifest = {"format": FORMAT, "state_file": STATE_FILE, "num_bytes": path.stat().st_size,
                "sha256": _sha256(path), "step": state.get("position", {}).get("step")}
    atomic_write(directory / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest) + "\n"))


def read_checkpoint(directory: Path) -> dict:
    """The state of a checkpoint directory, after checking it against its manifest; CheckpointError if not whole."""
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        path = directory / manifest["state_file"]
        size, digest = path.stat().st_size, manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {directory} is incomplete or unreadable ({type(exc).__name__}): "
                              "delete it to start afresh") from None
    if Path(manifest["state_file"]).name != manifest["state_file"]:
        raise CheckpointError(f"checkpoint {manifest_path} names a file outside its directory")
    if size != manifest.get("num_bytes") or _sha256(path) != digest:
        raise CheckpointError(f"checkpoint {path} does not match its manifest (partial or altered): "
                              "delete it to start afresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} holds more than tensors and plain data; refusing to load it "
                              f"({str(exc).strip().splitlines()[0][:120]})") from None


# Config keys that may differ between a checkpoint and the run resuming it (they do not change the math).
RESUME_MAY_DIFFER = ("data_dir", "device", "gpu_memory_gb", "checkpoint_interval", "checkpoint_minutes",
                     "eval_interval", "peak_flops")


def check_resumable(saved: dict[str, Any], cfg: TrialConfig) -> None:
    """ConfigError unless the checkpoint's config is `cfg`'s, up to RESUME_MAY_DIFFER; switches a checkpoint
    predates (e.g. `compile`) count as their defaults."""
    try:
        saved = TrialConfig.from_dict(dict(saved)).to_dict()
    except ConfigError:  # written by another version: compare what is there
        saved = dict(saved)
    current = cfg.to_dict()
    differs = [k for k in current if k not in RESUME_MAY_DIFFER and saved.get(k) != current[k]]
    if differs:
        raise ConfigError(f"the checkpoint to resume was written by a different configuration "
                          f"(differs in: {', '.join(differs)})")


class DirectoryCheckpointIO:
    """Keeps the latest state in `<dir>/` (`python -m trainable --checkpoint-dir`)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"--checkpoint-dir {self.directory} exists and is not a directory")

    def load(self) -> dict | None:
        return read_checkpoint(self.directory) if (self.directory / MANIFEST_FILE).is_file() else None

    def report_with_checkpoint(self, metrics: dict, state: dict, report: Report) -> None:
        write_checkpoint(state, self.directory)
        report(metrics)


class TuneCheckpointIO:
    """Ray Tune: resume from `tune.get_checkpoint()`, save through `tune.report(..., checkpoint=...)`."""

    def load(self) -> dict | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return read_checkpoint(Path(directory))

    def report_with_checkpoint(self, metrics: dict, state: dict, report: Report) -> None:
        from ray import tune

        with tempfile.TemporaryDirectory(prefix="trial_ckpt_") as directory:
            write_checkpoint(state, Path(directory))
            # tune.report persists (copies) the directory into the trial's storage before returning.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
