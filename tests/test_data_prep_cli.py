"""`python -m data_prep prepare` as users run it: success, and every bad input as one line with exit status 2."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import DataPrepError, open_dataset, prepare_dataset
from data_prep.__main__ import build_parser
from data_prep.synthetic import synthetic_documents, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("cli") / "pl.jsonl", synthetic_documents(80_000, max_sentences=6))


@pytest.mark.slow
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
        "unwritable out parent": (["--input", str(corpus), "--out", "/proc/memeff-sweep-test/ds"],
                                  "error: cannot create directory /proc/memeff-sweep-test: No such file or directory"),
        "out name too long": (["--input", str(corpus), "--out", str(tmp / ("a" * 240))],
                              "error: output directory name aaaa"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing input", "empty corpus", "invalid utf-8", "vocab below bytes",
                                  "seq len < 2", "existing output", "bad number", "unsupported file",
                                  "lone surrogate", "overwrite foreign dir", "unwritable out parent",
                                  "out name too long"])
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


@pytest.mark.slow
@pytest.mark.parametrize("out", [".", "..", "../here"])
def test_out_of_the_current_directory_or_above_is_refused(out, sample_dataset, tmp_path):
    """`cd prepared/x && prepare --out . --overwrite` must not replace the directory the user stands in."""
    here = Path(shutil.copytree(sample_dataset, tmp_path / "here"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run_cli("prepare", "--out", out, "--overwrite", "--quiet", "--tokenizer-path", str(here / "tokenizer.json"),
                     cwd=here)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == (f"error: refusing to write the dataset to {out}: it is the current directory or holds "
                             "it; pass --out of a new directory, e.g. --out prepared/NAME\n")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    open_dataset(here, verify="full")


def test_help_of_every_subcommand_shows_every_default():
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    assert set(subparsers.choices) == {"list", "download", "prepare"}
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        assert "%(default)" not in text
        for action in sub._actions:
            if action.dest != "help" and action.option_strings:
                assert action.help and "(default: " in action.help, f"{name} {action.option_strings[0]}"
        assert "(default: " in text


ABSURD = {  # docs/bad_inputs.md rows 108-111 run the same through the CLI
    "vocab": (dict(vocab_size=10**12), "vocab size 1000000000000 is more than uint32 token ids can number: use "
                                       "--vocab-size 4294967296 or less"),
    "seq len": (dict(seq_len=10**12), "seq len 1000000000000 is too long: use --seq-len 16777216 or less"),
    "shard rows": (dict(shard_rows=10**12), "shard rows 1000000000000 of 513 tokens would hold 513,000,000,000,000 "
                                            "tokens in memory per shard: use --shard-rows 4186127 or less"),
    "shard buffer": (dict(seq_len=2**20), "shard rows 8192 of 1048577 tokens would hold 8,589,942,784 tokens"),
    "seed": (dict(seed=2**64), "seed must be in 0..18446744073709551615, got 18446744073709551616"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_settings_are_refused_before_any_work(case, tmp_path):
    settings, message = ABSURD[case]
    with pytest.raises(DataPrepError, match=re.escape(message)):
        prepare_dataset(out_dir=tmp_path / "out", progress=False, **settings)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,message", [
    ("ż" * 128, f"output path component {'ż' * 128} is 256 bytes long: a file name has at most 255 bytes"),
    ("a" * 234, f"output directory name {'a' * 234} is 234 bytes long: use at most 233"),
])
def test_an_over_long_out_is_refused_before_any_work(name, message, tmp_path):
    with pytest.raises(DataPrepError, match=re.escape(message)):
        prepare_dataset(out_dir=tmp_path / name, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_longest_allowed_out_name_works(sample_dataset, tmp_path):
    out = prepare_dataset(out_dir=tmp_path / ("a" * 233), tokenizer_path=sample_dataset, seq_len=16, progress=False)
    assert (out / "manifest.json").is_file()  # its hidden temp sibling (22 bytes longer) fit too


def test_an_unwritable_out_is_refused_before_any_work():
    with pytest.raises(DataPrepError, match=r"cannot write the output /proc/memeff-sweep-test: creating a directory "
                                            r"in /proc failed \(.+\)"):
        prepare_dataset(out_dir="/proc/memeff-sweep-test", progress=False)
