"""Tune's saved experiment state, made safe to resume from before `Tuner.restore` reads it.

Tune resumes from the newest `experiment_state-*.json`, which it saves every few seconds, while a trial's
reports reach its `result.json` at once. A driver killed between the two leaves two hazards:

* a damaged newest state (a write cut short) would restart every trial and overwrite finished results:
  `use_valid_state` sets it aside when an older valid one exists, and refuses when none is valid;
* a trial whose final report is in its result.json, while the state still says RUNNING, would run again
  from its latest checkpoint and append a second copy of its finished steps: `mark_finished` records it
  as TERMINATED, with that final report as its last result, so Tune skips it as it skips any finished trial,
  and takes it out of the grid generator's set of running trials (or the generator would wait for it).

Both act on local (and network-mounted) storage paths. On a storage URI Tune uploads the state and the
result files together from the driver's staging directory, so they cannot disagree in this way.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from contract.io import atomic_write, is_uri

from .errors import SweepError

STATE_GLOB = "experiment_state-*.json"
SEARCHER_GLOB = "basic-variant-state-*.json"  # the grid generator's state (Tune picks the newest by name)
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # Tune's statuses of a trial it would run again
_TAIL_BYTES = 1 << 20  # a final report is one JSON line, far shorter


def valid_state(path: str) -> tuple[Path, dict[str, Any]]:
    """(file, state) of the newest experiment_state-*.json that parses as Tune's state (what Tune resumes
    from once `use_valid_state` has set newer damaged ones aside); one SweepError line when there is none."""
    states = sorted(Path(path).glob(STATE_GLOB))
    if not states:
        raise SweepError(f"--resume: {path} is not a Tune experiment directory")
    for state_path in reversed(states):
        state = _read_state(state_path)
        if state is not None:
            return state_path, state
    raise SweepError(f"--resume: every {STATE_GLOB} in {path} is damaged; the sweep cannot resume safely "
                     "(its trials' results are untouched)")


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("trial_data"), list) else None


def use_valid_state(path: str) -> None:
    """Set aside every state file newer than the newest valid one; refuse when none is valid."""
    if is_uri(path):
        return
    newest = valid_state(path)
    for state in sorted(Path(path).glob(STATE_GLOB)):
        if state.name > newest[0].name:
            os.replace(state, f"{state}.damaged")
            print(f"note: {state.name} is damaged: set aside as {state.name}.damaged; resuming from "
                  f"{newest[0].name}", file=sys.stderr)


def final_report(trial_dir: Path) -> dict[str, Any] | None:
    """The trial's final report, when the last line of its result.json is one."""
    try:
        with open(trial_dir / "result.json", "rb") as f:  # its last line only: a long trial's file is large
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
            lines = f.read().splitlines()
        row = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("final") is True else None


def finished_trials(path: str, state: dict[str, Any]) -> list[str]:
    """Trials that finished: TERMINATED in the state, or unfinished there with their final report on disk."""
    names = []
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        status, logdir = trial.get("status"), trial.get("relative_logdir")
        if status == "TERMINATED" or (status in UNFINISHED and logdir and final_report(Path(path) / logdir)):
            names.append(str(logdir or trial.get("trial_id")))
    return names


def mark_finished(path: str) -> list[str]:
    """Record as TERMINATED each trial the state left unfinished although its final report is on disk.

    Its last result becomes that report (what Tune would have saved a moment later), so the resumed
    ResultGrid reads it as finished too. Returns the trials it marked."""
    if is_uri(path):
        return []
    state_path, state = valid_state(path)
    marked, marked_ids = [], set()
    for entry in state["trial_data"]:
        trial, runtime = json.loads(entry[0]), json.loads(entry[1])
        logdir = trial.get("relative_logdir")
        report = final_report(Path(path) / logdir) if trial.get("status") in UNFINISHED and logdir else None
        if report is None:
            continue
        trial["status"] = "TERMINATED"
        runtime["last_result"] = report
        runtime["last_result_time"] = report.get("timestamp", runtime.get("last_result_time"))
        entry[0], entry[1] = json.dumps(trial, indent=2), json.dumps(runtime, indent=2)
        marked.append(str(logdir))
        marked_ids.add(str(trial.get("trial_id")))
    if marked:
        atomic_write(state_path, lambda tmp: tmp.write_text(json.dumps(state)))
        _forget_live(path, marked_ids)
    return marked


def _forget_live(path: str, trial_ids: set[str]) -> None:
    """Take the marked trials out of the grid generator's running set, as Tune's completion of each would have.

    Tune's BasicVariantGenerator (max_concurrent) saves the ids of the trials it still counts as running;
    restored with a trial it never hears finish, it would wait for a free slot forever and the sweep hang."""
    import ray.cloudpickle as cloudpickle

    saved = sorted(Path(path).glob(SEARCHER_GLOB))
    if not saved:
        return
    searcher = cloudpickle.loads(saved[-1].read_bytes())  # Tune's own file, read as Tune reads it
    live = searcher.get("_live_trials") if isinstance(searcher, dict) else None
    if isinstance(live, set) and live & trial_ids:
        searcher["_live_trials"] = live - trial_ids
        atomic_write(saved[-1], lambda tmp: tmp.write_bytes(cloudpickle.dumps(searcher)))
