"""Damaged and unusual corpus inputs: a cut or corrupted `.jsonl.zst`, a named pipe. Each is one clear line."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
import zstandard

from data_prep import DataPrepError, prepare_dataset
from data_prep.corpus import Corpus
from data_prep.synthetic import synthetic_documents

DOCS = list(synthetic_documents(120_000, seed=7, max_sentences=8))


def jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d, "meta": {}}, ensure_ascii=False) + "\n" for d in docs).encode()


def frames(*parts: list[str], checksum: bool = False) -> list[bytes]:
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=checksum)
    return [compressor.compress(jsonl(p)) for p in parts]


def read_all(path: Path) -> list[str]:
    return list(Corpus.from_path(path).documents())


@pytest.fixture
def zst(tmp_path) -> Path:
    return tmp_path / "corpus.jsonl.zst"


def test_whole_multi_frame_file_reads_every_document(zst):
    half = len(DOCS) // 2
    zst.write_bytes(b"".join(frames(DOCS[:half], DOCS[half:])))
    assert read_all(zst) == DOCS


def test_second_frame_cut_in_half_is_refused_with_its_offset(zst):
    half = len(DOCS) // 2
    first, second = frames(DOCS[:half], DOCS[half:])
    zst.write_bytes(first + second[: len(second) // 2])
    size = zst.stat().st_size
    message = (f"{zst}: truncated zstd file: it ends at byte {size} of the compressed file, inside the frame that "
               f"starts at byte {len(first)}")
    with pytest.raises(DataPrepError, match=re.escape(message)):
        read_all(zst)


def test_single_frame_cut_at_70_percent_is_truncated_not_empty(zst, tmp_path):
    (whole,) = frames(DOCS)
    zst.write_bytes(whole[: int(len(whole) * 0.7)])
    with pytest.raises(DataPrepError, match=re.escape(f"{zst}: truncated zstd file: it ends at byte "
                                                      f"{int(len(whole) * 0.7)} of the compressed file")):
        prepare_dataset(zst, tmp_path / "out", vocab_size=300, seq_len=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [zst.name]  # nothing written


def test_flipped_byte_under_a_checksum_is_damage_at_a_compressed_offset(zst):
    (whole,) = frames(DOCS, checksum=True)
    body = bytearray(whole)
    body[len(body) // 2] ^= 0xFF
    zst.write_bytes(bytes(body))
    with pytest.raises(DataPrepError, match=rf"{re.escape(str(zst))}: damaged zstd data \(.+\) detected by byte "
                                            r"\d+ of the compressed file"):
        read_all(zst)


def test_garbage_after_the_last_frame_is_damage(zst):
    (whole,) = frames(DOCS)
    zst.write_bytes(whole + b"not zstd at all")
    with pytest.raises(DataPrepError, match=rf"damaged zstd data \(.*Unknown frame descriptor\) detected by byte "
                                            rf"{len(whole) + 15} of the compressed file"):
        read_all(zst)


def test_a_skippable_frame_between_frames_is_fine(zst):
    first, second = frames(DOCS[:10], DOCS[10:])
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"meta"
    zst.write_bytes(first + skippable + second)
    assert read_all(zst) == DOCS


def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "corpus.jsonl"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def prepare() -> None:
        try:
            prepare_dataset(fifo, tmp_path / "out", vocab_size=300, seq_len=16, progress=False)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result.append(exc)

    worker = threading.Thread(target=prepare, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the reader so the thread can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("prepare blocked on a named pipe")
    assert isinstance(result[0], DataPrepError), result
    assert str(result[0]) == (f"input {fifo} is not a regular file (a named pipe, socket or device): pass a file "
                              "or a directory of them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_an_input_name_too_long_for_the_file_system_is_one_line(tmp_path):
    with pytest.raises(DataPrepError, match="cannot read input .*: File name too long"):
        Corpus.from_path(tmp_path / ("ż" * 128 + ".jsonl"))
