"""A trial's worker SIGKILLed mid-trial: the sweep restarts it from its last checkpoint and the run is unchanged.

The driver-killed-then-`--resume` case is tests/test_sweep_resume.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import uninterrupted_losses

ROOT = Path(__file__).resolve().parents[1]
STEPS, INTERVAL = 80, 10
TINY = {"n_layers": 2, "d_model": 64, "n_heads": 4, "ff_dim": 256, "seq_len": 64}
# On a GPU the tiny model's 80 steps are over before the test can interrupt them: the seed's width there.
SEED_WIDTH = {"n_layers": 6, "d_model": 512, "n_heads": 8, "ff_dim": 2048, "seq_len": 64}
TRIAL_NAMES = {"baseline": "baseline_bs8", "flash": "bf16_flash_bs8"}
# (device, technique, model, relative loss tolerance against the uninterrupted run). CPU kernels are
# bit-reproducible; on a GPU some backward kernels accumulate with atomics: runs agree to rounding, not to the bit.
DEVICES = [pytest.param("cpu", "baseline", TINY, 1e-6, id="cpu"),
           pytest.param("cuda", "flash", SEED_WIDTH, 1e-4, id="cuda", marks=pytest.mark.cuda)]  # H200: 0.0


# CPU: the worker dies three times, at three moments of a checkpoint's life. During the write of step 20's state
# (a background write into Tune's temporary directory) and after step 40's state and manifest are whole but before
# Tune has them (both one-shot, trainable.checkpoint_io's kill hook), then the moment a new checkpoint directory
# appears in the trial's storage (Tune copying it in). Each restart must resume from a checkpoint Tune registered.
HOOK_KILLS = "state-bytes:20,manifest-renamed:40"


def _sweep_command(storage: Path, data: Path, device: str, technique: str, model: dict, failures: int) -> list[str]:
    model = [arg for key, value in model.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    return [sys.executable, "-m", "sweep.run", "--device", device, "--techniques", technique, "--batch-sizes", "8",
            "--max-steps", str(STEPS), "--eval-interval", "0", "--checkpoint-interval", str(INTERVAL), *model,
            "--data", str(data), "--storage-path", str(storage), "--name", "ft", "--address", "local",
            "--verbose", "0", "--max-failures", str(failures)]


def _reports(result_json: Path) -> list[dict]:
    """The trial's reports as Tune logged them (a line caught mid-write is left out)."""
    if not result_json.is_file():
        return []
    reports = []
    for line in result_json.read_text().splitlines():
        try:
            reports.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return reports


def _kill_worker(driver: subprocess.Popen, trial_dir: Path, attempts: int, on_new_checkpoint: bool) -> int:
    """SIGKILL the process training the trial in its attempt number `attempts`: once a checkpoint exists and a few
    steps ran past it, or (`on_new_checkpoint`) the moment a checkpoint directory appears that was not there when
    the attempt started. Returns the last step Tune had logged. Tune puts the reporting pid in every report."""
    deadline, seen = time.monotonic() + 120, None
    while time.monotonic() < deadline and driver.poll() is None:
        reports = _reports(trial_dir / "result.json")
        pids = list(dict.fromkeys(r["pid"] for r in reports))
        if len(pids) == attempts:
            checkpoints = {p.name for p in trial_dir.glob("checkpoint_*")}
            seen = checkpoints if seen is None else seen
            last = reports[-1]
            due = (checkpoints - seen) if on_new_checkpoint else (checkpoints and last["step"] >= INTERVAL + 3)
            if due:
                assert last["step"] < STEPS - INTERVAL, "the trial ran too far before it could be interrupted"
                os.kill(last["pid"], signal.SIGKILL)
                return last["step"]
        time.sleep(0.005)
    raise AssertionError(f"no attempt {attempts} to interrupt (driver exit status {driver.poll()})")


def _final_run(reports: list[dict]) -> tuple[list[dict], list[int]]:
    """The run the restarts add up to (each attempt's steps up to the checkpoint the next one resumed from), and
    the steps each restart resumed from; asserts every attempt reported contiguously after everything before it."""
    attempts: list[list[dict]] = []
    for r in reports:
        if not attempts or r["pid"] != attempts[-1][0]["pid"]:
            attempts.append([])
        attempts[-1].append(r)
    assert len({a[0]["pid"] for a in attempts}) == len(attempts), "an attempt reported after a later one"
    final, resumed_from = list(attempts[0]), []
    for attempt in attempts[1:]:
        start = attempt[0]["step"] - 1
        assert start % INTERVAL == 0 and INTERVAL <= start <= final[-1]["step"]  # a checkpoint it had saved
        assert attempt[0]["iterations_since_restore"] == 1
        final = [r for r in final if r["step"] <= start] + attempt
        resumed_from.append(start)
    assert [r["step"] for r in final] == list(range(1, STEPS + 1))
    return final, resumed_from


