"""prepare: corpus -> tokenizer -> Arrow token shards, written atomically (Contract 1).

Two streaming passes over the corpus: (1, bpe only) train the BPE on the train split's documents, (2) encode
every document with the Rust batch API and append it to its split's shard writer. Everything is written into a
hidden temp directory next to the output, `manifest.json` last, and then swapped into place (`atomic.install`):
a kill at any moment leaves the old dataset or the new one, never neither.
"""
from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from contract.io import atomic_write

from .atomic import MANIFEST_NAME, created_dirs, install, step
from .corpus import SPLIT_FRACTIONS, SPLIT_NAMES, Corpus, corpus_stem, split_of
from .errors import DataPrepError
from .output import check_out_dir, check_out_path, check_output, make_build_dir
from .schema import FORMAT_VERSION, MAX_SEQ_LEN, MAX_VOCAB_SIZE, MIN_SEQ_LEN
from .shards import DEFAULT_SHARD_ROWS, SHARD_FORMAT, ShardWriter, dtype_for
from .tokenizer import MIN_BPE_VOCAB, PreparedTokenizer, load_bpe, load_gpt2, train_bpe, wrap_bpe

SAMPLE_CORPUS = Path(__file__).resolve().parent / "sample" / "polish_sample.jsonl"
DEFAULT_OUT_ROOT = Path("prepared")
DEFAULT_GPT2 = "gpt2"
DEFAULT_BATCH_CHARS = 1 << 20  # ~1 MB of text per encode_batch call: keeps every Rust thread busy, RSS low
REQUIRED_SPLITS = ("train", "val")  # the test split may be empty on a tiny corpus
MAX_SHARD_TOKENS = 2**31  # a shard's rows are buffered in memory (per split) before it is written
MAX_SEED = 2**64 - 1  # the split hash's key is str(seed), at most 64 bytes


