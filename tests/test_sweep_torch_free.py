"""The Ray driver never imports torch: `--predict`, `--dry-run` and the bad-input checks in a fresh interpreter,
and a whole tiny CPU sweep whose driver cannot import torch at all (its trials import it in their own workers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Runs sweep.run.main(argv) and prints what it returned and which heavy modules it imported.
PROBE = """
import contextlib, io, json, sys
from sweep.run import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "imported": [m for m in ("torch", "ray", "ray.tune") if m in sys.modules]}))
"""
# Makes `import torch` fail in this interpreter, then runs the sweep CLI.
NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"the sweep's driver imported {name}")
        return None

sys.meta_path.insert(0, NoTorch())
from sweep.run import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.parametrize("argv", [
    ["--predict", "--gpu-memory-gb", "24"],
    ["--dry-run", "--data", "{data}", "--storage-path", "{tmp}"],
    ["--dry-run", "--storage-path", "{tmp}"],  # the shipped sample, not prepared by a dry run
    ["--data", "{data}", "--lr", "nan", "--storage-path", "{tmp}"],
    ["--data", "{data}", "--techniques", "flash", "--device", "cpu", "--storage-path", "{tmp}"],
    ["--resume", "--storage-path", "{tmp}"],
], ids=["predict", "dry-run", "dry-run-sample", "bad-float", "bad-grid", "bad-resume"])
def test_modes_that_run_nothing_never_import_torch_or_ray(argv, sample_dataset, tmp_path):
    filled = [a.format(data=sample_dataset, tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(filled)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported"] == [], result
    assert result["code"] == (0 if argv[0] in ("--predict", "--dry-run") else 2)
    assert not any(tmp_path.iterdir())  # nothing written, not even the shipped sample


def test_a_sweep_runs_with_a_driver_that_cannot_import_torch(sample_dataset, tmp_path):
    argv = ["--device", "cpu", "--techniques", "baseline", "--batch-sizes", "4", "--max-steps", "5",
            "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--ff-dim", "64", "--seq-len", "32",
            "--data", str(sample_dataset), "--storage-path", str(tmp_path), "--name", "no-torch", "--address", "local"]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done   baseline_bs4  [1/1]  step 5" in proc.stderr  # the trial imported torch on its worker and trained
    assert "Traceback" not in proc.stderr and "baseline" in proc.stdout
