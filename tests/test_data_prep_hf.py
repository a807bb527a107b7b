"""Shards the ecosystem reads: HF datasets opens them as they are, pyarrow maps them zero-copy, old shards still read."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

import data_prep
from data_prep import DatasetError, open_dataset, prepare_dataset
from data_prep.reader import file_sha256

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def many_shards(sample_dataset, tmp_path_factory) -> Path:
    """The sample with 40-row shards, so every split spans several of them."""
    return prepare_dataset(out_dir=tmp_path_factory.mktemp("hf") / "ds", tokenizer_path=sample_dataset / "tokenizer.json",
                           seq_len=64, shard_rows=40, progress=False)


def all_rows(ds, split: str) -> np.ndarray:
    s = ds.split(split)
    return s.get_rows(np.arange(s.num_rows))


def test_hf_datasets_reads_each_shard_and_a_whole_split(many_shards):
    ds = open_dataset(many_shards, verify="full")
    for split in ds.manifest["splits"]:
        expected = all_rows(ds, split)
        paths = ds.shard_paths(split)
        assert len(paths) >= 2 or len(expected) <= 40
        start = 0
        for path in paths:
            shard = datasets.Dataset.from_file(str(path)).with_format("numpy")
            rows = shard["tokens"]
            assert np.array_equal(rows, expected[start:start + len(rows)])
            start += len(rows)
        assert start == len(expected)
        whole = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in paths])
        assert np.array_equal(whole.with_format("numpy")["tokens"], expected)
        assert whole.features["tokens"].length == ds.row_len


def test_the_documented_one_liner_works(many_shards):
    snippet = textwrap.dedent(data_prep.__doc__.split(":\n\n", 1)[1])
    scope = {"OUT": str(many_shards), "open_dataset": open_dataset}
    exec(snippet, scope)  # noqa: S102 - runs the docstring's own example
    assert np.array_equal(scope["train"].with_format("numpy")["tokens"], all_rows(open_dataset(many_shards), "train"))


def _address_range(source: pa.MemoryMappedFile) -> tuple[int, int]:
    position = source.tell()
    source.seek(0)
    whole = source.read_buffer(source.size())  # a zero-copy slice of the whole map: its address is the map's
    source.seek(position)
    return whole.address, whole.address + whole.size


def test_stream_shards_memory_map_zero_copy(many_shards):
    ds = open_dataset(many_shards)
    for path in ds.shard_paths("train"):
        source = pa.memory_map(str(path))
        lo, hi = _address_range(source)
        for batch in ipc.open_stream(source):
            view = batch.column("tokens").flatten().to_numpy(zero_copy_only=True)
            assert lo <= view.ctypes.data and view.ctypes.data + view.nbytes <= hi
            assert view.ctypes.data % 8 == 0  # aligned: numpy reads it in place
    split = ds.split("train")
    ranges = [_address_range(m) for m in split._mmaps]
    for chunk in split._chunks:  # what the reader serves batches from: views into its own maps
        assert any(lo <= chunk.rows.ctypes.data < hi for lo, hi in ranges)
        assert not chunk.rows.flags.owndata


def as_format_version_1(src: Path, dest: Path) -> Path:
    """A dataset as data_prep wrote it before format_version 2: IPC file shards, no shard_format key."""
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = dest / shard["path"]
            with pa.OSFile(str(path)) as f:  # read into memory: the file is rewritten in place below
                table = ipc.open_stream(f).read_all()
            with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            shard.update(num_bytes=path.stat().st_size, sha256=file_sha256(path))
    del manifest["shard_format"]
    (dest / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    return dest


def test_format_version_1_datasets_still_read(many_shards, tmp_path):
    old = open_dataset(as_format_version_1(many_shards, tmp_path / "v1"), verify="full")
    new = open_dataset(many_shards)
    assert old.manifest["format_version"] == 1
    for split in new.manifest["splits"]:
        assert np.array_equal(all_rows(old, split), all_rows(new, split))
        batches = old.split(split).iter_batches(4, seed=3)
        assert np.array_equal(next(batches), next(new.split(split).iter_batches(4, seed=3)))


def test_a_shard_in_the_wrong_format_is_one_line(many_shards, tmp_path):
    v1 = as_format_version_1(many_shards, tmp_path / "v1")
    manifest = json.loads((v1 / "manifest.json").read_text())
    (v1 / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2, "shard_format": "arrow_stream"}))
    with pytest.raises(DatasetError, match=r"cannot read shard .*00000\.arrow \(an arrow IPC stream\)"):
        open_dataset(v1, verify="full").split("train")
