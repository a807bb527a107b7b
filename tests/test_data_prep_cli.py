"""`python -m data_prep prepare` as users run it: success, and every bad input as one line with exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import open_dataset
from data_prep.synthetic import synthetic_documents, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("cli") / "pl.jsonl", synthetic_documents(80_000, max_sentences=6))


def test_prepare_writes_a_dataset_and_says_where(corpus, tmp_path):
    out = tmp_path / "ds"
    result = run_cli("prepare", "--input", str(corpus), "--out", str(out), "--vocab-size", "300", "--seq-len", "16",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"prepared dataset written to {out}" in result.stdout
    assert open_dataset(out, verify="full").seq_len == 16


def _bad_inputs(corpus: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    bad_utf8 = tmp / "bad.txt"
    good = "Zażółć gęślą jaźń.\n\nDrugi dok".encode()
    bad_utf8.write_bytes(good + b"\xffument\n")
    surrogate = tmp / "surrogate.jsonl"
    surrogate.write_text('{"text": "dobrze"}\n{"text": "\\ud83d zle"}\n', encoding="utf-8")
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    return {
        "missing input": (["--input", str(tmp / "nope.jsonl")], "does not exist"),
        "empty corpus": (["--input", str(empty)], "empty corpus"),
        "invalid utf-8": (["--input", str(bad_utf8)], f"invalid UTF-8 at byte {len(good)} (line 3)"),
        "vocab below bytes": (["--input", str(corpus), "--vocab-size", "200"], "below the byte alphabet"),
        "seq len < 2": (["--input", str(corpus), "--seq-len", "1"], "--seq-len 2 or more"),
        "existing output": (["--input", str(corpus), "--out", str(taken)], "already exists and is not empty"),
        "bad number": (["--input", str(corpus), "--seq-len", "many"], "invalid int value"),
        "unsupported file": (["--input", str(ROOT / "pyproject.toml")], "is not one of"),
        "lone surrogate": (["--input", str(surrogate)], ":2: text has an unpaired UTF-16 surrogate"),
        "overwrite foreign dir": (["--input", str(corpus), "--out", str(taken), "--overwrite"], "refusing to overwrite"),
    }


@pytest.mark.parametrize("case", ["missing input", "empty corpus", "invalid utf-8", "vocab below bytes",
                                  "seq len < 2", "existing output", "bad number", "unsupported file",
                                  "lone surrogate", "overwrite foreign dir"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, corpus, tmp_path):
    args, message = _bad_inputs(corpus, tmp_path)[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = run_cli("prepare", *args, "--quiet")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no output, no temp dir
