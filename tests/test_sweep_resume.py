"""Interrupted sweeps, for real: the driver SIGKILLed mid-sweep, then `--resume` at once (two of the dead
driver's Ray agents still linger); Ctrl-C (SIGINT), then the exact `--resume` command it printed, with a damaged
newest experiment state beside an older valid one, which lists a finished trial as still running. A resume that
works looks like it works: no ERROR or traceback, every trial ends ok, and a finished trial's result.json is
never rewritten."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRIALS = ("baseline_bs2", "baseline_bs4", "baseline_bs8")
NOISE = re.compile(r"ERROR|Traceback|WARNING|Failed to fetch|Error handling")

pytestmark = pytest.mark.slow


def _trial_states(exp: Path) -> list[tuple[dict, dict]]:
    """(trial, runtime) of every trial in the newest experiment state Tune wrote (named by its start time)."""
    states = sorted(exp.glob("experiment_state-*.json"))
    try:
        data = json.loads(states[-1].read_text()) if states else {}
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return []
    return [(json.loads(trial), json.loads(runtime)) for trial, runtime in data.get("trial_data", [])]


def _statuses(exp: Path) -> dict[str, str]:
    return {trial["relative_logdir"]: trial["status"] for trial, _ in _trial_states(exp)}


def _finished_trials(exp: Path) -> dict[str, bytes]:
    """Trials whose result.json holds their final report, with that file's bytes."""
    done = {}
    for name in TRIALS:
        result = exp / name / "result.json"
        if result.is_file() and '"final": true' in result.read_text():
            done[name] = result.read_bytes()
    return done


def _sweep(*args: str, storage: Path, data: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "sweep.run", "--device", "cpu", "--techniques", "baseline",
            "--batch-sizes", "2", "4", "8", "--max-concurrent", "1", "--max-steps", str(steps), "--n-layers", "1",
            "--d-model", "32", "--n-heads", "2", "--ff-dim", "64", "--seq-len", "32", "--data", str(data),
            "--storage-path", str(storage), "--address", "local", "--checkpoint-interval", "10", *args]


