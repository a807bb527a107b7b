"""The manifest schema check: every hand-edited or damaged manifest is one DatasetError line naming the key.

Each case edits a real prepared dataset's manifest and opens it through `data_prep.open_dataset`; a few also go
through `python -m trainable --data DIR --device cpu`, which must print that one line and no traceback.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from data_prep import DatasetError, open_dataset

ROOT = Path(__file__).resolve().parents[1]
Edit = Callable[[dict], object]


def _set(path: str, value) -> Edit:
    """An edit that sets (or, for value DELETE, removes) a dotted key; `[i]` indexes a list."""
    def edit(m: dict) -> None:
        *parents, last = path.replace("[", ".").replace("]", "").split(".")
        node = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return edit


DELETE = object()
SHARD = "splits.train.shards[0]"
CASES: dict[str, tuple[Edit, str]] = {
    "shards missing": (_set("splits.train.shards", DELETE), "splits.train.shards is missing"),
    "sha256 missing": (_set(f"{SHARD}.sha256", DELETE), f"{SHARD}.sha256 is missing"),
    "sha256 not hex": (_set(f"{SHARD}.sha256", "abc"), f'{SHARD}.sha256 must be 64 lowercase hex digits, got "abc"'),
    "splits a list": (_set("splits", ["train", "val"]), 'splits must be an object, got ["train", "val"]'),
    "splits empty": (_set("splits", {}), "splits is empty"),
    "unknown split": (lambda m: m["splits"].update(dev=m["splits"]["val"]), "splits.dev is not a split name"),
    "vocab a string": (_set("vocab_size", "512"), 'vocab_size must be an integer, got "512"'),
    "vocab a float": (_set("vocab_size", 512.0), "vocab_size must be an integer, got 512.0"),
    "vocab a bool": (_set("vocab_size", True), "vocab_size must be an integer, got true"),
    "vocab NaN": (_set("vocab_size", float("nan")), "vocab_size must be an integer, got nan"),
    "vocab 1": (_set("vocab_size", 1), "vocab_size must be in 2..4294967296, got 1"),
    "vocab > 2**32": (_set("vocab_size", 2**32 + 1), "vocab_size must be in 2..4294967296, got 4294967297"),
    "vocab vs dtype": (_set("vocab_size", 70_000), "dtype is uint16 but vocab_size 70000 takes uint32"),
    "dtype unknown": (_set("dtype", "int8"), 'dtype must be one of uint16, uint32, got "int8"'),
    "shard path ../x": (_set(f"{SHARD}.path", "../x"), f'{SHARD}.path "../x" is not a path inside the dataset'),
    "shard path absolute": (_set(f"{SHARD}.path", "/etc/passwd"), f'{SHARD}.path "/etc/passwd" is not a path inside'),
    "shard path empty": (_set(f"{SHARD}.path", ""), f'{SHARD}.path "" is not a path inside the dataset directory'),
    "shard path twice": (lambda m: m["splits"]["val"]["shards"][0].update(path=m["splits"]["train"]["shards"][0]["path"]),
                         "splits.val.shards[0].path \"train/00000.arrow\" is listed twice"),
    "tokenizer path escapes": (_set("tokenizer_path", "../../tok.json"), 'tokenizer_path "../../tok.json" is not a path'),
    "shard a string": (_set(SHARD, "train/00000.arrow"), f'{SHARD} must be an object, got "train/00000.arrow"'),
    "shards null": (_set("splits.train.shards", None), "splits.train.shards must be a list, got null"),
    "seq_len huge": (_set("seq_len", 10**12), "seq_len must be in 2..16777216, got 1000000000000"),
    "row_len wrong": (_set("row_len", 64), "row_len must be seq_len + 1 = 65, got 64"),
    "eot_id out of vocab": (_set("eot_id", 512), "eot_id must be in 0..511, got 512"),
    "seed negative": (_set("seed", -1), "seed must be >= 0, got -1"),
    "num_rows off": (lambda m: m["splits"]["train"].update(num_rows=m["splits"]["train"]["num_rows"] + 1),
                     "splits.train.num_tokens + num_pad_tokens"),
    "pad too long": (_set("splits.train.num_pad_tokens", 65), "splits.train.num_pad_tokens must be in 0..64, got 65"),
    "num_bytes a string": (_set(f"{SHARD}.num_bytes", "big"), f'{SHARD}.num_bytes must be an integer, got "big"'),
    "tokenizer unknown": (_set("tokenizer", "sentencepiece"), 'tokenizer must be one of bpe, gpt2, got "sentencepiece"'),
    "shard_format missing": (_set("shard_format", DELETE), "shard_format is missing"),
    "shard_format unknown": (_set("shard_format", "parquet"), 'shard_format must be one of arrow_stream, arrow_file'),
    "format_version a string": (_set("format_version", "2"), 'format_version must be an integer >= 1, got "2"'),
    "format_version missing": (_set("format_version", DELETE), "format_version is missing"),
}


@pytest.fixture(scope="module")
def good(sample_dataset) -> dict:
    return json.loads((sample_dataset / "manifest.json").read_text())


def broken_copy(sample_dataset: Path, dest: Path, good: dict, edit: Edit) -> Path:
    shutil.copytree(sample_dataset, dest)
    manifest = copy.deepcopy(good)
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_manifest_is_one_line_naming_the_key(case, sample_dataset, good, tmp_path):
    edit, expected = CASES[case]
    ds = broken_copy(sample_dataset, tmp_path / "ds", good, edit)
    with pytest.raises(DatasetError) as info:
        open_dataset(ds, verify="size")
    message = str(info.value)
    assert message.startswith(f"{ds}/manifest.json: {expected}"), message
    assert "\n" not in message


def test_raw_text_damage_is_one_line(sample_dataset, tmp_path):
    ds = Path(shutil.copytree(sample_dataset, tmp_path / "ds"))
    text = (ds / "manifest.json").read_text()
    for damaged, expected in [(text.replace('"vocab_size": 512', '"vocab_size": 1' + "0" * 5000), "not valid JSON"),
                              ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
                              (text[: len(text) // 2], "not valid JSON"), ("[1, 2]", "is not a JSON object")]:
        (ds / "manifest.json").write_text(damaged)
        with pytest.raises(DatasetError, match=expected) as info:
            open_dataset(ds)
        assert "\n" not in str(info.value)


def test_the_good_manifest_passes(sample_dataset):
    assert open_dataset(sample_dataset, verify="full").vocab_size == 512


@pytest.mark.slow
def test_trainable_cli_prints_the_one_line(sample_dataset, good, tmp_path):
    cases = ["sha256 missing", "splits a list", "shard path ../x", "vocab > 2**32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    procs = {}
    for i, case in enumerate(cases):
        ds = broken_copy(sample_dataset, tmp_path / f"ds{i}", good, CASES[case][0])
        args = ["-m", "trainable", "--data", str(ds), "--device", "cpu", "--metrics-out", str(tmp_path / f"m{i}.jsonl")]
        procs[case] = (ds, subprocess.Popen([sys.executable, *args], env=env, cwd=tmp_path, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for case, (ds, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert "Traceback" not in stdout + stderr, stderr
        assert proc.returncode == 2, stderr
        expected = f"python -m trainable: error: data_dir {ds}: {ds}/manifest.json: {CASES[case][1]}"
        assert stderr.splitlines() == [stderr.strip()] and stderr.startswith(expected), stderr
    assert not list(tmp_path.glob("m*.jsonl"))
