"""Node failures on the real multi-node cluster (tests/multinode_cluster.py, shared with tests/test_multinode.py):
a worker node SIGKILLed mid-trial costs only the steps since the trial's checkpoint; the driver and every node
SIGKILLed mid-sweep, then `--resume` on a restarted cluster re-runs no finished trial.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import uninterrupted_losses
from multinode_cluster import (  # noqa: F401  (cluster: the fixture)
    REPO, Node, cluster, kill_session, parent_pid, reports, run, sweep_args, trial_states,
)

pytestmark = pytest.mark.slow

# The node-failure grid: long enough (200 steps) to be killed mid-run, checkpointing every 25 steps (more steps
# than result.json lags behind the trial, so the kill lands between two checkpoints).
FT_STEPS, FT_INTERVAL = 200, 25
FT_MODEL = ["--n-layers", "2", "--d-model", "128", "--n-heads", "4", "--ff-dim", "512", "--seq-len", "64"]


# -- a worker node dies mid-trial ---------------------------------------------------------------------------------
def _victim(raylets: dict[int, Node], exp: Path, names: list[str]) -> tuple[str, Node, int, int] | None:
    """A trial on a worker node that has checkpointed and run a few steps past its last checkpoint (so some steps
    are replayed after the restart): (trial, node, pid, step). `raylets`: raylet pid -> worker node."""
    for name in names:
        trial = reports(exp / name / "result.json")
        if not trial or not any((exp / name).glob("checkpoint_*")) or trial[-1]["step"] < FT_INTERVAL + 3:
            continue
        if not 2 <= trial[-1]["step"] % FT_INTERVAL <= 15:
            continue
        node = raylets.get(parent_pid(trial[-1]["pid"]))  # a Ray worker's parent is its node's raylet
        if node is not None and trial[-1]["step"] < FT_STEPS - 2 * FT_INTERVAL:
            return name, node, trial[-1]["pid"], trial[-1]["step"]
    return None


@pytest.mark.timeout(300)
def test_a_killed_worker_node_costs_only_the_steps_since_the_checkpoint(cluster, sample_dataset, tmp_path):
    storage, name = tmp_path / "shared", "nodefail"
    exp = storage / name
    names = [f"baseline_bs{b}" for b in (4, 8, 16)]
    args = sweep_args(cluster, storage, name, sample_dataset, "--techniques", "baseline", "--batch-sizes", "4", "8",
                      "16", "--max-steps", str(FT_STEPS), "--eval-interval", "0", "--checkpoint-interval",
                      str(FT_INTERVAL), "--max-failures", "2", *FT_MODEL)
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(args, env=cluster.client_env("nodefail"), cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, victim = time.monotonic() + 150, None
        raylets = {node.raylet_pid(): node for node in cluster.nodes.values() if node.name != "head"}
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            victim = _victim(raylets, exp, names)
            time.sleep(0.05)
        assert victim is not None, f"no trial to interrupt (driver {driver.poll()}):\n{log.read_text()[-3000:]}"
        trial, node, killed_pid, killed_at = victim
        os.kill(node.raylet_pid(), signal.SIGKILL)  # the node's raylet; its workers follow it
        killed_node_id = node.node_id
        driver.wait(timeout=200)
    finally:
        if driver.poll() is None:
            kill_session(driver.pid)
            driver.wait()
        if node_name := (victim[1].name if victim else None):
            cluster.stop_node(node_name)  # what is left of it
    assert driver.returncode == 0, log.read_text()[-3000:]

    history = reports(exp / trial / "result.json")
    first = [r for r in history if r["pid"] == killed_pid]
    rest = [r for r in history if r["pid"] != killed_pid]
    assert first and rest and len({r["pid"] for r in rest}) == 1, "expected exactly one restart"
    assert history == first + rest
    resumed_from = rest[0]["step"] - 1
    assert resumed_from % FT_INTERVAL == 0 and FT_INTERVAL <= resumed_from <= first[-1]["step"], \
        (f"killed at step {first[-1]['step']} (seen {killed_at}), resumed from {resumed_from}; "
         f"checkpoints: {sorted(p.name for p in (exp / trial).glob('checkpoint_*'))}")
    final_run = [r for r in first if r["step"] <= resumed_from] + rest
    assert [r["step"] for r in final_run] == list(range(1, FT_STEPS + 1))
    assert final_run[-1]["final"] is True and final_run[-1]["status"] == "ok"
    # The restart ran on another node, which is alive; the killed node is dead.
    nodes_now = {n["node_id"]: n["state"] for n in cluster.state("nodes")}
    assert nodes_now[killed_node_id] == "DEAD"
    placed = cluster.trial_nodes(name, {killed_pid, rest[0]["pid"]})
    assert placed[killed_pid] == node.name and placed[rest[0]["pid"]] != node.name
    # The other trials never noticed: one process each, every step once, no failure.
    states = trial_states(exp)
    assert states[trial]["num_failures"] == 1 and states[trial]["status"] == "TERMINATED"
    for other in set(names) - {trial}:
        steps = reports(exp / other / "result.json")
        assert len({r["pid"] for r in steps}) == 1 and states[other]["num_failures"] == 0, other
        assert [r["step"] for r in steps] == list(range(1, FT_STEPS + 1)) and steps[-1]["status"] == "ok", other

    # Same numbers as a run nobody interrupted (model, optimizer, scheduler, data position, RNG restored).
    reference = uninterrupted_losses(exp / trial)
    losses = [r["loss"] for r in final_run]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    print(f"\nnode {node.name} (raylet SIGKILL) died under {trial} at step {first[-1]['step']} (seen at {killed_at});"
          f" the trial resumed from step {resumed_from} on node {placed[rest[0]['pid']]}: "
          f"{first[-1]['step'] - resumed_from} steps were run twice; max relative loss difference to the "
          f"uninterrupted run {worst:.1e}")
    assert first[-1]["step"] > resumed_from  # steps were replayed: the de-duplication below has work to do
    assert losses == pytest.approx(reference, rel=1e-6, abs=1e-7)

    # What the user reads: each step once per trial (analysis keeps the resumed run's report of a replayed step).
    import analysis

    steps = analysis.load(exp).steps
    dupes = steps[steps.duplicated(subset=["name", "step"], keep=False)]
    assert dupes.empty, f"ANALYSIS KEEPS REPLAYED STEPS TWICE:\n{dupes[['name', 'step', 'loss']]}"
    mine = steps[steps["name"] == trial].sort_values("step")
    assert list(mine["step"]) == list(range(1, FT_STEPS + 1))
    assert list(mine["loss"]) == pytest.approx(losses, rel=1e-9)


# -- the driver and the head die; the sweep resumes on a new cluster ------------------------------------------------
@pytest.mark.timeout(400)
def test_driver_and_head_killed_then_resume_on_a_restarted_cluster(cluster, sample_dataset, tmp_path):
    storage, name = tmp_path / "shared", "headloss"
    exp = storage / name
    grid = ["--techniques", "baseline", "--batch-sizes", "2", "4", "8", "16", "--max-concurrent", "2",
            "--max-steps", "40", "--eval-interval", "0", "--checkpoint-interval", str(FT_INTERVAL),
            "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--ff-dim", "64", "--seq-len", "32"]
    env = {**cluster.client_env("headloss"), "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(sweep_args(cluster, storage, name, sample_dataset, *grid), env=env, cwd=REPO,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            if "TERMINATED" in {s["status"] for s in trial_states(exp).values()} and _finished(exp):
                break
            time.sleep(0.1)
        assert driver.poll() is None, f"the sweep ended before it could be interrupted:\n{log.read_text()[-3000:]}"
    finally:
        kill_session(driver.pid)  # the driver (SIGKILL) ...
        driver.wait()
        cluster.kill_all()  # ... and every node, head included (SIGKILL)
    kept = _finished(exp)
    assert kept and len(kept) < 4, kept

    cluster.start()  # a new cluster: new ports, new node ids; the storage path is all that survives
    resumed, seconds = run(sweep_args(cluster, storage, name, sample_dataset, *grid, "--resume"), env, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    names = [f"baseline_bs{b}" for b in (2, 4, 8, 16)]
    states = trial_states(exp)
    assert {n: s["status"] for n, s in states.items()} == {n: "TERMINATED" for n in names}
    for trial, before in kept.items():
        assert (exp / trial / "result.json").read_bytes() == before, f"{trial} ran again"
    assert set(_finished(exp)) == set(names)

    import analysis

    results = analysis.load(exp)
    assert sorted(results.trials["name"]) == sorted(names) and set(results.trials["status"]) == {"ok"}
    steps = results.steps
    assert not steps.duplicated(subset=["name", "step"]).any(), "ANALYSIS KEEPS REPLAYED STEPS TWICE"
    assert all(list(g["step"]) == list(range(1, 41)) for _, g in steps.sort_values("step").groupby("name"))
    print(f"\ndriver and head SIGKILLed with {len(kept)} of 4 trials finished; --resume on a new cluster took "
          f"{seconds:.0f} s and re-ran none of them")


def _finished(exp: Path) -> dict[str, bytes]:
    """Trials whose result.json holds their final report, with that file's bytes."""
    done = {}
    for result in exp.glob("*/result.json"):
        text = result.read_bytes()
        if b'"final": true' in text:
            done[result.parent.name] = text
    return done
