"""Tokenizers for prepare: a byte-level BPE trained on the train split, or GPT-2's (hub name or local dir).

Both end up as a `tokenizers.Tokenizer` (the Rust backend), so prepare encodes through one fast batch API.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataPrepError

EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOT_TOKEN,)
BYTE_ALPHABET_SIZE = 256
MIN_BPE_VOCAB = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
POLISH_DIACRITICS = "ąćęłńóśźżĄĆĘŁŃÓŚŹŻ"


@dataclass
class PreparedTokenizer:
    """What prepare needs from a tokenizer: the Rust backend to encode with, the EOT id, and how to save it."""

    name: str
    backend: Tokenizer
    eot_id: int
    vocab_size: int
    save: Callable[[Path], str]  # writes into the output directory, returns the path relative to it
    notes: list[str] = field(default_factory=list)


def _byte_level_chars(text: str) -> str:
    """`text` as the byte-level pre-tokenizer spells it (one alphabet char per UTF-8 byte)."""
    alphabet = bytes_to_unicode()
    return "".join(alphabet[b] for b in text.encode("utf-8"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table, the one `pre_tokenizers.ByteLevel` uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _make_diacritics_single_tokens(tokenizer: Tokenizer, vocab_limit: int) -> tuple[Tokenizer, list[str]]:
    """Put the merge of every Polish diacritic's two UTF-8 bytes first in the merge list.

    First rank means the two bytes of `ą` are always merged before either can join a neighbour, so each
    diacritic is one ordinary token in any context. A diacritic the trainer did not learn (rare capitals on a
    small corpus) takes the id of the last-learned merge, which is dropped, so the vocabulary never grows.
    """
    state = json.loads(tokenizer.to_str())
    model = state["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    wanted = [(_byte_level_chars(d)[0], _byte_level_chars(d)[1]) for d in POLISH_DIACRITICS]
    missing = [a + b for a, b in wanted if a + b not in vocab]
    dropped = []
    for token in missing:
        if len(vocab) < vocab_limit:
            vocab[token] = len(vocab)
            continue
        last = max(range(len(merges)), key=lambda i: vocab.get(merges[i][0] + merges[i][1], -1))
        freed = "".join(merges.pop(last))
        dropped.append(freed)
        vocab[token] = vocab.pop(freed)
    wanted_set = set(wanted)
    model["merges"] = [list(m) for m in wanted] + [list(m) for m in merges if m not in wanted_set]
    notes = [f"added {len(missing)} Polish diacritic token(s) the trainer did not learn, "
             "in place of the last-learned merges"] if missing else []
    return Tokenizer.from_str(json.dumps(state)), notes


def check_single_token_diacritics(tokenizer: Tokenizer) -> None:
    """Fail loudly if any Polish diacritic would be split into byte pieces."""
    split = [d for d in POLISH_DIACRITICS if len(tokenizer.encode(d, add_special_tokens=False).ids) != 1]
    if split:
        raise DataPrepError(f"tokenizer splits Polish diacritics {''.join(split)} into several tokens")


def new_byte_level_bpe() -> Tokenizer:
    """An untrained GPT-2-style byte-level BPE (lossless: decode(encode(text)) == text)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(batches: Iterable[list[str]], vocab_size: int) -> tuple[Tokenizer, list[str]]:
    """Train a byte-level BPE from a stream of document batches (bounded memory: only word counts are kept)."""
    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(batches, trainer=trainer)
    tokenizer, notes = _make_diacritics_single_tokens(tokenizer, vocab_size)
    if tokenizer.get_vocab_size() < vocab_size:
        notes.append(f"the train split supports only {tokenizer.get_vocab_size()} tokens, fewer than the "
                     f"requested vocab size {vocab_size}; the manifest records the actual size")
    return tokenizer, notes


def wrap_bpe(tokenizer: Tokenizer, notes: list[str]) -> PreparedTokenizer:
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    if eot_id is None:
        raise DataPrepError(f"the BPE tokenizer has no {EOT_TOKEN} token")
    check_single_token_diacritics(tokenizer)
    tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a boundary

    def save(out_dir: Path) -> str:
        tokenizer.save(str(out_dir / "tokenizer.json"))
        return "tokenizer.json"

    return PreparedTokenizer("bpe", tokenizer, eot_id, tokenizer.get_vocab_size(), save, notes)


def load_bpe(path: str | Path) -> PreparedTokenizer:
    """A BPE trained earlier (a `tokenizer.json`, or a prepared dataset directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for unreadable or malformed files
        raise DataPrepError(f"cannot load BPE tokenizer {path}: {exc}") from None
    return wrap_bpe(tokenizer, [f"reused the BPE tokenizer {path} (not trained)"])


def load_gpt2(name_or_path: str | Path) -> PreparedTokenizer:
    """GPT-2's tokenizer (or any saved GPT-2-style fast tokenizer) through transformers; EOT = its eos token."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for missing or offline models
        raise DataPrepError(f"cannot load tokenizer {name_or_path}: {str(exc).splitlines()[0]}") from None
    if not getattr(hf, "is_fast", False):
        raise DataPrepError(f"tokenizer {name_or_path} has no fast (Rust) implementation")
    if hf.eos_token_id is None:
        raise DataPrepError(f"tokenizer {name_or_path} has no end-of-text (eos) token")
    backend = hf.backend_tokenizer
    backend.encode_special_tokens = True

    def save(out_dir: Path) -> str:
        hf.save_pretrained(str(out_dir / "tokenizer"))
        return "tokenizer"

    return PreparedTokenizer("gpt2", backend, int(hf.eos_token_id), len(hf), save)
