"""Write one split's token stream as fixed-length rows in Arrow IPC stream shards (Contract 1).

The IPC *stream* format (not the IPC file format) is what HF datasets' `Dataset.from_file` reads, and pyarrow
still reads it zero-copy from a memory map: the writer pads every buffer to a multiple of 8 bytes, so the
uint16/uint32 token buffers are aligned numpy views of the map.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .reader import TOKENS_COLUMN, file_sha256
from .schema import DTYPES, dtype_for

DEFAULT_SHARD_ROWS = 8192
SHARD_FORMAT = "arrow_stream"

__all__ = ["DEFAULT_SHARD_ROWS", "SHARD_FORMAT", "ShardWriter", "dtype_for"]


class ShardWriter:
    """Cuts `doc EOT doc EOT ...` into rows of `row_len` tokens; every `shard_rows` rows become one shard file.

    Memory is one shard's buffer (plus the batch being appended), whatever the corpus size.
    """

    def __init__(self, split_dir: Path, *, row_len: int, dtype: str, eot_id: int, shard_rows: int = DEFAULT_SHARD_ROWS):
        self.split_dir = split_dir
        self.row_len = row_len
        self.dtype = dtype
        self.eot_id = eot_id
        self.shard_rows = shard_rows
        self.schema = pa.schema([pa.field(TOKENS_COLUMN, pa.list_(DTYPES[dtype], row_len), nullable=False)])
        self._buffer = np.empty(shard_rows * row_len, dtype=dtype)
        self._filled = 0
        self.shards: list[dict] = []
        self.num_documents = 0
        self.num_tokens = 0
        self.num_pad_tokens = 0
        split_dir.mkdir(parents=True, exist_ok=True)

    def append(self, tokens: np.ndarray, num_documents: int) -> None:
        """Append a piece of the token stream (already EOT-terminated documents)."""
        self.num_documents += num_documents
        self.num_tokens += len(tokens)
        pos = 0
        while pos < len(tokens):
            take = min(len(tokens) - pos, len(self._buffer) - self._filled)
            self._buffer[self._filled:self._filled + take] = tokens[pos:pos + take]
            self._filled += take
            pos += take
            if self._filled == len(self._buffer):
                self._flush()

    def close(self) -> dict:
        """Pad the last row with EOT, write the last shard, and return the split's manifest entry."""
        if self._filled % self.row_len:
            pad = self.row_len - self._filled % self.row_len
            self._buffer[self._filled:self._filled + pad] = self.eot_id
            self._filled += pad
            self.num_pad_tokens = pad
        if self._filled:
            self._flush()
        return {
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "num_rows": sum(s["num_rows"] for s in self.shards),
            "num_pad_tokens": self.num_pad_tokens,
            "shards": self.shards,
        }

    def _flush(self) -> None:
        rows = self._filled // self.row_len
        values = pa.array(self._buffer[:self._filled], type=DTYPES[self.dtype])
        column = pa.FixedSizeListArray.from_arrays(values, self.row_len)
        path = self.split_dir / f"{len(self.shards):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, ipc.new_stream(sink, self.schema) as writer:
            writer.write_batch(pa.record_batch([column], schema=self.schema))
        real_tokens = self._filled - self.num_pad_tokens
        self.shards.append({
            "path": f"{self.split_dir.name}/{path.name}",
            "num_rows": rows,
            "num_tokens": real_tokens,
            "num_bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        })
        self._filled = 0