def _env() -> dict[str, str]:
    # Tune saves its state every ~10 s by default: every second here, so the wait below sees it move
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "CUDA_VISIBLE_DEVICES": "", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _wait_for(predicate, proc: subprocess.Popen, log: Path, seconds: float = 150) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():  # acted on at once: the state it saw may move on a moment later
            return
        time.sleep(0.2)
    assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{log.read_text()[-3000:]}"
    raise AssertionError(f"not reached in {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def _end_session(driver: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group the test started for a driver (nothing else)."""
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if driver.poll() is None:
        driver.wait()


def _make_state_lag(exp: Path) -> None:
    """Make the saved state one checkpoint behind for each unfinished trial: it lists the checkpoint before the
    trial's latest, which storage no longer holds. That is the state of a driver killed between Tune's
    deletion of a trial's oldest kept checkpoint (num_to_keep) and Tune's next save of the state, which is
    what every resume printed `Error handling checkpoint ... FileNotFoundError` tracebacks for."""
    import shutil

    import ray.cloudpickle
    from ray.train import Checkpoint
    from ray.train._internal.session import _TrainingResult

    path = sorted(exp.glob("experiment_state-*.json"))[-1]
    state = json.loads(path.read_text())
    for entry in state["trial_data"]:
        trial, runtime = json.loads(entry[0]), json.loads(entry[1])
        manager = runtime.get("checkpoint_manager")
        if trial["status"] == "TERMINATED" or not isinstance(manager, dict):
            continue
        tracked = ray.cloudpickle.loads(bytes.fromhex(manager["value"]))
        latest = tracked._checkpoint_results[-1]
        index = int(Path(latest.checkpoint.path).name.split("_")[-1])
        gone = Path(latest.checkpoint.path).with_name(f"checkpoint_{index - 1:06d}")
        shutil.rmtree(gone, ignore_errors=True)
        tracked._checkpoint_results = [_TrainingResult(Checkpoint(str(gone), latest.checkpoint.filesystem),
                                                       latest.metrics), latest]
        manager["value"] = ray.cloudpickle.dumps(tracked).hex()
        entry[1] = json.dumps(runtime)
    path.write_text(json.dumps(state))


def _unfinish(exp: Path, name: str) -> None:
    """Rewrite the saved state as a driver SIGKILLed a moment too early leaves it: the trial's final report is
    in its result.json, but the state still says RUNNING with an earlier last result (Tune saves its state
    every few seconds, a report reaches result.json at once), and the grid generator still counts it running."""
    import ray.cloudpickle

    path = sorted(exp.glob("experiment_state-*.json"))[-1]
    state = json.loads(path.read_text())
    rows = (exp / name / "result.json").read_text().splitlines()
    for entry in state["trial_data"]:
        trial, runtime = json.loads(entry[0]), json.loads(entry[1])
        if trial["relative_logdir"] == name:
            trial["status"], runtime["last_result"] = "RUNNING", json.loads(rows[-2])
            entry[0], entry[1] = json.dumps(trial), json.dumps(runtime)
            trial_id = trial["trial_id"]
    path.write_text(json.dumps(state))
    # Tune's grid generator saved it among its running trials too (max_concurrent counts them)
    searcher_path = sorted(exp.glob("basic-variant-state-*.json"))[-1]
    searcher = ray.cloudpickle.loads(searcher_path.read_bytes())
    searcher["_live_trials"].add(trial_id)
    searcher_path.write_bytes(ray.cloudpickle.dumps(searcher))


def _saved_checkpoint(exp: Path, name: str) -> tuple[int, bool]:
    """(index, still on disk) of the latest checkpoint the saved state lists for trial `name`; (-1, False) when
    it lists none. The state, not the disk, is what `--resume` restores from, and it lags the disk."""
    import ray.cloudpickle

    for trial, runtime in _trial_states(exp):
        manager = runtime.get("checkpoint_manager")
        if trial["relative_logdir"] == name and isinstance(manager, dict):
            results = ray.cloudpickle.loads(bytes.fromhex(manager["value"]))._checkpoint_results
            if results:
                path = Path(results[-1].checkpoint.path)
                return int(path.name.split("_")[-1]), path.is_dir()
    return -1, False


def _resumable(exp: Path, name: str) -> bool:
    """The saved state names the trial's second checkpoint or a later one, and it is still on disk."""
    index, on_disk = _saved_checkpoint(exp, name)
    return index >= 1 and on_disk


# Long enough that the kill lands mid-trial; checkpoints far enough apart (~1 s) that the one the saved state
# names (saved every second here) is still on disk when the kill lands, as with the default (minutes apart).
RESUME_STEPS, SPACED = 600, ("--checkpoint-interval", "100")


def test_resume_right_after_the_driver_is_sigkilled(sample_dataset, tmp_path):
    exp, log = tmp_path / "killed", tmp_path / "first.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(_sweep("--name", "killed", "--verbose", "0", *SPACED, storage=tmp_path,
                                         data=sample_dataset, steps=RESUME_STEPS), cwd=ROOT, env=_env(), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: "TERMINATED" in _statuses(exp).values() and _finished_trials(exp)
                  and "RUNNING" in _statuses(exp).values()
                  and _resumable(exp, "baseline_bs4"), driver, log)
        driver.kill()  # the driver alone, as `kill -9` or the OOM killer would: its Ray agents linger a while
        driver.wait()
        statuses = _statuses(exp)
        kept = {name: body for name, body in _finished_trials(exp).items() if statuses.get(name) == "TERMINATED"}
        assert kept and len(kept) < len(TRIALS)
        _make_state_lag(exp)
        first = log.read_text()  # --verbose 0: no dashboard, no trial lines
        assert "Ray dashboard" not in first and not re.search(r"^\[ *\d+s\]", first, re.M), first

        resumed = subprocess.run(_sweep("--name", "killed", "--resume", *SPACED, storage=tmp_path, data=sample_dataset,
                                        steps=RESUME_STEPS), cwd=ROOT, env=_env(), capture_output=True, text=True,
                                 timeout=300, start_new_session=True)
    finally:
        _end_session(driver)  # the first session's lingering agents (we started that session)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not NOISE.search(resumed.stderr + resumed.stdout), resumed.stderr[-3000:]
    assert f"resuming {exp}" in resumed.stderr
    assert re.search(r"notice: resuming the custom grid: 3 trials, 1 layer x d_model 32, seq_len 32, "
                     rf"{RESUME_STEPS} steps each; "
                     r"[12] finished, [12] to run", resumed.stderr), resumed.stderr
    assert re.search(r"resume baseline_bs4 from its step-\d+ checkpoint", resumed.stderr), resumed.stderr
    assert _statuses(exp) == dict.fromkeys(TRIALS, "TERMINATED")
    for name, before in kept.items():
        assert (exp / name / "result.json").read_bytes() == before  # a finished trial was not run again
    assert set(_finished_trials(exp)) == set(TRIALS)
    assert all(f'"status": "ok"' in (exp / name / "result.json").read_text().splitlines()[-1] for name in TRIALS)


def test_ctrl_c_says_what_is_incomplete_and_its_resume_command_finishes_them(sample_dataset, tmp_path):
    exp, log = tmp_path / "stopped", tmp_path / "first.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(_sweep("--name", "stopped", storage=tmp_path, data=sample_dataset, steps=150),
                                  cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    try:
        _wait_for(lambda: "done   baseline_bs2" in log.read_text() and "start  baseline_bs4" in log.read_text(),
                  driver, log)
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        driver.wait(timeout=120)
    finally:
        _end_session(driver)
    stderr = log.read_text()
    assert driver.returncode == 130, stderr
    assert not NOISE.search(stderr), stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted: 2 of 3 trials incomplete \(baseline_bs4, baseline_bs8\); continue with: (.+)",
                         last)
    assert match, stderr
    command = shlex.split(match.group(1))
    assert command[:3] == ["python", "-m", "sweep.run"] and "--resume" in command
    finished = _finished_trials(exp)
    assert set(finished) == {"baseline_bs2"}
    # the state as a driver killed a moment too early leaves it: bs2's final report saved, its status not yet
    _unfinish(exp, "baseline_bs2")
    assert _statuses(exp)["baseline_bs2"] == "RUNNING"
    # and a damaged newest experiment state (a write cut short) beside that older valid one
    (exp / "experiment_state-2999-01-01_00-00-00.json").write_text('{"trial_data": [["{\\"trial_id')

    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=300, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not NOISE.search(resumed.stderr), resumed.stderr
    assert "experiment_state-2999-01-01_00-00-00.json is damaged: set aside" in resumed.stderr
    assert "1 finished, 2 to run" in resumed.stderr and "note: baseline_bs2 finished before the driver stopped" \
        in resumed.stderr, resumed.stderr
    assert (exp / "baseline_bs2" / "result.json").read_bytes() == finished["baseline_bs2"]
    assert set(_finished_trials(exp)) == set(TRIALS) and _statuses(exp) == dict.fromkeys(TRIALS, "TERMINATED")
