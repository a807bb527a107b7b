"""Where resumable trial state goes: a small interface, a directory, or Ray Tune.

A checkpoint is saved together with the report of the step it belongs to, so the metrics history
and the checkpoint never disagree: after a restart the trial resumes at the next step, with no gap
and no repeated step. `run_trial` only sees this interface, so it is tested without Ray.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

Report = Callable[[dict[str, Any]], None]
STATE_FILE = "trial_state.pt"


class CheckpointIO(Protocol):
    def load(self) -> dict | None:
        """The latest saved state, or None to start fresh."""

    def report_with_checkpoint(self, metrics: dict, state: dict, report: Report) -> None:
        """Persist `state`, then report `metrics` as the step that state belongs to."""


def _load_state(path: Path) -> dict:
    # weights_only=False: our own file, it holds numpy/python RNG states besides tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


class DirectoryCheckpointIO:
    """Keeps the latest state in `<dir>/trial_state.pt` (written atomically)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def load(self) -> dict | None:
        path = self.directory / STATE_FILE
        return _load_state(path) if path.is_file() else None

    def report_with_checkpoint(self, metrics: dict, state: dict, report: Report) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.directory / STATE_FILE)
        report(metrics)


class TuneCheckpointIO:
    """Ray Tune: resume from `tune.get_checkpoint()`, save through `tune.report(..., checkpoint=...)`."""

    def load(self) -> dict | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return _load_state(Path(directory) / STATE_FILE)

    def report_with_checkpoint(self, metrics: dict, state: dict, report: Report) -> None:
        from ray import tune

        with tempfile.TemporaryDirectory(prefix="trial_ckpt_") as directory:
            torch.save(state, Path(directory) / STATE_FILE)
            # tune.report persists (copies) the directory before returning.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
