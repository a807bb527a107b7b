"""data_prep API: prepare -> shards -> reader, on small generated Polish corpora (CPU, offline, seconds)."""
from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from data_prep import FORMAT_VERSION, DataPrepError, DatasetError, open_dataset, prepare_dataset
from data_prep.corpus import Corpus, split_of
from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import POLISH_DIACRITICS

SMALL = dict(vocab_size=512, seq_len=32, seed=0, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~600 distinct Polish documents (~150 KB)."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "pl.jsonl", synthetic_documents(150_000, max_sentences=8))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    """Small shards (16 rows) so every split spans several shards."""
    return prepare_dataset(corpus, tmp_path_factory.mktemp("prep") / "ds", shard_rows=16, **SMALL)


def split_documents(path: Path, seed: int) -> dict[str, list[str]]:
    docs: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for doc in Corpus.from_path(path).documents():
        docs[split_of(doc, seed)].append(doc)
    return docs


def decoded_documents(ds, split: str) -> list[str]:
    """Every row of a split, concatenated, padding dropped, cut at EOT and decoded."""
    s = ds.split(split)
    stream = s.get_rows(np.arange(s.num_rows)).reshape(-1)
    assert np.all(stream[s.num_tokens:] == ds.eot_id) and len(stream) - s.num_tokens == s.num_pad_tokens
    stream = stream[: s.num_tokens]
    assert stream[-1] == ds.eot_id
    tokenizer = ds.load_tokenizer()
    pieces = np.split(stream, np.flatnonzero(stream == ds.eot_id) + 1)[:-1]
    return [tokenizer.decode(p[:-1].tolist()) for p in pieces]


def test_round_trip_reproduces_every_split_exactly(prepared, corpus):
    ds = open_dataset(prepared, verify="full")
    expected = split_documents(corpus, seed=0)
    for split in ("train", "val", "test"):
        assert decoded_documents(ds, split) == expected[split]
        assert ds.split(split).num_documents == len(expected[split])


def test_manifest_follows_contract(prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION == 2 and m["shard_format"] == "arrow_stream"
    assert m["tokenizer"] == "bpe" and m["tokenizer_path"] == "tokenizer.json"
    assert m["row_len"] == m["seq_len"] + 1 == 33 and m["dtype"] == "uint16" and m["eot_id"] == 0
    for split in m["splits"].values():
        assert split["num_rows"] * m["row_len"] == split["num_tokens"] + split["num_pad_tokens"]
        assert 0 <= split["num_pad_tokens"] < m["row_len"]
        assert sum(s["num_rows"] for s in split["shards"]) == split["num_rows"]
        assert sum(s["num_tokens"] for s in split["shards"]) == split["num_tokens"]
        assert len(split["shards"]) >= 2 or split["num_rows"] <= 16
        for shard in split["shards"]:
            path = prepared / shard["path"]
            assert path.stat().st_size == shard["num_bytes"]
            table = ipc.open_stream(pa.memory_map(str(path))).read_all()
            assert table.schema.names == ["tokens"]
            assert table.schema.field("tokens").type == pa.list_(pa.uint16(), m["row_len"])
            assert table.num_rows == shard["num_rows"]


def test_split_is_85_10_5_and_independent_of_input_order(prepared, corpus, tmp_path):
    m = json.loads((prepared / "manifest.json").read_text())
    counts = {s: m["splits"][s]["num_documents"] for s in ("train", "val", "test")}
    total = sum(counts.values())
    for split, share in (("train", 0.85), ("val", 0.10), ("test", 0.05)):
        assert abs(counts[split] / total - share) < 0.05, counts
    many = [f"dokument {i} źdźbło" for i in range(20_000)]
    shares = np.bincount([("train", "val", "test").index(split_of(d, 3)) for d in many]) / len(many)
    assert np.allclose(shares, [0.85, 0.10, 0.05], atol=0.01)

    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(lines), encoding="utf-8")
    other = open_dataset(prepare_dataset(shuffled, tmp_path / "ds", shard_rows=16, **SMALL))
    base = open_dataset(prepared)
    for split in ("train", "val", "test"):
        assert sorted(decoded_documents(other, split)) == sorted(decoded_documents(base, split))


def test_same_seed_gives_byte_identical_output_other_seed_another_split(corpus, tmp_path):
    a = prepare_dataset(corpus, tmp_path / "a", **SMALL)
    b = prepare_dataset(corpus, tmp_path / "b", **SMALL)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = json.loads((prepare_dataset(corpus, tmp_path / "c", **{**SMALL, "seed": 1}) / "manifest.json").read_text())
    assert c["seed"] == 1
    a_manifest = json.loads((a / "manifest.json").read_text())
    assert c["splits"]["val"]["num_tokens"] != a_manifest["splits"]["val"]["num_tokens"]


def test_polish_diacritics_are_single_tokens_in_context(prepared):
    tokenizer = open_dataset(prepared).load_tokenizer()
    for letter in POLISH_DIACRITICS:
        assert len(tokenizer.encode(letter).ids) == 1, letter
    text = "ZAŻÓŁĆ GĘŚLĄ JAŹŃ, zażółć gęślą jaźń. Źdźbło, Ćma, Ńa, Ąę!"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    for i in ids:  # no token ends inside a diacritic's two UTF-8 bytes
        assert "\ufffd" not in tokenizer.decode([i])


def test_tiny_corpus_records_actual_vocab_size(corpus, tmp_path):
    out = prepare_dataset(corpus, tmp_path / "big-vocab", vocab_size=60_000, seq_len=16, progress=False)
    ds = open_dataset(out)
    assert ds.vocab_size == ds.load_tokenizer().get_vocab_size() < 60_000
    assert ds.manifest["requested_vocab_size"] == 60_000
    assert any("fewer than the requested" in note for note in ds.manifest["notes"])


def test_gpt2_tokenizer_from_local_directory(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer.from_file(str(prepare_dataset(corpus, tmp_path / "bpe", **SMALL) / "tokenizer.json"))
    local = tmp_path / "my-gpt2"
    PreTrainedTokenizerFast(tokenizer_object=trained, eos_token="<|endoftext|>").save_pretrained(str(local))

    ds = open_dataset(prepare_dataset(corpus, tmp_path / "gpt2", tokenizer="gpt2", tokenizer_path=local,
                                      seq_len=32, progress=False))
    assert ds.manifest["tokenizer"] == "gpt2" and ds.manifest["tokenizer_path"] == "tokenizer"
    assert (ds.path / "tokenizer" / "tokenizer_config.json").is_file()
    assert ds.eot_id == 0 and ds.vocab_size == 512
    assert decoded_documents(ds, "val") == split_documents(corpus, 0)["val"]


def test_memory_stays_flat_as_the_corpus_grows(tmp_path, corpus):
    """Peak Python memory of prepare does not grow with a corpus many times larger than its buffers."""
    tokenizer = prepare_dataset(corpus, tmp_path / "tok", **SMALL) / "tokenizer.json"

    def peak(num_bytes: int) -> int:
        src = write_jsonl(tmp_path / f"c{num_bytes}.jsonl", synthetic_documents(num_bytes, seed=num_bytes))
        tracemalloc.start()
        prepare_dataset(src, tmp_path / f"d{num_bytes}", tokenizer_path=tokenizer, seq_len=32, shard_rows=64,
                        batch_chars=20_000, progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(300_000), peak(1_500_000)  # the larger corpus is ~250x one shard buffer (64 x 33 tokens)
    assert large < 1.5 * small, (small, large)


def test_iter_batches_order_depends_on_seed_and_epoch_only(prepared):
    train = open_dataset(prepared).split("train")
    row_len = 33
    assert train.num_batches(8) == train.num_rows // 8
    by8 = np.concatenate(list(train.iter_batches(8, seed=5)))
    by3 = np.concatenate(list(train.iter_batches(3, seed=5)))
    n = min(len(by8), len(by3))
    assert by8.dtype == np.int64 and by8.shape == (train.num_batches(8) * 8, row_len)
    assert np.array_equal(by8[:n], by3[:n])
    resumed = np.concatenate(list(train.iter_batches(8, seed=5, start_batch=4)))
    assert np.array_equal(resumed, by8[4 * 8:])
    assert not np.array_equal(np.concatenate(list(train.iter_batches(8, seed=5, epoch=1))), by8)
    assert not np.array_equal(np.concatenate(list(train.iter_batches(8, seed=6))), by8)
    in_order = np.concatenate(list(train.iter_batches(8, seed=5, shuffle=False)))
    direct = np.concatenate([
        np.asarray(ipc.open_stream(pa.memory_map(str(prepared / s["path"]))).read_all().column("tokens")
                   .combine_chunks().flatten()).reshape(-1, row_len)
        for s in train_shards(prepared)])
    assert np.array_equal(in_order, direct[: len(in_order)])
    perm = train.permutation(seed=5)
    assert np.array_equal(by8, direct[perm[: len(by8)]])


def train_shards(prepared: Path) -> list[dict]:
    return json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["shards"]


@pytest.fixture
def copy_of(prepared, tmp_path):
    import shutil

    return Path(shutil.copytree(prepared, tmp_path / "copy"))


def test_truncated_shard_is_caught_by_size_check(copy_of):
    shard = copy_of / train_shards(copy_of)[0]["path"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated"):
        open_dataset(copy_of)
    with pytest.raises(DatasetError, match="cannot read shard"):  # unchecked, it still fails cleanly on use
        open_dataset(copy_of, verify="none").split("train")


def test_corrupted_byte_is_caught_by_full_check(copy_of):
    shard = copy_of / train_shards(copy_of)[0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_dataset(copy_of, verify="size")
    with pytest.raises(DatasetError, match="sha256"):
        open_dataset(copy_of, verify="full")


def test_newer_format_and_missing_manifest_are_clear_errors(copy_of, tmp_path):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    (copy_of / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(DatasetError, match=f"format_version {FORMAT_VERSION + 1}, newer than this data_prep supports"):
        open_dataset(copy_of)
    with pytest.raises(DatasetError, match=r"no manifest.json\): run `python -m data_prep prepare`"):
        open_dataset(tmp_path / "nothing-here")


def test_failed_prepare_leaves_nothing_and_keeps_old_output(corpus, prepared, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = corpus.read_bytes()
    bad.write_bytes(good + b'{"text": "z\xc5\xbc\xc3 oops"}\n')
    with pytest.raises(DataPrepError, match=rf"invalid UTF-8 at byte {len(good) + 13}"):
        prepare_dataset(bad, tmp_path / "out", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]

    import shutil

    old = Path(shutil.copytree(prepared, tmp_path / "old"))
    before = (old / "manifest.json").read_bytes()
    with pytest.raises(DataPrepError):
        prepare_dataset(bad, old, overwrite=True, **SMALL)
    assert (old / "manifest.json").read_bytes() == before
    open_dataset(old, verify="full")


def test_txt_and_directory_inputs_and_default_out_dir(tmp_path, monkeypatch):
    docs = list(synthetic_documents(60_000, seed=3, max_sentences=6))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("\n\n".join(d.replace("\n\n", " ") for d in docs[:200]) + "\n", encoding="utf-8")
    write_jsonl(src / "b.jsonl", docs[200:])
    monkeypatch.chdir(tmp_path)
    out = prepare_dataset(src, vocab_size=300, seq_len=16, progress=False)
    assert out == Path("prepared/src-bpe300-s16")
    ds = open_dataset(out)
    assert [s["format"] for s in ds.manifest["sources"]] == ["txt", "jsonl"]
    assert sum(ds.split(s).num_documents for s in ("train", "val", "test")) == len(docs)


def test_shipped_sample_prepares(sample_dataset):
    ds = open_dataset(sample_dataset, verify="full")
    assert ds.manifest["sources"][0]["path"].endswith("data_prep/sample/polish_sample.jsonl")
    assert ds.split("train").num_rows > ds.split("val").num_rows > 0
    batch = next(ds.split("train").iter_batches(2, seed=0))
    assert batch.shape == (2, 65) and batch.max() < ds.vocab_size
