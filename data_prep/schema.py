"""The manifest's schema (Contract 1), checked key by key before anything trusts it.

A hand-edited or damaged manifest would otherwise surface as a KeyError or a numpy error deep in the reader;
here every problem is one DatasetError line naming the manifest and the key (`splits.train.shards[0].sha256`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import pyarrow as pa

from .errors import DatasetError

FORMAT_VERSION = 2  # 2: shards are Arrow IPC streams (HF datasets' Dataset.from_file reads them); 1: IPC files
SHARD_FORMATS = ("arrow_stream", "arrow_file")
LEGACY_SHARD_FORMAT = "arrow_file"  # what every format_version 1 dataset holds
TOKENIZER_KINDS = ("bpe", "gpt2")
SPLITS = ("train", "val", "test")
DTYPES = {"uint16": pa.uint16(), "uint32": pa.uint32()}
MAX_VOCAB_SIZE = 2**32  # token ids 0 .. 2**32 - 1 fit the widest dtype, uint32
MIN_SEQ_LEN = 2
MAX_SEQ_LEN = 2**24  # far beyond any context trained here; keeps a row a valid Arrow fixed_size_list
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def dtype_for(vocab_size: int) -> str:
    """The narrowest dtype that holds every token id of the vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _show(value: Any) -> str:
    """A value for a one-line message (a list or object is cut short)."""
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Keys:
    """Typed look-ups that fail with the manifest's path and the dotted key."""

    def __init__(self, manifest_path: Path):
        self.manifest_path = manifest_path

    def fail(self, key: str, problem: str) -> NoReturn:
        raise DatasetError(f"{self.manifest_path}: {key} {problem}")

    def value(self, obj: dict, key: str, prefix: str) -> tuple[Any, str]:
        name = f"{prefix}.{key}" if prefix else key
        if key not in obj:
            self.fail(name, "is missing")
        return obj[key], name

    def integer(self, obj: dict, key: str, prefix: str = "", lo: int = 0, hi: int | None = None) -> int:
        value, name = self.value(obj, key, prefix)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(name, f"must be an integer, got {_show(value)}")
        if value < lo or (hi is not None and value > hi):
            self.fail(name, f"must be in {lo}..{hi}, got {value}" if hi is not None else f"must be >= {lo}, got {value}")
        return value

    def string(self, obj: dict, key: str, prefix: str = "", choices: tuple[str, ...] | None = None) -> str:
        value, name = self.value(obj, key, prefix)
        if not isinstance(value, str):
            self.fail(name, f"must be a string, got {_show(value)}")
        if choices is not None and value not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}, got {_show(value)}")
        return value

    def mapping(self, obj: dict, key: str, prefix: str = "") -> dict:
        value, name = self.value(obj, key, prefix)
        if not isinstance(value, dict):
            self.fail(name, f"must be an object, got {_show(value)}")
        return value

    def inside(self, obj: dict, key: str, prefix: str = "") -> str:
        """A relative path that stays inside the dataset directory (no `..`, not absolute)."""
        value = self.string(obj, key, prefix)
        name = f"{prefix}.{key}" if prefix else key
        parts = PurePosixPath(value).parts
        if not parts or parts[0] == "/" or ".." in parts or "\0" in value or "\\" in value:
            self.fail(name, f"{_show(value)} is not a path inside the dataset directory")
        return value


def check_manifest(manifest: dict, manifest_path: Path) -> None:
    """Every key the reader relies on has the right type, range and consistency (format_version already checked)."""
    keys = _Keys(manifest_path)
    version = manifest["format_version"]
    if version >= 2 or "shard_format" in manifest:
        shard_format = keys.string(manifest, "shard_format", choices=SHARD_FORMATS)
        if version == 1 and shard_format != LEGACY_SHARD_FORMAT:
            keys.fail("shard_format", f"must be {LEGACY_SHARD_FORMAT} in a format_version 1 manifest")
    keys.string(manifest, "tokenizer", choices=TOKENIZER_KINDS)
    keys.inside(manifest, "tokenizer_path")
    vocab_size = keys.integer(manifest, "vocab_size", lo=2, hi=MAX_VOCAB_SIZE)
    seq_len = keys.integer(manifest, "seq_len", lo=MIN_SEQ_LEN, hi=MAX_SEQ_LEN)
    row_len = keys.integer(manifest, "row_len")
    if row_len != seq_len + 1:
        keys.fail("row_len", f"must be seq_len + 1 = {seq_len + 1}, got {row_len}")
    keys.integer(manifest, "eot_id", lo=0, hi=vocab_size - 1)
    dtype = keys.string(manifest, "dtype", choices=tuple(DTYPES))
    if dtype != dtype_for(vocab_size):
        keys.fail("dtype", f"is {dtype} but vocab_size {vocab_size} takes {dtype_for(vocab_size)}")
    keys.integer(manifest, "seed")
    splits = keys.mapping(manifest, "splits")
    if not splits:
        keys.fail("splits", "is empty")
    seen: set[str] = set()
    for name, split in splits.items():
        if name not in SPLITS:
            keys.fail(f"splits.{name}", f"is not a split name ({', '.join(SPLITS)})")
        _check_split(keys, splits, name, row_len, version, seen)


def _check_split(keys: _Keys, splits: dict, name: str, row_len: int, version: int, seen: set[str]) -> None:
    prefix = f"splits.{name}"
    split = keys.mapping(splits, name)
    for key in ("num_documents", "num_tokens", "num_rows"):
        keys.integer(split, key, prefix)
    pad = keys.integer(split, "num_pad_tokens", prefix, hi=row_len - 1)
    if split["num_tokens"] + pad != split["num_rows"] * row_len:
        keys.fail(f"{prefix}.num_tokens", f"+ num_pad_tokens ({split['num_tokens']} + {pad}) must be num_rows x row_len "
                                          f"({split['num_rows']} x {row_len})")
    shards, shards_key = keys.value(split, "shards", prefix)
    if not isinstance(shards, list):
        keys.fail(shards_key, f"must be a list, got {_show(shards)}")
    rows = tokens = 0
    for i, shard in enumerate(shards):
        where = f"{shards_key}[{i}]"
        if not isinstance(shard, dict):
            keys.fail(where, f"must be an object, got {_show(shard)}")
        path = keys.inside(shard, "path", where)
        if path in seen:
            keys.fail(f"{where}.path", f"{_show(path)} is listed twice")
        seen.add(path)
        rows += keys.integer(shard, "num_rows", where)
        tokens += keys.integer(shard, "num_tokens", where)
        keys.integer(shard, "num_bytes", where)
        sha256 = keys.string(shard, "sha256", where)
        if version >= 2 and not _SHA256.match(sha256):
            keys.fail(f"{where}.sha256", f"must be 64 lowercase hex digits, got {_show(sha256)}")
    if rows != split["num_rows"]:
        keys.fail(f"{prefix}.num_rows", f"is {split['num_rows']} but its shards hold {rows} rows")
    if tokens != split["num_tokens"]:
        keys.fail(f"{prefix}.num_tokens", f"is {split['num_tokens']} but its shards hold {tokens} tokens")


def shard_format(manifest: dict) -> str:
    """How this dataset's shards are stored (format_version 1 only ever wrote IPC files)."""
    return manifest.get("shard_format", LEGACY_SHARD_FORMAT)


def listed_paths(manifest: dict) -> tuple[set[str], str]:
    """(every file the manifest names, the tokenizer path, which may be a directory of files)."""
    files = {"manifest.json", manifest["tokenizer_path"]}
    for split in manifest["splits"].values():
        files.update(shard["path"] for shard in split["shards"])
    return {str(PurePosixPath(p)) for p in files}, str(PurePosixPath(manifest["tokenizer_path"]))
