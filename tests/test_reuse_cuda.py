"""GPU proof that a reused process measures what a fresh one does: every technique's per-step memory peaks (and
reserved memory) in a process that already ran other trials, an OOM among them, equal a fresh process's to
the MiB; and a trial forked from a warm server (how the sweep trains every trial, and every max-batch probe) is a
fresh process too. Skipped without CUDA.

    pytest -m cuda tests/test_reuse_cuda.py -s      # ~3-4 min on an H200: prints one line per technique
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sweep.orchestrate import compiles
from trainable import TrialConfig

pytestmark = [pytest.mark.cuda, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BASE = dict(device="cuda", n_layers=2, d_model=128, n_heads=4, ff_dim=512, seq_len=64, batch_size=32, max_steps=4,
            warmup_steps=1, eval_interval=0, eval_batches=1, eval_batch_size=16)
TECHNIQUES = {
    "baseline": {"technique": "baseline"}, "bf16": {"technique": "bf16"}, "flash": {"technique": "flash"},
    "window": {"technique": "window", "window": 16}, "gradcp": {"technique": "gradcp"},
    "sac": {"technique": "bf16", "checkpointing": "selective"}, "fused_ce": {"technique": "fused_ce"},
    "flash_compile": {"technique": "flash_compile"}, "fused_ce_compile": {"technique": "fused_ce_compile"},
    "window_compile": {"technique": "window_compile", "window": 16},
}
# What runs in the reused process before the techniques: a compiled flex model at another batch, a trial that
# runs out of memory under a cap, a large eager one (leaves large cached segments behind unless reset).
DIRTY = [{"technique": "window_compile", "window": 32, "batch_size": 64},
         {"technique": "baseline", "batch_size": 512, "d_model": 256, "n_layers": 4, "gpu_memory_gb": 1.0},
         {"technique": "baseline", "batch_size": 256}]
MEMORY = ("mem_fwd_peak_mib", "mem_bwd_peak_mib", "mem_opt_peak_mib", "mem_step_peak_mib", "mem_allocated_mib",
          "mem_reserved_mib")
RUNNER = """
import json, sys
from trainable import TrialConfig, run_trial
out = []
for config in json.loads(sys.argv[1]):
    reports = []
    final = run_trial(TrialConfig.from_dict(config), reports.append)
    out.append({"status": final["status"], "trials_before": final["process_trials_before"],
                "steps": [{k: r[k] for k in %r} | {"loss": r["loss"]} for r in reports]})
print("RESULT " + json.dumps(out))
""" % (MEMORY,)


def _run(configs: list[dict]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(configs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def _config(data: Path, switches: dict) -> dict:
    return {**BASE, "data_dir": str(data), **switches}


def _forked(configs: list[dict], spool: Path) -> list[dict]:
    """Each config in a fork of one warm server, as the sweep trains every trial (`trainable.forked`)."""
    from trainable.fork_server import ForkServer
    from trainable.forked import TARGET

    server, out = ForkServer(), []
    for config in configs:
        payload = {"config": config, "checkpoints": [], "spool": str(spool), "worker_start_time": float("nan")}
        reports = [m["report"] for m in server.run(TARGET, payload) if "report" in m]
        assert reports[-1]["trial_process"] == "fork"
        out.append({"status": reports[-1]["status"], "trials_before": reports[-1]["process_trials_before"],
                    "steps": [{k: r[k] for k in MEMORY} | {"loss": r["loss"]} for r in reports]})
    server.proc.stdin.close()
    server.proc.wait(timeout=60)
    return out


def test_every_technique_measures_the_same_in_a_reused_process_as_in_a_fresh_one(sample_dataset, tmp_path):
    configs = [_config(sample_dataset, s) for s in TECHNIQUES.values()]
    # The first process ever to compile a kernel reserves more (inductor's and Triton's on-disk caches are cold):
    # compile each compiling technique once first, as any sweep's earlier trials or a probe's scout would have.
    compiling = [c for c in configs if compiles(TrialConfig.from_dict(c).to_dict(), True)]
    assert [r["status"] for r in _run(compiling)] == ["ok"] * len(compiling)
    with ThreadPoolExecutor(4) as pool:  # fresh processes side by side: each its own CUDA context and allocator
        fresh = [r[0] for r in pool.map(lambda c: _run([c]), configs)]
    reused = _run([_config(sample_dataset, s) for s in DIRTY] + configs)
    dirty, reused = reused[: len(DIRTY)], reused[len(DIRTY):]
    assert [d["status"] for d in dirty] == ["ok", "oom", "ok"]
    forked = _forked(configs, tmp_path)
    worst: dict[tuple[str, str], float] = {}  # (technique, reused|forked) -> MiB apart from fresh, worst step and key
    for name, a, b, c in zip(TECHNIQUES, fresh, reused, forked):
        assert a["status"] == b["status"] == c["status"] == "ok", name
        assert a["trials_before"] == c["trials_before"] == 0 and b["trials_before"] >= len(DIRTY)
        line = [f"{name:17s} peak {max(s['mem_step_peak_mib'] for s in a['steps']):9.1f} MiB"]
        for path, other in (("reused", b), ("forked", c)):
            apart = {k: max(abs(x[k] - y[k]) for x, y in zip(a["steps"], other["steps"])) for k in MEMORY}
            worst[name, path] = max(apart.values())
            line.append(f"|{path} - fresh|: peaks {max(v for k, v in apart.items() if k != 'mem_reserved_mib'):.3f}, "
                        f"reserved {apart['mem_reserved_mib']:.3f} MiB")
        print("  ".join(line) + f"  (fresh reserved {a['steps'][-1]['mem_reserved_mib']:.0f} MiB)")
        assert [s["loss"] for s in b["steps"]] == pytest.approx([s["loss"] for s in a["steps"]], rel=1e-3)
    # To the MiB, every step, every technique, in a reused process and in a probe's fork.
    assert {key: apart for key, apart in worst.items() if apart >= 1.0} == {}
