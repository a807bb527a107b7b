"""Forked trials without Ray (`trainable.fork_server`, `trainable.forked.train_child`): each trial is a fresh fork
that reproduces a trial run in this process, checkpoints reach the parent whole and a restart from one equals the
uninterrupted run, a kill mid-write hands over nothing, and a parent that stops reading kills its child."""
from __future__ import annotations

import os
import shutil

import pytest

from helpers import losses, run, tiny
from trainable.checkpoint_io import KILL_ENV, MANIFEST_FILE
from trainable.forked import TARGET
from trainable.fork_server import ForkServer

pytestmark = pytest.mark.slow  # a server process per test


def _payload(cfg, spool, checkpoints=()) -> dict:
    return {"config": cfg.to_dict(), "checkpoints": list(checkpoints), "spool": str(spool),
            "worker_start_time": float("nan")}


def _run(server: ForkServer, cfg, spool, checkpoints=(), keep=None) -> tuple[list[dict], list, int]:
    """(reports, checkpoint directories handed over (moved to `keep`), exit code), as the Tune worker would."""
    reports, handed, code = [], [], None
    for message in server.run(TARGET, _payload(cfg, spool, checkpoints)):
        if "report" in message:
            reports.append(message["report"])
            if "checkpoint" in message:
                kept = keep / f"step{message['report']['step']}"
                shutil.copytree(message["checkpoint"], kept)
                shutil.rmtree(message["checkpoint"])  # the ack: the child waits for it
                handed.append(kept)
        elif "error" in message:
            raise AssertionError(message["traceback"])
        elif "exit" in message:
            code = message["exit"]
    return reports, handed, code


def test_a_forked_trial_equals_one_in_process_and_resumes_exactly(sample_dataset, tmp_path):
    server = ForkServer()
    cfg = tiny(sample_dataset, max_steps=8, checkpoint_interval=3)
    spool, keep = tmp_path / "spool", tmp_path / "kept"
    spool.mkdir(), keep.mkdir()
    reports, handed, code = _run(server, cfg, spool, keep=keep)
    assert code == 0 and [r["step"] for r in reports] == list(range(1, 9))
    final = reports[-1]
    assert final["trial_process"] == "fork" and final["process_id"] not in (os.getpid(), server.proc.pid)
    assert losses(reports) == losses(run(cfg)[0])  # a fork trains as this process does, bit for bit
    assert [h.name for h in handed] == ["step3", "step6"] and all((h / MANIFEST_FILE).is_file() for h in handed)
    assert list(spool.iterdir()) == []  # every handed checkpoint was taken

    resumed, _, code = _run(server, cfg, spool, checkpoints=[str(handed[-1])], keep=keep)
    assert code == 0 and [r["step"] for r in resumed] == [7, 8]
    assert losses(resumed) == losses(reports)[6:]


def test_a_kill_mid_write_hands_over_nothing_and_a_closed_run_kills_its_child(sample_dataset, tmp_path, monkeypatch):
    server = ForkServer()
    spool, keep = tmp_path / "spool", tmp_path / "kept"
    spool.mkdir(), keep.mkdir()
    monkeypatch.setenv(KILL_ENV, f"{tmp_path};state-bytes:3")  # the child reads the worker's environment
    reports, handed, code = _run(server, tiny(sample_dataset, max_steps=8, checkpoint_interval=3), spool, keep=keep)
    assert code == -9 and handed == [] and [r["step"] for r in reports] == [1, 2]
    assert [list(d.iterdir()) for d in spool.iterdir()] and not any(
        (d / MANIFEST_FILE).exists() for d in spool.iterdir())  # the partial write was never named whole
    monkeypatch.delenv(KILL_ENV)

    run_ = server.run(TARGET, _payload(tiny(sample_dataset, max_steps=100_000, eval_interval=0), spool))
    assert next(run_) == {"process": "fork"} and "report" in next(run_)
    run_.close()  # the worker stopped reading (Tune stopped the trial): the child goes, the server stays
    assert server.alive()
    reports, _, code = _run(server, tiny(sample_dataset, max_steps=2), spool, keep=keep)
    assert code == 0 and [r["step"] for r in reports] == [1, 2]
