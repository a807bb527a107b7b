"""`--resume` after the driver is SIGKILLed mid-sweep: finished trials are kept, the rest run to the end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRIALS = ("baseline_bs2", "baseline_bs4", "baseline_bs8")


def _trial_statuses(exp: Path) -> dict[str, str]:
    """Trial name -> status from the newest experiment state Tune wrote (named by its start time)."""
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return {}
    trials = [json.loads(trial_json) for trial_json, _runtime in data.get("trial_data", [])]
    return {t["relative_logdir"]: t["status"] for t in trials}


def _finished_trials(exp: Path) -> dict[str, bytes]:
    """Trials whose result.json holds their final report, with that file's bytes."""
    done = {}
    for name in TRIALS:
        result = exp / name / "result.json"
        if result.is_file() and '"final": true' in result.read_text():
            done[name] = result.read_bytes()
    return done


def _sweep(*args: str, storage: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "sweep.run", "--device", "cpu", "--techniques", "baseline",
            "--batch-sizes", "2", "4", "8", "--max-concurrent", "1", "--max-steps", "20", "--n-layers", "1",
            "--d-model", "32", "--n-heads", "2", "--ff-dim", "64", "--seq-len", "32", "--data", str(data),
            "--storage-path", str(storage), "--name", "killed", "--address", "local", "--verbose", "0", *args]


def test_resume_after_driver_killed(sample_dataset, tmp_path):
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    exp = tmp_path / "killed"
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(_sweep(storage=tmp_path, data=sample_dataset), cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and driver.poll() is None:
            statuses = _trial_statuses(exp)
            if "TERMINATED" in statuses.values() and _finished_trials(exp):
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        assert "TERMINATED" in _trial_statuses(exp).values(), (tmp_path / "first.log").read_text()[-3000:]
    finally:
        # The driver and the local Ray it started share the session we created: end exactly those.
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    kept = _finished_trials(exp)
    statuses = _trial_statuses(exp)
    assert kept, "no trial had finished when the driver was killed"
    assert len(kept) < len(TRIALS) and list(statuses.values()).count("TERMINATED") < len(TRIALS)

    resumed = subprocess.run(_sweep("--resume", storage=tmp_path, data=sample_dataset), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=240, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = _trial_statuses(exp)
    assert final == {name: "TERMINATED" for name in TRIALS}, final
    for name, before in kept.items():
        assert (exp / name / "result.json").read_bytes() == before  # a finished trial was not run again
    assert set(_finished_trials(exp)) == set(TRIALS)
