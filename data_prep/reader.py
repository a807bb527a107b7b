"""Read a prepared dataset (Contract 1): memory-mapped Arrow shards served as seeded int64 batches.

Rows are gathered from the mmapped `fixed_size_list` buffers through numpy views, so a batch costs one
fancy-indexing copy per shard it touches and nothing per row in Python. Shards are Arrow IPC streams
(format_version 2, what HF datasets' `Dataset.from_file` reads) or IPC files (format_version 1); both are read
zero-copy from the memory map.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .atomic import MANIFEST_NAME, restore_missing
from .errors import DataPrepError, DatasetError
from .schema import DTYPES, FORMAT_VERSION, check_manifest, shard_format

TOKENS_COLUMN = "tokens"
VERIFY_MODES = ("none", "size", "full")
Verify = Literal["none", "size", "full"]
_OPENERS = {"arrow_stream": ipc.open_stream, "arrow_file": ipc.open_file}

__all__ = ["DTYPES", "FORMAT_VERSION", "MANIFEST_NAME", "TOKENS_COLUMN", "PreparedDataset", "TokenSplit", "file_sha256",
           "open_dataset", "read_manifest", "verify_shards"]


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Streaming sha256 (shards can be large; never read one whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Chunk:
    """One record batch of one shard as a (rows, row_len) numpy view over the mmapped file."""

    start_row: int
    rows: np.ndarray


class TokenSplit:
    """One split (`train`/`val`/`test`) of a prepared dataset: fixed-length token rows in shards."""

    def __init__(self, root: Path, name: str, info: dict, row_len: int, dtype: str, fmt: str = "arrow_stream"):
        self.name = name
        self.shard_format = fmt
        self.row_len = row_len
        self.num_rows = int(info["num_rows"])
        self.num_tokens = int(info["num_tokens"])
        self.num_documents = int(info["num_documents"])
        self.num_pad_tokens = int(info["num_pad_tokens"])
        self._mmaps: list[pa.MemoryMappedFile] = []
        self._chunks = self._open_shards(root, info["shards"], pa.list_(DTYPES[dtype], row_len))
        self._starts = np.array([c.start_row for c in self._chunks], dtype=np.int64)
        if sum(len(c.rows) for c in self._chunks) != self.num_rows:
            raise DatasetError(f"split {name!r}: shards hold a different number of rows than the manifest's "
                               f"{self.num_rows}")

    def _open_shards(self, root: Path, shards: list[dict], expected: pa.DataType) -> list[_Chunk]:
        chunks: list[_Chunk] = []
        start = 0
        for shard in shards:
            path = root / shard["path"]
            shard_rows = 0
            for column in self._columns(path, expected):
                rows = column.flatten().to_numpy(zero_copy_only=True).reshape(len(column), self.row_len)
                chunks.append(_Chunk(start, rows))
                start += len(rows)
                shard_rows += len(rows)
            if shard_rows != int(shard["num_rows"]):
                raise DatasetError(f"shard {path} holds {shard_rows} rows but the manifest says {shard['num_rows']}")
        return chunks

    def _columns(self, path: Path, expected: pa.DataType) -> Iterator[pa.FixedSizeListArray]:
        """The `tokens` column of each record batch of one shard, as zero-copy views of its memory map."""
        try:
            source = pa.memory_map(str(path), "r")
            reader = _OPENERS[self.shard_format](source)
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"cannot read shard {path} (an {self.shard_format.replace('_', ' IPC ')}): "
                               f"{exc}") from None
        self._mmaps.append(source)
        field = reader.schema.field(TOKENS_COLUMN) if TOKENS_COLUMN in reader.schema.names else None
        if field is None or field.type != expected:
            raise DatasetError(f"shard {path} has schema {reader.schema} but the manifest says "
                               f"{TOKENS_COLUMN}: {expected}")
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
            if isinstance(reader, ipc.RecordBatchFileReader) else reader
        try:
            for batch in batches:
                column = batch.column(TOKENS_COLUMN)
                if column.null_count:
                    raise DatasetError(f"shard {path} has null rows")
                yield column
        except (OSError, pa.ArrowException) as exc:  # a stream cut short reads as OSError
            raise DatasetError(f"cannot read shard {path}: {exc}") from None

    def num_batches(self, batch_size: int) -> int:
        """Full batches per epoch (the last partial batch is dropped)."""
        _check_batch_size(batch_size)
        return self.num_rows // batch_size

    def permutation(self, *, seed: int, epoch: int = 0, shuffle: bool = True) -> np.ndarray:
        """Row order of one epoch: drawn from (seed, epoch) only, so it is the same at every batch size."""
        if not shuffle:
            return np.arange(self.num_rows, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
        return rng.permutation(self.num_rows).astype(np.int64, copy=False)

    def get_rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at `indices` (in that order) as an int64 array of shape (len(indices), row_len)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row index out of range for split {self.name!r} with {self.num_rows} rows")
        out = np.empty((len(indices), self.row_len), dtype=np.int64)
        if len(self._chunks) == 1:
            out[:] = self._chunks[0].rows[indices]
            return out
        chunk_of = np.searchsorted(self._starts, indices, side="right") - 1
        for c in np.unique(chunk_of):
            mask = chunk_of == c
            chunk = self._chunks[c]
            out[mask] = chunk.rows[indices[mask] - chunk.start_row]
        return out

    def iter_batches(self, batch_size: int, *, seed: int, epoch: int = 0, shuffle: bool = True,
                     start_batch: int = 0) -> Iterator[np.ndarray]:
        """Yield int64 (batch_size, row_len) batches of one epoch; `start_batch` resumes mid-epoch."""
        total = self.num_batches(batch_size)
        if not 0 <= start_batch <= total:
            raise DataPrepError(f"start_batch {start_batch} is outside 0..{total} for split {self.name!r} "
                                f"at batch size {batch_size}")
        order = self.permutation(seed=seed, epoch=epoch, shuffle=shuffle)
        for b in range(start_batch, total):
            yield self.get_rows(order[b * batch_size:(b + 1) * batch_size])

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"TokenSplit({self.name!r}, num_rows={self.num_rows}, row_len={self.row_len})"


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataPrepError(f"batch_size must be a positive integer, got {batch_size!r}")


class PreparedDataset:
    """A prepared dataset directory: its manifest, its splits (opened lazily) and its tokenizer."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.vocab_size: int = int(manifest["vocab_size"])
        self.seq_len: int = int(manifest["seq_len"])
        self.row_len: int = int(manifest["row_len"])
        self.eot_id: int = int(manifest["eot_id"])
        self.dtype: str = manifest["dtype"]
        self._splits: dict[str, TokenSplit] = {}

    def split(self, name: str) -> TokenSplit:
        """The `train`, `val` or `test` split, memory-mapped on first use."""
        if name not in self.manifest["splits"]:
            raise DatasetError(f"{self.path} has no split {name!r} (has: {', '.join(self.manifest['splits'])})")
        if name not in self._splits:
            self._splits[name] = TokenSplit(self.path, name, self.manifest["splits"][name], self.row_len, self.dtype,
                                            shard_format(self.manifest))
        return self._splits[name]

    def shard_paths(self, name: str) -> list[Path]:
        """A split's shard files in row order: `concatenate_datasets([Dataset.from_file(str(p)) for p in ...])`
        loads the split with HF datasets (format_version 2 shards; memory-mapped, nothing copied)."""
        if name not in self.manifest["splits"]:
            raise DatasetError(f"{self.path} has no split {name!r} (has: {', '.join(self.manifest['splits'])})")
        return [self.path / shard["path"] for shard in self.manifest["splits"][name]["shards"]]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer_path"]

    def load_tokenizer(self):
        """The tokenizer the shards were made with (a `tokenizers.Tokenizer` for bpe, a transformers one for gpt2)."""
        if self.manifest["tokenizer"] == "bpe":
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(self.tokenizer_path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_path))

    def __repr__(self) -> str:
        return (f"PreparedDataset({str(self.path)!r}, tokenizer={self.manifest['tokenizer']!r}, "
                f"vocab_size={self.vocab_size}, seq_len={self.seq_len})")


