"""Stream documents out of a corpus: speakleash `.jsonl.zst`, `.jsonl` with a "text" field, `.txt`, or a directory.

Every reader works line by line on bytes and decodes each line strictly, so memory stays bounded by the longest
document and invalid UTF-8 is reported with its file and byte offset (for `.zst` files: the offset into the
decompressed data, since that is where the text lives). A `.zst` file is decoded frame by frame, so a file cut
short (a partial download) or damaged is refused with the offset into the compressed file, never read as a
shorter corpus.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import DataPrepError
from .zstd import ZstdFrames

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FRACTIONS = (0.85, 0.10, 0.05)
_SPLIT_CUTS = (int(0.85 * 2**64), int(0.95 * 2**64))


def split_of(text: str, seed: int) -> str:
    """Document-level split: a keyed hash of the text picks the bucket, so it depends on (seed, text) only.

    Identical documents always land in the same split (no train/val leakage through duplicates) and the
    assignment does not change when the corpus is reordered or grows.
    """
    key = str(seed).encode()
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest(), "little")
    return "train" if h < _SPLIT_CUTS[0] else "val" if h < _SPLIT_CUTS[1] else "test"


class _CountingReader(io.RawIOBase):
    """Counts bytes pulled from the file on disk, for a progress bar in on-disk (compressed) bytes."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None]):
        self._raw = raw
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._on_read(n)
        return n or 0


def _utf8_lines(path: Path, stream: BinaryIO, where: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) for each line of a byte stream; bad UTF-8 is one clear error."""
    offset = 0
    for lineno, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataPrepError(f"{path}: invalid UTF-8 at byte {offset + exc.start}{where} (line {lineno})") from None
        offset += len(raw)
        yield lineno, line


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl_documents(path: Path, lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataPrepError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataPrepError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
        if "\\u" in line and not _is_encodable(text):  # only a \uD800-style escape can smuggle in a lone surrogate
            raise DataPrepError(f"{path}:{lineno}: text has an unpaired UTF-16 surrogate escape (not valid Unicode)")
        if text.strip():
            yield text


def _read_jsonl(path: Path, on_read: Callable[[int], None]) -> Iterator[str]:
    with open(path, "rb", buffering=0) as raw:
        stream = io.BufferedReader(_CountingReader(raw, on_read), 1 << 20)
        yield from _jsonl_documents(path, _utf8_lines(path, stream, ""))


def _read_jsonl_zst(path: Path, on_read: Callable[[int], None]) -> Iterator[str]:
    with open(path, "rb", buffering=0) as raw:
        counted = io.BufferedReader(_CountingReader(raw, on_read), 1 << 20)
        stream = io.BufferedReader(ZstdFrames(path, counted), 1 << 20)
        yield from _jsonl_documents(path, _utf8_lines(path, stream, " of the decompressed data"))


def _read_txt(path: Path, on_read: Callable[[int], None]) -> Iterator[str]:
    """Plain text: documents are separated by one or more blank lines; line breaks inside a document are kept."""
    with open(path, "rb", buffering=0) as raw:
        stream = io.BufferedReader(_CountingReader(raw, on_read), 1 << 20)
        paragraph: list[str] = []
        for _, line in _utf8_lines(path, stream, ""):
            if line.strip():
                paragraph.append(line.rstrip("\r\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)


# Longest suffix first, so "x.jsonl.zst" is not taken for something else.
READERS: dict[str, Callable[[Path, Callable[[int], None]], Iterator[str]]] = {
    ".jsonl.zst": _read_jsonl_zst,
    ".jsonl": _read_jsonl,
    ".txt": _read_txt,
}


def format_of(path: Path) -> str | None:
    """The READERS key for a file name, or None when the format is not supported."""
    name = path.name.lower()
    return next((suffix for suffix in READERS if name.endswith(suffix)), None)


def corpus_stem(path: Path) -> str:
    """`dir` -> "dir", `x.jsonl.zst` -> "x": the name default output directories are built from."""
    try:
        fmt = format_of(path) if path.is_file() else None
    except OSError:  # a name too long to stat: Corpus.from_path reports it
        fmt = None
    return path.name[: -len(fmt)] if fmt else path.name


@dataclass(frozen=True)
class Corpus:
    """The input files of one prepare run, resolved and checked once."""

    files: tuple[Path, ...]

    @classmethod
    def from_path(cls, path: str | Path) -> "Corpus":
        path = Path(path)
        try:
            return cls._resolve(path)
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise DataPrepError(f"cannot read input {path}: {exc.strerror}") from None

    @classmethod
    def _resolve(cls, path: Path) -> "Corpus":
        if not path.exists():
            raise DataPrepError(f"input {path} does not exist")
        if path.is_dir():
            files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and format_of(p)))
            if not files:
                raise DataPrepError(f"input directory {path} has no {', '.join(READERS)} files")
            return cls(files)
        if not path.is_file():  # opening a named pipe would block until someone writes to it
            raise DataPrepError(f"input {path} is not a regular file (a named pipe, socket or device): pass a file "
                                "or a directory of them")
        if not format_of(path):
            raise DataPrepError(f"input {path} is not one of {', '.join(READERS)} (or a directory of them)")
        return cls((path,))

    @property
    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def sources(self) -> list[dict]:
        """What the manifest records about the input (no timestamps: equal inputs give equal manifests)."""
        return [{"path": str(p.resolve()), "format": format_of(p).lstrip("."), "num_bytes": p.stat().st_size}
                for p in self.files]

    def documents(self, on_read: Callable[[int], None] = lambda n: None) -> Iterator[str]:
        """Every non-blank document of every file, in file order."""
        for path in self.files:
            yield from READERS[format_of(path)](path, on_read)

    def batches(self, max_chars: int, on_read: Callable[[int], None] = lambda n: None) -> Iterator[list[str]]:
        """Documents grouped into lists of about `max_chars` characters (bounded memory, big Rust batches)."""
        batch: list[str] = []
        chars = 0
        for doc in self.documents(on_read):
            batch.append(doc)
            chars += len(doc)
            if chars >= max_chars:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch
