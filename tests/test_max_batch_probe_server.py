"""The probe server without Ray: each probe trains in a fresh fork, reports stream back in order, a failing
probe is one error line, and the server goes when its parent's pipe does (taking a running probe with it)."""
from __future__ import annotations

import json
import os
import time

import pytest

from sweep.probe import TARGET, probe_config
from trainable.fork_server import ForkServer

TINY = {"device": "cpu", "n_layers": 1, "d_model": 32, "n_heads": 2, "ff_dim": 64, "seq_len": 32}


def _alive(pid: int) -> bool:
    """The server's fork is the server's to reap: gone from the process table once the server is done."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_each_probe_is_a_fresh_fork_and_the_server_dies_with_its_pipe(sample_dataset):
    server = ForkServer()
    config = probe_config({**TINY, "data_dir": str(sample_dataset)}, 4, probe_steps=2)
    pids = []
    for _ in range(2):
        messages = list(server.run(TARGET, {"config": config, "scout": None}))
        reports = [m["report"] for m in messages if "report" in m]
        assert messages[0] == {"process": "fork"}  # how the probe started is always said, first
        assert [r["step"] for r in reports] == [1, 2] and messages[-1] == {"exit": 0}
        final = reports[-1]
        assert final["final"] is True and final["process_trials_before"] == 0  # nothing ran in it before
        assert final["trial_process"] == "fork" and final["server_start_time"] <= final["imports_done_time"]
        assert final["process_id"] not in (os.getpid(), server.proc.pid)
        assert final["process_start_time"] >= final["imports_done_time"] - 0.02  # forked after the imports
        pids.append(final["process_id"])
    assert pids[0] != pids[1]

    bad = list(server.run(TARGET, {"config": {**config, "data_dir": str(sample_dataset / "nope")}, "scout": None}))
    assert bad[0] == {"process": "fork"} and "does not exist" in bad[1]["error"] and bad[-1] == {"exit": 1}

    spec = {"start": 1, "max_bound": 3, "granularity": 1, "probe_steps": 1, "hint": None}
    (_, scout, done) = list(server.run(TARGET, {"config": config, "scout": spec}))
    assert done == {"exit": 0} and scout["report"]["scout_max_batch"] == 3
    assert scout["report"]["trial_process"] == "fork"
    assert [o[:2] for o in scout["report"]["scout_outcomes"]] == [[1, "fits"], [2, "fits"], [3, "fits"]]

    # a probe still running when the worker goes: the server kills it and exits
    long = probe_config({**TINY, "data_dir": str(sample_dataset)}, 4, probe_steps=100_000)
    server.proc.stdin.write(json.dumps({"target": TARGET, "payload": {"config": long, "scout": None}, "env": dict(os.environ),
                                        "server_start_time": server.started}) + "\n")
    server.proc.stdin.flush()
    assert json.loads(server.messages.readline()) == {"process": "fork"}
    first = json.loads(server.messages.readline())  # step 1 is training
    child = None
    deadline = time.monotonic() + 30
    while child is None and time.monotonic() < deadline:
        children = open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()
        child = int(children[0]) if children else None
    assert "report" in first and child is not None
    server.proc.stdin.close()
    assert server.proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the running probe outlived its server"