def read_manifest(path: Path) -> dict:
    """Load `manifest.json` and check it against the schema; every problem is one DatasetError line."""
    manifest_path = path / MANIFEST_NAME
    restore_missing(path)  # a prepare killed mid-swap: its complete old dataset goes back in place
    if not manifest_path.is_file():
        raise DatasetError(f"{path} is not a prepared dataset (no {MANIFEST_NAME}): run `python -m data_prep prepare`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, or a 5000-digit int
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DatasetError(f"{manifest_path} is not valid JSON: {first_line}") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{manifest_path} is not a JSON object")
    if "format_version" not in manifest:
        raise DatasetError(f"{manifest_path}: format_version is missing")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DatasetError(f"{manifest_path}: format_version must be an integer >= 1, got "
                           f"{json.dumps(version)[:40]}")
    if version > FORMAT_VERSION:
        raise DatasetError(f"{path} has format_version {version}, newer than this data_prep supports "
                           f"({FORMAT_VERSION}): upgrade data_prep or re-run `python -m data_prep prepare`")
    check_manifest(manifest, manifest_path)
    return manifest


def verify_shards(path: Path, manifest: dict, verify: Verify) -> None:
    """Check every shard exists and has the manifest's byte size ("size") or sha256 ("full")."""
    if verify == "none":
        return
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard_path = path / shard["path"]
            if not shard_path.is_file():
                raise DatasetError(f"shard {shard_path} is missing")
            size = shard_path.stat().st_size
            if size != shard["num_bytes"]:
                raise DatasetError(f"shard {shard_path} has {size} bytes but the manifest says {shard['num_bytes']} "
                                   "(truncated or rewritten): re-run `python -m data_prep prepare`")
            if verify == "full" and file_sha256(shard_path) != shard["sha256"]:
                raise DatasetError(f"shard {shard_path} does not match its sha256 in the manifest (corrupted): "
                                   "re-run `python -m data_prep prepare`")


def open_dataset(path: str | Path, verify: Verify = "size") -> PreparedDataset:
    """Open a prepared dataset; `verify` checks the shards against the manifest: "none", "size" or "full" (sha256)."""
    if verify not in VERIFY_MODES:
        raise DataPrepError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    path = Path(path)
    manifest = read_manifest(path)
    verify_shards(path, manifest, verify)
    return PreparedDataset(path, manifest)