@dataclass(frozen=True)
class PrepareConfig:
    """One prepare run, validated once at the edge (every problem is one DataPrepError line)."""

    input_path: Path = SAMPLE_CORPUS
    out_dir: Path | None = None
    tokenizer: str = "bpe"
    vocab_size: int = 10_000
    seq_len: int = 512
    seed: int = 0
    tokenizer_path: str | None = None
    overwrite: bool = False
    shard_rows: int = DEFAULT_SHARD_ROWS
    batch_chars: int = DEFAULT_BATCH_CHARS
    progress: bool = True

    def validate(self) -> "PrepareConfig":
        """Every setting and the output path's shape; nothing is read or written (see `output.check_output`)."""
        if self.tokenizer not in TOKENIZERS:
            raise DataPrepError(f"unknown tokenizer {self.tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
        for name in ("vocab_size", "seq_len", "seed", "shard_rows", "batch_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataPrepError(f"{name} must be an integer, got {value!r}")
        if self.tokenizer == "bpe" and self.tokenizer_path is None:
            self._check_vocab_size()
        self._check_lengths()
        if not 0 <= self.seed <= MAX_SEED:
            raise DataPrepError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        check_out_path(self.resolved_out_dir)
        return self

    def _check_vocab_size(self) -> None:
        if self.vocab_size < MIN_BPE_VOCAB:
            raise DataPrepError(f"vocab size {self.vocab_size} is below the byte alphabet plus special tokens "
                                f"({MIN_BPE_VOCAB}): use --vocab-size {MIN_BPE_VOCAB} or more")
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise DataPrepError(f"vocab size {self.vocab_size} is more than uint32 token ids can number: use "
                                f"--vocab-size {MAX_VOCAB_SIZE} or less")

    def _check_lengths(self) -> None:
        if self.seq_len < MIN_SEQ_LEN:
            raise DataPrepError(f"seq len {self.seq_len} is too short: use --seq-len {MIN_SEQ_LEN} or more")
        if self.seq_len > MAX_SEQ_LEN:
            raise DataPrepError(f"seq len {self.seq_len} is too long: use --seq-len {MAX_SEQ_LEN} or less")
        if self.shard_rows < 1 or self.batch_chars < 1:
            raise DataPrepError("shard_rows and batch_chars must be positive")
        if self.shard_rows * self.row_len > MAX_SHARD_TOKENS:
            raise DataPrepError(f"shard rows {self.shard_rows} of {self.row_len} tokens would hold "
                                f"{self.shard_rows * self.row_len:,} tokens in memory per shard: use --shard-rows "
                                f"{MAX_SHARD_TOKENS // self.row_len} or less")

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    @property
    def resolved_out_dir(self) -> Path:
        """`--out`, or `prepared/<input stem>-<tokenizer><vocab>-s<seq_len>`."""
        if self.out_dir is not None:
            return Path(self.out_dir)
        label = f"bpe{self.vocab_size}" if self.tokenizer == "bpe" else self.tokenizer
        return DEFAULT_OUT_ROOT / f"{corpus_stem(Path(self.input_path))}-{label}-s{self.seq_len}"


def _progress(cfg: PrepareConfig, corpus: Corpus, desc: str) -> tqdm:
    return tqdm(total=corpus.num_bytes, unit="B", unit_scale=True, desc=desc, disable=not cfg.progress,
                file=sys.stderr, leave=False, delay=0.5)  # no bar flashes before a fast error


def _train_split_batches(cfg: PrepareConfig, corpus: Corpus, counts: dict[str, int],
                         failure: list[BaseException]) -> Iterator[list[str]]:
    """Train-split document batches for the BPE trainer; errors are parked in `failure` (Rust would mangle them)."""
    with _progress(cfg, corpus, "train bpe") as bar:
        try:
            for batch in corpus.batches(cfg.batch_chars, bar.update):
                train = []
                for doc in batch:
                    split = split_of(doc, cfg.seed)
                    counts[split] += 1
                    if split == "train":
                        train.append(doc)
                if train:
                    yield train
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller after the trainer returns
            failure.append(exc)


def _bpe(cfg: PrepareConfig, corpus: Corpus) -> PreparedTokenizer:
    if cfg.tokenizer_path is not None:
        return load_bpe(cfg.tokenizer_path)
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    failure: list[BaseException] = []
    tokenizer, notes = train_bpe(_train_split_batches(cfg, corpus, counts, failure), cfg.vocab_size)
    if failure:
        raise failure[0]
    _check_split_counts(counts, corpus)
    return wrap_bpe(tokenizer, notes)


def _gpt2(cfg: PrepareConfig, corpus: Corpus) -> PreparedTokenizer:
    return load_gpt2(cfg.tokenizer_path or DEFAULT_GPT2)


TOKENIZERS: dict[str, Callable[[PrepareConfig, Corpus], PreparedTokenizer]] = {"bpe": _bpe, "gpt2": _gpt2}


def _check_split_counts(counts: dict[str, int], corpus: Corpus) -> None:
    total = sum(counts.values())
    if total == 0:
        raise DataPrepError(f"empty corpus: no non-blank documents in {', '.join(map(str, corpus.files))}")
    for split in REQUIRED_SPLITS:
        if counts[split] == 0:
            raise DataPrepError(f"corpus too small: none of its {total} documents fell in the {split} split "
                                "(85/10/5 split by document); add more documents")


def token_streams(encodings: list, splits: list[str], eot_id: int, dtype: str) -> dict[str, tuple[np.ndarray, int]]:
    """Per split: the EOT-terminated token stream of a batch's documents, and how many documents it holds."""
    ids: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    for encoding, split in zip(encodings, splits):
        stream = ids.setdefault(split, [])
        stream += encoding.ids
        stream.append(eot_id)
        counts[split] = counts.get(split, 0) + 1
    return {split: (np.array(stream, dtype=dtype), counts[split]) for split, stream in ids.items()}


def _write_shards(cfg: PrepareConfig, corpus: Corpus, tokenizer: PreparedTokenizer, root: Path) -> dict[str, dict]:
    """Pass 2. Batch N+1 is encoded in a worker thread (Rust releases the GIL) while this thread turns batch N
    into token streams and reads/splits batch N+2, so Python's share of the work hides behind the encoder."""
    dtype = dtype_for(tokenizer.vocab_size)
    writers = {s: ShardWriter(root / s, row_len=cfg.row_len, dtype=dtype, eot_id=tokenizer.eot_id,
                              shard_rows=cfg.shard_rows) for s in SPLIT_NAMES}

    def write(encodings: list, splits: list[str]) -> None:
        for split, (tokens, n) in token_streams(encodings, splits, tokenizer.eot_id, dtype).items():
            writers[split].append(tokens, n)

    def encode(batch: list[str]) -> list:
        return tokenizer.backend.encode_batch_fast(batch, add_special_tokens=False)

    with _progress(cfg, corpus, "tokenize") as bar, ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
        batches = corpus.batches(cfg.batch_chars, bar.update)
        batch = next(batches, None)
        done: tuple[list, list[str]] | None = None
        while batch is not None:
            encoding = pool.submit(encode, batch)
            if done is not None:
                write(*done)
            upcoming = next(batches, None)
            splits = [split_of(doc, cfg.seed) for doc in batch]
            done = (encoding.result(), splits)
            batch = upcoming
        if done is not None:
            write(*done)
    summary = {s: w.close() for s, w in writers.items()}
    _check_split_counts({s: summary[s]["num_documents"] for s in SPLIT_NAMES}, corpus)
    return summary


def build_manifest(cfg: PrepareConfig, corpus: Corpus, tokenizer: PreparedTokenizer, tokenizer_rel: str,
                   splits: dict[str, dict]) -> dict:
    """Contract 1's manifest. No timestamps or output paths: the same inputs give a byte-identical file."""
    return {
        "format_version": FORMAT_VERSION,
        "shard_format": SHARD_FORMAT,
        "tokenizer": tokenizer.name,
        "tokenizer_path": tokenizer_rel,
        "vocab_size": tokenizer.vocab_size,
        "requested_vocab_size": cfg.vocab_size if tokenizer.name == "bpe" else None,
        "seq_len": cfg.seq_len,
        "row_len": cfg.row_len,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype_for(tokenizer.vocab_size),
        "seed": cfg.seed,
        "sources": corpus.sources(),
        "split_rule": {"method": "blake2b(text, key=str(seed)) -> [0,1) bucket",
                       "fractions": dict(zip(SPLIT_NAMES, SPLIT_FRACTIONS))},
        "shard_rows": cfg.shard_rows,
        "notes": tokenizer.notes,
        "splits": splits,
    }


def _commit(tmp: Path, out: Path, manifest: dict, overwrite: bool) -> None:
    """Write the manifest (its presence = complete), then swap the finished directory into place."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"  # non-ASCII text kept as written
    atomic_write(tmp / MANIFEST_NAME, lambda path: path.write_text(text, encoding="utf-8"))
    check_out_dir(out, overwrite)  # again: `out` may have changed while the corpus was being tokenized
    try:
        install(tmp, out, replace=overwrite)
    except OSError as exc:  # another prepare wrote `out` in the meantime
        raise DataPrepError(f"cannot move the prepared dataset into {out}: {exc.strerror}") from None


def prepare_dataset(input_path: str | Path | None = None, out_dir: str | Path | None = None, *,
                    tokenizer: str = "bpe", vocab_size: int = 10_000, seq_len: int = 512, seed: int = 0,
                    tokenizer_path: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                    shard_rows: int = DEFAULT_SHARD_ROWS, batch_chars: int = DEFAULT_BATCH_CHARS) -> Path:
    """Prepare a corpus (default: the shipped Polish sample) into a dataset directory and return its path.

    For `tokenizer="bpe"`, `tokenizer_path` reuses an already trained `tokenizer.json` instead of training;
    for `"gpt2"` it is a hub name or a saved tokenizer directory (default: "gpt2").
    """
    cfg = PrepareConfig(
        input_path=Path(input_path) if input_path is not None else SAMPLE_CORPUS,
        out_dir=Path(out_dir) if out_dir is not None else None, tokenizer=tokenizer, vocab_size=vocab_size,
        seq_len=seq_len, seed=seed, tokenizer_path=str(tokenizer_path) if tokenizer_path is not None else None,
        overwrite=overwrite, shard_rows=shard_rows, batch_chars=batch_chars, progress=progress,
    ).validate()
    out = cfg.resolved_out_dir
    check_output(out, cfg.overwrite)
    corpus = Corpus.from_path(cfg.input_path)
    with created_dirs(out.parent):
        tmp = make_build_dir(out)
        try:
            prepared_tokenizer = TOKENIZERS[cfg.tokenizer](cfg, corpus)
            splits = _write_shards(cfg, corpus, prepared_tokenizer, tmp)
            step("shards")
            tokenizer_rel = prepared_tokenizer.save(tmp)
            _commit(tmp, out, build_manifest(cfg, corpus, prepared_tokenizer, tokenizer_rel, splits), cfg.overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if cfg.progress:
        for note in prepared_tokenizer.notes:
            print(f"note: {note}", file=sys.stderr)
    return out
