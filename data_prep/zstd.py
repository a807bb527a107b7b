"""A `.zst` file's decompressed bytes, frame by frame, refusing a file that is cut short or damaged.

zstandard's `stream_reader` ends quietly when the input ends inside a frame, so a partial download read as a
shorter corpus (or, cut inside its only frame, as an empty one). Here each frame is decoded with its own
decompressor, whose `eof` says whether the frame was finished: input that ends mid-frame is a truncated file,
and a decoder error is damage; both are one DataPrepError line with the byte offset in the compressed file.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import zstandard

from .errors import DataPrepError

PIECE_BYTES = 1 << 16  # compressed bytes per decoder call: bounds the memory one call's output takes
MAX_WINDOW = 2**31  # speakleash files use long-distance windows


class ZstdFrames(io.RawIOBase):
    """Raw reader of the decompressed data of every frame of a zstd stream, in order."""

    def __init__(self, path: Path, compressed: BinaryIO):
        self._path = path
        self._compressed = compressed
        self._context = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        self._frame: zstandard.ZstdDecompressionObj | None = None  # the frame being decoded
        self._frame_start = 0  # compressed offset where that frame began
        self._offset = 0  # compressed bytes consumed by finished frames and the current one
        self._input = b""  # compressed bytes read but not yet given to a decoder
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            if not self._decode_piece():
                return 0
        n = min(len(buffer), len(self._output))
        buffer[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def _decode_piece(self) -> bool:
        """Decode the next piece of input; False at the clean end of the last frame."""
        if not self._input:
            self._input = self._compressed.read(PIECE_BYTES)
            if not self._input:
                if self._frame is not None:
                    raise DataPrepError(f"{self._path}: truncated zstd file: it ends at byte {self._offset} of the "
                                        f"compressed file, inside the frame that starts at byte {self._frame_start} "
                                        "(cut short? download or copy it again)")
                return False
        if self._frame is None:
            self._frame = self._context.decompressobj()
            self._frame_start = self._offset
        piece, self._input = self._input[:PIECE_BYTES], self._input[PIECE_BYTES:]
        try:
            output = self._frame.decompress(piece)
        except zstandard.ZstdError as exc:
            raise DataPrepError(f"{self._path}: damaged zstd data ({exc}) detected by byte "
                                f"{self._offset + len(piece)} of the compressed file") from None
        if self._frame.eof:  # the frame ended inside this piece: the rest starts the next frame
            rest = self._frame.unused_data
            self._offset += len(piece) - len(rest)
            self._input = rest + self._input
            self._frame = None
        else:
            self._offset += len(piece)
        self._output = memoryview(output)
        return True
