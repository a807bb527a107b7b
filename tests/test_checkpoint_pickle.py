"""A checkpoint in shared storage is data, never code: a state file whose pickle would run a command when loaded
(anyone who can write the bucket could plant one) is refused with one line, and the command never runs."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from trainable.checkpoint_io import MANIFEST_FILE, CheckpointError, read_checkpoint


class _Payload:
    """Unpickling this calls os.system: what a hostile checkpoint would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(directory, state: dict) -> None:
    directory.mkdir()
    path = directory / "trial_state.10.pt"
    torch.save(state, path)
    body = path.read_bytes()
    (directory / MANIFEST_FILE).write_text(json.dumps({
        "state_file": path.name, "num_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    _plant(tmp_path / "ckpt", {"step": 10, "model": {"w": torch.ones(2)}, "extra": _Payload(str(marker))})
    with pytest.raises(CheckpointError, match=r"holds more than tensors and plain data; refusing to load it"):
        read_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()


def test_tensors_and_plain_data_load(tmp_path):
    _plant(tmp_path / "ckpt", {"step": 10, "model": {"w": torch.ones(2)}, "rng": [1, 2.5, "x", None]})
    state = read_checkpoint(tmp_path / "ckpt")
    assert state["step"] == 10 and torch.equal(state["model"]["w"], torch.ones(2)) and state["rng"][2] == "x"
