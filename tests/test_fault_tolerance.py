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


def _sweep_command(storage: Path, data: Path, device: str, technique: str, model: dict) -> list[str]:
    model = [arg for key, value in model.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    return [sys.executable, "-m", "sweep.run", "--device", device, "--techniques", technique, "--batch-sizes", "8",
            "--max-steps", str(STEPS), "--eval-interval", "0", "--checkpoint-interval", str(INTERVAL), *model,
            "--data", str(data), "--storage-path", str(storage), "--name", "ft", "--address", "local",
            "--verbose", "0"]


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


def _kill_worker_mid_trial(driver: subprocess.Popen, trial_dir: Path) -> tuple[int, int]:
    """SIGKILL the process training the trial once a checkpoint exists and a few steps have run past it.

    Returns (killed pid, last step Tune had logged). Tune puts the reporting process's pid in every report.
    """
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and driver.poll() is None:
        reports = _reports(trial_dir / "result.json")
        if reports and any(trial_dir.glob("checkpoint_*")) and reports[-1]["step"] >= INTERVAL + 3:
            last = reports[-1]
            assert last["step"] < STEPS - INTERVAL, "the trial ran too far before it could be interrupted"
            os.kill(last["pid"], signal.SIGKILL)
            return last["pid"], last["step"]
        time.sleep(0.02)
    raise AssertionError(f"no checkpointed trial to interrupt (driver exit status {driver.poll()})")


def _uninterrupted_losses(trial_dir: Path) -> list[float]:
    """The losses of the trial's own config (Tune's params.json: grid overrides included) run without a kill."""
    import torch

    from contract.experiment import SWEEP_KEYS
    from trainable import TrialConfig, run_trial

    params = json.loads((trial_dir / "params.json").read_text())
    cfg = TrialConfig.from_dict({k: v for k, v in params.items() if k not in SWEEP_KEYS})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Ray worker
    try:
        reports: list[dict] = []
        run_trial(cfg, reports.append)
    finally:
        torch.set_num_threads(threads)
    return [r["loss"] for r in reports]


@pytest.mark.slow
@pytest.mark.parametrize(("device", "technique", "model", "rel"), DEVICES)
def test_killed_trial_worker_resumes_from_its_checkpoint(sample_dataset, tmp_path, device, technique, model, rel):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    trial_dir = tmp_path / "ft" / TRIAL_NAMES[technique]
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(_sweep_command(tmp_path, sample_dataset, device, technique, model), cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed_pid, killed_at = _kill_worker_mid_trial(driver, trial_dir)
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:  # the driver and its local Ray share the session we created
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    assert driver.returncode == 0, log_path.read_text()[-3000:]

    reports = _reports(trial_dir / "result.json")
    first = [r for r in reports if r["pid"] == killed_pid]
    rest = [r for r in reports if r["pid"] != killed_pid]
    assert first and rest and len({r["pid"] for r in rest}) == 1, "expected exactly one restart"
    assert reports == first + rest  # the restart came after everything the killed worker reported
    # The killed worker reported 1..k contiguously; the restart continued right after a checkpoint it had saved.
    killed_steps = [r["step"] for r in first]
    assert killed_steps == list(range(1, len(first) + 1)) and killed_steps[-1] >= killed_at
    resumed_from = rest[0]["step"] - 1
    assert resumed_from % INTERVAL == 0 and INTERVAL <= resumed_from <= killed_steps[-1]
    assert rest[0]["iterations_since_restore"] == 1
    # The final run: the killed worker's steps up to the checkpoint, then the restart's, each step exactly once.
    final_run = [r for r in first if r["step"] <= resumed_from] + rest
    assert [r["step"] for r in final_run] == list(range(1, STEPS + 1))
    assert final_run[-1]["final"] is True and final_run[-1]["status"] == "ok"
    assert len(list(trial_dir.glob("checkpoint_*"))) <= 2  # CheckpointConfig(num_to_keep=2)

    # Same numbers as a run nobody interrupted: model, optimizer, scheduler, data position and RNG all restored.
    reference = _uninterrupted_losses(trial_dir)
    worst = max(abs(a - b) / abs(b) for a, b in zip([r["loss"] for r in final_run], reference))
    print(f"\n{device}: worker killed after step {killed_at}, resumed from step {resumed_from}; "
          f"max relative loss difference to the uninterrupted run {worst:.2e}")
    assert [r["loss"] for r in final_run] == pytest.approx(reference, rel=rel, abs=1e-7)
    replayed = {r["step"]: r["loss"] for r in first if r["step"] > resumed_from}
    assert replayed == pytest.approx({r["step"]: r["loss"] for r in rest if r["step"] in replayed}, rel=rel)


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