@pytest.mark.slow
@pytest.mark.parametrize(("device", "technique", "model", "rel"), DEVICES)
def test_killed_trial_worker_resumes_from_its_checkpoint(sample_dataset, tmp_path, device, technique, model, rel):
    import analysis
    from trainable.checkpoint_io import KILL_ENV

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    kills = 3 if device == "cpu" else 1
    if device == "cpu":
        (tmp_path / "markers").mkdir()
        env[KILL_ENV] = f"{tmp_path / 'markers'};{HOOK_KILLS}"
    trial_dir = tmp_path / "ft" / TRIAL_NAMES[technique]
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(_sweep_command(tmp_path, sample_dataset, device, technique, model, kills), cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed_at = _kill_worker(driver, trial_dir, attempts=kills, on_new_checkpoint=device == "cpu")
            driver.wait(timeout=180)
        finally:
            if driver.poll() is None:  # the driver and its local Ray share the session we created
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    assert driver.returncode == 0, log_path.read_text()[-3000:]

    reports = _reports(trial_dir / "result.json")
    final_run, resumed_from = _final_run(reports)
    assert len(resumed_from) == kills, f"expected {kills} restarts, got {resumed_from}"
    if device == "cpu":  # killed mid-write of 20: resumed from 10; whole at 40 but not Tune's yet: resumed from 30
        assert resumed_from[:2] == [10, 30] and sorted((tmp_path / "markers").iterdir())
    assert final_run[-1]["final"] is True and final_run[-1]["status"] == "ok"
    assert len(list(trial_dir.glob("checkpoint_*"))) == 1  # CheckpointConfig(num_to_keep=1)
    # The results keep each step once: the latest attempt's report of it, i.e. the run the restarts add up to.
    loaded = analysis.load(tmp_path / "ft")
    steps = loaded.steps
    assert steps["step"].tolist() == list(range(1, STEPS + 1))
    # it finished after its restarts: ok, though the killed attempts left an error.txt behind
    assert loaded.trials["status"].tolist() == ["ok"] and (trial_dir / "error.txt").exists()
    assert steps["loss"].tolist() == [r["loss"] for r in final_run]

    # Same numbers as a run nobody interrupted: model, optimizer, scheduler, data position and RNG all restored.
    reference = uninterrupted_losses(trial_dir)
    worst = max(abs(a - b) / abs(b) for a, b in zip([r["loss"] for r in final_run], reference))
    print(f"\n{device}: last kill after step {killed_at}, restarts resumed from steps {resumed_from}; "
          f"max relative loss difference to the uninterrupted run {worst:.2e}")
    assert [r["loss"] for r in final_run] == pytest.approx(reference, rel=rel, abs=1e-7)
    replayed = {r["step"]: r["loss"] for r in reports if r["step"] > resumed_from[0]}
    assert replayed == pytest.approx({s: loss for s, loss in zip(range(1, STEPS + 1), reference) if s in replayed},
                                     rel=rel)


def test_checkpoint_interval_reaches_every_trial_but_no_probe():
    from sweep import SweepConfig, SweepError, plan_sweep
    from sweep.plan import CHECKPOINT_MINUTES

    def intervals(**kw) -> set[tuple[int, float]]:
        cfg = SweepConfig(techniques=("bf16",), batch_sizes=(8, 16), data_dir=None, **kw)
        grid = plan_sweep(cfg, gpus=1 if kw["device"] == "cuda" else 0).grid
        return {(p["checkpoint_interval"], p["checkpoint_minutes"]) for p in grid}

    assert intervals(device="cuda") == {(0, CHECKPOINT_MINUTES)}  # by time by default, on GPU and CPU alike
    assert intervals(device="cpu") == {(0, CHECKPOINT_MINUTES)}
    assert intervals(device="cpu", checkpoint_interval=0) == {(0, 0.0)}
    assert intervals(device="cuda", checkpoint_interval=7) == {(7, 0.0)}  # steps asked for: by steps only
    assert intervals(device="cuda", checkpoint_interval=7, checkpoint_minutes=1.5) == {(7, 1.5)}
    assert intervals(device="cuda", find_max_batch=True) == {(0, 0.0)}  # an OOM probe never checkpoints
    with pytest.raises(SweepError, match="probes never checkpoint"):
        intervals(device="cuda", find_max_batch=True, max_failures=1)
    with pytest.raises(SweepError, match="--max-failures must be >= 0"):
        intervals(device="cpu", max_failures=-1)
