"""`python -m trainable --checkpoint-dir` SIGKILLed during its background checkpoint writes, at every moment of a
write: the manifest always names a whole state, and the resumed runs reproduce the uninterrupted one exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainable import TrialConfig, run_trial
from trainable.checkpoint_io import KILL_ENV, KILL_MOMENTS, MANIFEST_FILE, STATE_PREFIX, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
# ~0.5M parameters: a state of ~6 MB, so the kill at "state-bytes" lands with part of it on disk
MODEL = {"n_layers": 2, "d_model": 128, "n_heads": 4, "ff_dim": 512, "seq_len": 64, "batch_size": 4}
# (moment, step killed at, the step the manifest must name afterwards)
KILLS = [("state-bytes", 3, 2), ("state-renamed", 5, 4), ("manifest-renamed", 7, 7)]


def _command(data: Path, ckpt: Path, metrics: Path | None = None) -> list[str]:
    flags = [arg for key, value in MODEL.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    out = ["--metrics-out", str(metrics)] if metrics else []
    return [sys.executable, "-m", "trainable", "--data", str(data), "--device", "cpu", *flags,
            "--max-steps", str(STEPS), "--checkpoint-interval", "1", "--eval-interval", "0", "--log-every", "0",
            "--verify-data", "size", "--checkpoint-dir", str(ckpt), *out]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}  # the reference runs on one thread too


@pytest.mark.slow
def test_a_kill_at_any_moment_of_a_checkpoint_write_leaves_a_whole_checkpoint(sample_dataset, tmp_path, one_thread):
    assert {moment for moment, _, _ in KILLS} == set(KILL_MOMENTS)
    ckpt, markers = tmp_path / "ckpt", tmp_path / "markers"
    markers.mkdir()
    for moment, step, expected_step in KILLS:
        env = _env(**{KILL_ENV: f"{markers};{moment}:{step}"})
        proc = subprocess.run(_command(sample_dataset, ckpt), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert (markers / f"killed-{moment}-{step}").exists()
        state = read_checkpoint(ckpt)  # never a partial file: the manifest names a whole state or the one before
        assert state["position"]["step"] == expected_step, moment
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
        assert manifest["step"] == expected_step and manifest["state_file"] == f"{STATE_PREFIX}.{expected_step}.pt"

    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.run(_command(sample_dataset, ckpt, metrics), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = [json.loads(line) for line in metrics.read_text().splitlines()]
    last_kill_step = KILLS[-1][2]
    assert [r["step"] for r in resumed] == list(range(last_kill_step + 1, STEPS + 1))
    # what the killed writes left behind is gone: one whole state and its manifest
    assert sorted(p.name for p in ckpt.iterdir()) == [MANIFEST_FILE, f"{STATE_PREFIX}.{STEPS}.pt"]

    cfg = TrialConfig.from_dict({"data_dir": str(sample_dataset), "device": "cpu", "max_steps": STEPS,
                                 "eval_interval": 0, **MODEL})
    reference: list[dict] = []
    run_trial(cfg, reference.append)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference[last_kill_step:]]  # bit for bit
    assert resumed[-1]["val_loss"] == reference[-1]["val_loss"]
