"""Where resumable trial state goes: a directory, or Ray Tune; written whole or not at all, loaded without pickle.

A checkpoint directory holds a state file (torch.save of tensors and plain Python data only) and
`MANIFEST_FILE`, written last, naming the state file with its size and sha256. Each state gets a new file
name (its step), the manifest is replaced atomically, and only then are older states deleted: a write killed
at any moment leaves the manifest naming a whole state, the new one or the one before (never a file being
written, never one whose rename outran its manifest). A reader trusts only a manifest whose file matches it.
States are loaded with `torch.load(weights_only=True)`: a checkpoint in shared storage that
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
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

from contract.io import atomic_write, first_line

from .config import TrialConfig
from .errors import ConfigError

Report = Callable[[dict[str, Any]], None]
STATE_PREFIX = "trial_state"  # + .<step>.pt
# Test hook: `MARKER_DIR;MOMENT:STEP[,MOMENT:STEP...]` SIGKILLs the writing process at MOMENT of step STEP's
# checkpoint, once (a marker file in MARKER_DIR says it happened), so a restarted trial gets past it.
KILL_ENV = "TRAINABLE_CHECKPOINT_KILL_AT"
KILL_MOMENTS = ("state-bytes", "state-renamed", "manifest-renamed")
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


class _Hashing:
    """A write-only file that hashes what goes through it (no second read of a large state)."""

    def __init__(self, f, on_write: Callable[[], None] | None = None):
        self.f, self.digest, self.num_bytes, self.on_write = f, hashlib.sha256(), 0, on_write

    def write(self, data) -> int:
        self.digest.update(data)
        self.num_bytes += len(data)
        written = self.f.write(data)
        if self.on_write is not None and self.num_bytes > 1 << 16:  # part of the state is on disk
            self.on_write, on_write = None, self.on_write
            self.f.flush()
            on_write()
        return written

    def flush(self) -> None:
        self.f.flush()


def write_checkpoint(state: dict, directory: Path) -> None:
    """A new state file, flushed to disk; then MANIFEST_FILE naming it (an atomic rename); then the old states go."""
    directory.mkdir(parents=True, exist_ok=True)
    step = state.get("position", {}).get("step")
    name = f"{STATE_PREFIX}.{step if isinstance(step, int) else 'latest'}.pt"
    written: dict[str, Any] = {}

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            out = _Hashing(f, lambda: _kill_point("state-bytes", step))
            import torch  # here, not at import: a Tune worker that only hands checkpoints on never imports it

            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
        written.update(num_bytes=out.num_bytes, sha256=out.digest.hexdigest())

    atomic_write(directory / name, save)
    _kill_point("state-renamed", step)
    manifest = {"format": FORMAT, "state_file": name, **written, "step": step}
    atomic_write(directory / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest) + "\n"))
    _fsync_directory(directory)
    _kill_point("manifest-renamed", step)
    for old in directory.glob(f"*{STATE_PREFIX}*"):  # older states and what killed writes left behind
        if old.name != name:
            old.unlink(missing_ok=True)


def _kill_point(moment: str, step: Any) -> None:
    """SIGKILL this process here if KILL_ENV asks for this moment of this step and it has not happened yet."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    marker_dir, _, wanted = spec.partition(";")
    if f"{moment}:{step}" not in wanted.split(","):
        return
    marker = Path(marker_dir) / f"killed-{moment}-{step}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _fsync_directory(directory: Path) -> None:
    """The renames themselves reach the disk (a power cut cannot bring an older manifest back)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} holds more than tensors and plain data; refusing to load it "
                              f"({first_line(exc, limit=120)})") from None


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


class SpoolCheckpointIO:
    """A forked trial's checkpoints (`trainable.forked`): its Tune worker holds the Tune session, the trial only
    files. Loads the first whole one of the local copies the worker made of Tune's candidates; writes each new one
    into its own directory under the worker's spool, hands it to the worker with its step's report, and waits
    until the worker has registered it with Tune (the worker then removes the directory), as `tune.report` waits."""

    def __init__(self, candidates: list[str], spool: str, send: Callable[[dict[str, Any]], None]):
        self.candidates, self.spool, self.send = [Path(c) for c in candidates], Path(spool), send

    def load(self) -> dict | None:
        last_error: CheckpointError | None = None
        for directory in self.candidates:
            try:
                return read_checkpoint(directory)
            except CheckpointError as exc:
                last_error = exc
        if last_error is not None:
            raise last_error
        return None

    def report_with_checkpoint(self, metrics: dict, state: dict, report: Report) -> None:
        import time

        directory = Path(tempfile.mkdtemp(prefix=f"checkpoint_{metrics.get('step')}_", dir=self.spool))
        write_checkpoint(state, directory)
        self.send({"report": metrics, "checkpoint": str(directory)})
        while directory.exists():  # the worker removes it once Tune has persisted its copy
            time.sleep(0.005)


class TuneCheckpointIO:
    """Ray Tune: resume from `tune.get_checkpoint()`, save through `tune.report(..., checkpoint=...)`."""

    def load(self) -> dict | None:
        """The checkpoint Tune hands over; if that one is gone or damaged, the newest whole one after it.

        Tune's experiment state can lag its storage: after a driver is killed it may name a checkpoint that a
        later save already replaced (and began deleting) while a newer whole one sits beside it. Every
        checkpoint carries its own manifest, so the trial falls back to the newest that verifies rather than
        failing. The named one always comes first: it is the one whose steps Tune has on record."""
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        last_error: CheckpointError | None = None
        for candidate in _candidates(checkpoint):
            try:
                with candidate.as_directory() as directory:
                    return read_checkpoint(Path(directory))
            except (CheckpointError, FileNotFoundError, OSError) as exc:
                last_error = exc if isinstance(exc, CheckpointError) else CheckpointError(
                    f"checkpoint {candidate.path} is unreadable ({type(exc).__name__})")
        raise last_error or CheckpointError(f"checkpoint {checkpoint.path} is unreadable")

    def report_with_checkpoint(self, metrics: dict, state: dict, report: Report) -> None:
        from ray import tune

        with tempfile.TemporaryDirectory(prefix="trial_ckpt_") as directory:
            write_checkpoint(state, Path(directory))
            # tune.report persists (copies) the directory into the trial's storage before returning.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def _candidates(checkpoint) -> list:
    """The checkpoint Tune named, then the trial's later `checkpoint_NNNNNN` directories, newest first."""
    import pyarrow.fs
    from ray import tune

    fs, named = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = named.rsplit("/", 1) if "/" in named else ("", named)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent, recursive=False))
    except (OSError, ValueError):
        return [checkpoint]
    names = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                   and i.base_name.startswith("checkpoint_") and i.base_name > name)
    return [checkpoint] + [tune.Checkpoint(f"{parent}/{n}", filesystem=fs) for n in reversed(names)]
