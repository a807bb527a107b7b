"""The plain files of one experiment directory, local or remote, read as JSON and JSON lines.

Nothing here unpickles: Tune's `tuner.pkl` and `params.pkl` would import the sweep, the trainable and torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from contract.io import first_line, is_uri

# Keys Tune adds to every report: bookkeeping, not measurements (left out of `steps`).
TUNE_BOOKKEEPING = ("checkpoint_dir_name", "done", "date", "pid", "hostname", "node_ip", "time_since_restore",
                    "iterations_since_restore", "experiment_tag", "time_this_iter_s", "timestamp", "trial_id",
                    "config", "should_checkpoint")


class AnalysisError(ValueError):
    """A path that cannot be analysed; the message is one line meant for the user."""


class Files:
    """Reads files of one experiment directory, local or remote, through one pyarrow filesystem."""

    def __init__(self, path: str):
        import pyarrow.fs

        self._fs_module = pyarrow.fs
        if is_uri(path):
            try:
                self.fs, self.root = pyarrow.fs.FileSystem.from_uri(path)
            except (OSError, ValueError) as exc:
                raise AnalysisError(f"{path}: cannot open ({first_line(exc, limit=160)})") from None
        else:
            self.fs, self.root = pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())
        self.root = self.root.rstrip("/")

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(f"{self.root}/{rel}").type == self._fs_module.FileType.File

    def read(self, rel: str) -> str | None:
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(f"{self.root}/{rel}") as stream:
            return stream.readall().decode("utf-8", errors="replace")

    def listdir(self) -> list[str]:
        selector = self._fs_module.FileSelector(self.root, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def json(self, rel: str) -> Any:
        """A JSON file's content; None when it is not there; AnalysisError when it does not parse."""
        text = self.read(rel)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise AnalysisError(f"{self.root}/{rel}: not valid JSON ({exc})") from None


def newest_state(files: Files, shown: str) -> dict:
    """The newest experiment_state-*.json that parses (a damaged newer one is skipped, as --resume does)."""
    states = [n for n in files.listdir() if n.startswith("experiment_state-") and n.endswith(".json")]
    if not states:
        raise AnalysisError(f"{shown}: not a Ray Tune experiment directory (no experiment_state-*.json found); "
                            "pass the sweep's STORAGE/NAME directory")
    for name in reversed(states):
        try:
            state = json.loads(files.read(name) or "")
        except ValueError:
            continue
        if isinstance(state, dict) and isinstance(state.get("trial_data"), list):
            return state
    raise AnalysisError(f"{shown}: every experiment_state-*.json is damaged")


@dataclass
class TrialEntry:
    """One trial as Tune's experiment state lists it."""

    trial_id: str
    status: str
    logdir: str
    config: dict
    num_failures: int


def trial_entries(state: dict) -> list[TrialEntry]:
    trials = []
    for trial_json, run_metadata in state["trial_data"]:
        t = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        meta = json.loads(run_metadata) if isinstance(run_metadata, str) else (run_metadata or {})
        config = t.get("config") if isinstance(t.get("config"), dict) else {}
        trials.append(TrialEntry(str(t.get("trial_id")), str(t.get("status")), str(t.get("relative_logdir") or ""),
                                 config, int(meta.get("num_failures") or 0)))
    return sorted(trials, key=lambda tr: tr.trial_id)


def history(files: Files, trial: TrialEntry) -> pd.DataFrame:
    """What the trial reported, one row per report in the order reported, without Tune's bookkeeping."""
    text = files.read(f"{trial.logdir}/result.json") if trial.logdir else None
    rows = []
    for line in (text or "").splitlines():
        try:
            report = json.loads(line)
        except ValueError:  # a line cut short by a kill: the reports before it stand
            continue
        if isinstance(report, dict):
            rows.append({k: v for k, v in report.items() if k not in TUNE_BOOKKEEPING})
    return pd.DataFrame(rows)


def error_text(files: Files, trial: TrialEntry) -> str | None:
    return files.read(f"{trial.logdir}/error.txt") if trial.logdir else None
