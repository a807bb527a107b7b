"""`prepare --overwrite`: it replaces only a dataset this tool wrote, atomically, and cleans up after a killed run.

The kill tests SIGKILL a real `python -m data_prep prepare` at each step of the swap (DATA_PREP_KILL_AT makes it
kill itself there) and at random moments, then check that the old or the new dataset is there, complete.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import DataPrepError, open_dataset, prepare_dataset
from data_prep.atomic import KILL_ENV, SWAP_ENV, _exchange, host_tag
from data_prep.output import first_unlisted

ROOT = Path(__file__).resolve().parents[1]
NEW_SEQ_LEN = 32  # the replacement differs from the old dataset (seq_len 64), so the two are told apart


@pytest.fixture
def old(sample_dataset, tmp_path) -> Path:
    """A copy of a good prepared dataset, to be overwritten."""
    return Path(shutil.copytree(sample_dataset, tmp_path / "ds"))


def prepare_again(old: Path, **kwargs) -> Path:
    """Overwrite `old` in-process with a different dataset (the same BPE reused: no training)."""
    return prepare_dataset(out_dir=old, tokenizer_path=old.parent / "tokenizer.json", seq_len=NEW_SEQ_LEN,
                           overwrite=True, progress=False, **kwargs)


@pytest.fixture
def tokenizer(old) -> Path:
    return Path(shutil.copy(old / "tokenizer.json", old.parent / "tokenizer.json"))


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def hidden_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# -- only a dataset this tool wrote is replaced -------------------------------------------------------------
def test_a_foreign_directory_with_a_manifest_json_is_never_deleted(tmp_path, tokenizer):
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / "src" / "main.py").write_text("print('hello')\n")
    (app / "README.md").write_text("my app\n")
    (app / "manifest.json").write_text(json.dumps({"name": "my-app", "version": "1.0"}))
    before = tree(app)
    with pytest.raises(DataPrepError, match=re.escape(f"refusing to overwrite {app}: {app}/manifest.json: format_version")):
        prepare_again(app)
    assert tree(app) == before and hidden_siblings(app) == []


@pytest.mark.parametrize("extra", ["notes.txt", "train/mine.arrow", "results/run1.csv"])
def test_a_dataset_holding_other_files_is_refused_naming_one(old, tokenizer, extra):
    (old / extra).parent.mkdir(exist_ok=True)
    (old / extra).write_text("keep me\n")
    before = tree(old)
    shown = extra.split("/")[0] + "/" if extra.startswith("results") else extra
    with pytest.raises(DataPrepError, match=re.escape(f"refusing to overwrite {old}: {shown} is not part of the prepared")):
        prepare_again(old)
    assert tree(old) == before


def test_our_own_dataset_is_replaced_even_when_damaged(old, tokenizer):
    manifest = json.loads((old / "manifest.json").read_text())
    (old / manifest["splits"]["val"]["shards"][0]["path"]).unlink()  # a missing shard is still ours to replace
    prepare_again(old)
    assert open_dataset(old, verify="full").seq_len == NEW_SEQ_LEN
    assert hidden_siblings(old) == []


def test_a_gpt2_tokenizer_directory_counts_as_listed(tmp_path):
    manifest = {"tokenizer_path": "tokenizer", "splits": {"train": {"shards": [{"path": "train/00000.arrow"}]}}}
    for rel in ("manifest.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "train/00000.arrow"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "val").mkdir()
    assert first_unlisted(tmp_path, manifest) is None
    (tmp_path / "tokenizer.json").write_text("x")
    assert first_unlisted(tmp_path, manifest) == "tokenizer.json"


def test_a_symlinked_out_is_refused(old, tokenizer, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(old)
    with pytest.raises(DataPrepError, match="is a symbolic link"):
        prepare_again(link)


# -- stale temp directories of killed runs ------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.slow  # starts subprocesses (for pids that are dead)
def test_stale_temp_dirs_of_dead_runs_are_removed_live_ones_kept(old, tokenizer):
    here = host_tag()
    dead = old.parent / f".{old.name}.tmp-{_dead_pid()}-{here}abcd"
    live = old.parent / f".{old.name}.tmp-{os.getpid()}-{here}abcd"  # a running process's (this one's)
    other = old.parent / f".other.tmp-{_dead_pid()}-{here}abcd"  # another output's: not ours to judge
    elsewhere = old.parent / f".{old.name}.old-{_dead_pid()}-{'0000' if here != '0000' else '0001'}abcd"  # another host's
    for path in (dead, live, other, elsewhere):
        (path / "train").mkdir(parents=True)
        (path / "train" / "00000.arrow").write_bytes(b"partial")
    prepare_again(old)
    assert not dead.exists() and live.exists() and other.exists() and elsewhere.exists()


# -- a kill at any moment leaves the old or the new dataset -------------------------------------------------
def run_prepare(out: Path, tokenizer: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "data_prep", "prepare", "--out", str(out), "--overwrite", "--quiet",
            "--tokenizer-path", str(tokenizer), "--seq-len", str(NEW_SEQ_LEN)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(args, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def assert_old_or_new(out: Path, old_manifest: bytes) -> str:
    """The dataset at `out` opens, verifies in full, and is either the old one or a complete new one."""
    ds = open_dataset(out, verify="full")  # the reader puts a complete old copy back if a swap was cut short
    for split in ds.manifest["splits"]:
        ds.split(split).get_rows([0])
    if (out / "manifest.json").read_bytes() == old_manifest:
        return "old"
    assert ds.seq_len == NEW_SEQ_LEN
    return "new"


KILL_POINTS = [  # (swap mode, step, which dataset must be there after the kill)
    ("exchange", "shards", "old"), ("exchange", "built", "old"), ("exchange", "exchanged", "new"),
    ("exchange", "unmanifested", "new"),
    ("rename", "old-aside", "old"), ("rename", "new-in-place", "new"), ("rename", "unmanifested", "new"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode,step,expected", KILL_POINTS, ids=[f"{m}-{s}" for m, s, _ in KILL_POINTS])
def test_sigkill_at_each_step_leaves_old_or_new_and_the_next_run_cleans_up(old, tokenizer, tmp_path, mode, step,
                                                                            expected):
    probe = [tmp_path / "a", tmp_path / "b"]
    for p in probe:
        p.mkdir()
    if mode == "exchange" and not _exchange(*probe):
        pytest.skip("this file system cannot exchange two directories atomically (renameat2)")
    old_manifest = (old / "manifest.json").read_bytes()
    env = {KILL_ENV: step, **({SWAP_ENV: "rename"} if mode == "rename" else {})}
    proc = run_prepare(old, tokenizer, env)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    assert hidden_siblings(old), "a killed run leaves its hidden directories behind"
    assert assert_old_or_new(old, old_manifest) == expected

    prepare_again(old)  # the next run removes what the killed one left
    assert hidden_siblings(old) == []
    assert assert_old_or_new(old, old_manifest) == "new"


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_neither(sample_dataset, tokenizer, tmp_path):
    rng = random.Random(0)
    for i in range(4):
        out = Path(shutil.copytree(sample_dataset, tmp_path / f"ds{i}"))
        old_manifest = (out / "manifest.json").read_bytes()
        proc = run_prepare(out, tokenizer, {SWAP_ENV: "rename"} if i % 2 else None)
        time.sleep(rng.uniform(0.1, 0.8))
        proc.kill()
        proc.communicate(timeout=60)
        assert_old_or_new(out, old_manifest)
        prepare_again(out)
        assert hidden_siblings(out) == [] and assert_old_or_new(out, old_manifest) == "new"


def test_a_failed_run_removes_the_parent_directories_it_created(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataPrepError, match="empty corpus"):
        prepare_dataset(empty, tmp_path / "new" / "deep" / "ds", vocab_size=300, seq_len=16, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]


@pytest.mark.slow
def test_ctrl_c_between_the_two_renames_puts_the_old_dataset_back_at_once(old, tokenizer):
    old_manifest = (old / "manifest.json").read_bytes()
    proc = run_prepare(old, tokenizer, {KILL_ENV: "old-aside:INT", SWAP_ENV: "rename"})
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.decode().strip() == "interrupted: nothing was written", stderr
    assert (old / "manifest.json").read_bytes() == old_manifest  # in place without any recovery
    assert hidden_siblings(old) == []
    open_dataset(old, verify="full")
