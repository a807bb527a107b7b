"""What a user sees from a real tiny sweep: one stderr line per trial event, the table, a few lines; and named
trial actors in Ray's state API (what the dashboard's Actors page lists) while the trials run."""
from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRIALS = ("baseline_bs4", "bf16_bs4")
# Every line a --verbose 1 sweep may print on stderr (a line per trial event, the dashboard, the grid).
STDERR_LINES = (
    r"Ray dashboard: http://\S+ \(sign in with the token `ray get-auth-token` prints\)",
    r"2 trials \(custom grid\), \{'cpu': 1\} each -> \S+",
    r"\[ *\d+s\] start  (baseline|bf16)_bs4",
    r"\[ *\d+s\] done   (baseline|bf16)_bs4  \[[12]/2\]  step 150  loss \d\.\d{3}  [\d.]+k tok/s",
)


def _sweep_command(storage: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sweep.run", "--device", "cpu", "--techniques", "baseline", "bf16",
            "--batch-sizes", "4", "--max-steps", "150", "--n-layers", "1", "--d-model", "32", "--n-heads", "2",
            "--ff-dim", "64", "--seq-len", "32", "--data", str(data), "--storage-path", str(storage), "--name", "out",
            "--address", "local", *extra]


def sweep_env(token: str) -> dict[str, str]:
    """A local Ray of its own with token authentication and a token of the test's (not the user's file)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_TOKEN": token, "CUDA_VISIBLE_DEVICES": ""}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    return env


def alive_actor_names(dashboard: str, token: str) -> set[str]:
    """`repr_name` of every alive actor, through Ray's state API (the dashboard's own data source)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=dashboard, headers={"Authorization": f"Bearer {token}",
                                                         "Content-Type": "application/json"})
    actors = client.list(StateResource.ACTORS, options=ListApiOptions(filters=[("state", "=", "ALIVE")], detail=True),
                         raise_on_missing_output=False)
    return {a["repr_name"] if isinstance(a, dict) else a.repr_name for a in actors}


@pytest.mark.slow
def test_a_tiny_sweep_prints_a_line_per_trial_event_and_names_its_actors(sample_dataset, tmp_path):
    token = secrets.token_hex(32)
    proc = subprocess.Popen(_sweep_command(tmp_path, sample_dataset), cwd=ROOT, env=sweep_env(token),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stderr: list[str] = []
    urls: list[str] = []
    dashboard = threading.Event()
    named: set[str] = set()

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line.rstrip("\n"))
            if line.startswith("Ray dashboard: "):
                urls.append(line.split()[2])
                dashboard.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert dashboard.wait(120), "\n".join(stderr)
        while proc.poll() is None and not set(TRIALS) <= named:
            try:
                named |= alive_actor_names(urls[0], token) & set(TRIALS)
            except Exception:  # noqa: BLE001 - the state API is gone once the sweep shuts its Ray down
                pass
            time.sleep(0.3)
        stdout = proc.stdout.read()
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    reader.join(10)
    text = "\n".join(stderr)
    assert proc.returncode == 0, text[-3000:]
    assert named == set(TRIALS), f"actors seen: {named}"  # each trial's actor shows its own name, not sweep_trainable

    assert len(stderr) == 2 + 2 * len(TRIALS), text  # the dashboard, the grid, a start and a done per trial
    for line in stderr:
        assert any(re.fullmatch(p, line) for p in STDERR_LINES), f"unexpected stderr line: {line!r}\n{text}"
    out = stdout.splitlines()
    assert "Comparison" in out and any(line.startswith("baseline ") for line in out)
    assert out[-2] == f"results: {tmp_path / 'out'}"
    assert out[-1] == f"TensorBoard: tensorboard --logdir {tmp_path / 'out'}" or \
        out[-1].startswith(f"TensorBoard: tensorboard --logdir {tmp_path / 'out'}   (the viewer:"), out[-1]
    assert any((tmp_path / "out").glob("*/events.out.tfevents.*"))
    assert len(out) < 40, stdout  # the table and its notes, not Tune's boxes
