"""Build GPT-2's real tokenizer (50,257 tokens) as a local Hugging Face tokenizer directory, offline.

Why: some machines reach PyPI but not the Hugging Face hub, so `AutoTokenizer.from_pretrained("gpt2")`
fails there and `python -m data_prep prepare --tokenizer gpt2` cannot run. GPT-2's byte-level BPE ranks
are also published by OpenAI on PyPI: the openai-whisper sdist ships them as `whisper/assets/gpt2.tiktoken`
(one `base64(token bytes) rank` per line; rank == GPT-2 token id, 0..50255). This script rebuilds the BPE
merges from those ranks, assembles a `tokenizers` byte-level BPE identical to GPT-2's (vocab spelled in
GPT-2's byte->unicode alphabet as in its vocab.json, GPT-2's pre-tokenizer regex, `<|endoftext|>` = 50256),
checks it against known GPT-2 encodings and a pure-Python rank-BPE reference, and saves it with
`GPT2TokenizerFast.save_pretrained`.

Run:
    pip download openai-whisper --no-deps --no-binary :none: -d /tmp/whisp      # only if not downloaded yet
    python bench/gpt2_tokenizer_offline.py --whisper-sdist /tmp/whisp/openai_whisper-20250625.tar.gz \
        --out /tmp/gpt2-tok
    python -m data_prep prepare --tokenizer gpt2 --tokenizer-path /tmp/gpt2-tok --out /tmp/prep-gpt2 --quiet

Add `--check-text data_prep/sample/polish_sample.jsonl` to also check a whole file against the reference.

(`--ranks PATH` takes an already extracted gpt2.tiktoken instead of the sdist.) Needs the standard
library, `tokenizers`, `transformers` and this repository's `data_prep`.
"""
from __future__ import annotations

import argparse
import base64
import sys
import tarfile
import time
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.tokenizer import bytes_to_unicode  # noqa: E402  (GPT-2's byte -> printable char table)

EOT_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_MODEL_MAX_LENGTH = 1024
RANKS_MEMBER_SUFFIX = "whisper/assets/gpt2.tiktoken"

# Known GPT-2 encodings (from the hub tokenizer / tiktoken "gpt2"); text -> ids, special tokens allowed.
KNOWN_ENCODINGS: dict[str, list[int]] = {
    "Hello world": [15496, 995],
    " the": [262],
    EOT_TOKEN: [50256],
}
ROUND_TRIP_TEXTS = (
    "Zażółć gęślą jaźń, źdźbło",
    "Hello world! It's 2024 —  tabs\there,\n\nnew lines, emoji 🙂 and 中文.",
)


class ConversionError(RuntimeError):
    """The ranks do not rebuild into a GPT-2 tokenizer that passes the checks."""


def read_ranks_text(whisper_sdist: Path | None, ranks: Path | None) -> str:
    """The gpt2.tiktoken text, from the file itself or from inside the openai-whisper sdist."""
    if ranks is not None:
        return ranks.read_text(encoding="ascii")
    assert whisper_sdist is not None
    with tarfile.open(whisper_sdist, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(RANKS_MEMBER_SUFFIX)]
        if len(members) != 1:
            raise ConversionError(f"{whisper_sdist}: expected one {RANKS_MEMBER_SUFFIX}, found {len(members)}")
        handle = tar.extractfile(members[0])
        assert handle is not None
        return handle.read().decode("ascii")


def parse_ranks(text: str) -> dict[bytes, int]:
    """`base64 rank` lines -> {token bytes: rank}; ranks must be exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        token_b64, rank = line.split()
        token = base64.b64decode(token_b64)
        if token in ranks:
            raise ConversionError(f"line {line_no}: duplicate token {token!r}")
        ranks[token] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConversionError("ranks are not a permutation of 0..n-1")
    single_bytes = {t for t in ranks if len(t) == 1}
    if len(single_bytes) != 256:
        raise ConversionError(f"expected all 256 single bytes as tokens, found {len(single_bytes)}")
    return ranks


def bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int | None = None) -> list[bytes]:
    """Rank-based byte BPE (tiktoken's): merge the adjacent pair whose join has the lowest rank, repeatedly.

    With `max_rank`, only tokens ranked below it may be formed.
    """
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is None or (max_rank is not None and rank >= max_rank):
                continue
            if best_rank is None or rank < best_rank:
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: its bytes BPE-encoded with only lower-ranked tokens."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = bpe_split(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ConversionError(f"token {token!r} (rank {rank}) splits into {len(parts)} parts, not 2")
        merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]) -> Tokenizer:
    """A `tokenizers` byte-level BPE laid out like GPT-2's tokenizer.json, with `<|endoftext|>` appended."""
    alphabet = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    bpe = models.BPE(vocab=vocab, merges=[(spell(a), spell(b)) for a, b in merges], dropout=None,
                     unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                     fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    if tokenizer.token_to_id(EOT_TOKEN) != len(ranks):
        raise ConversionError(f"{EOT_TOKEN} got id {tokenizer.token_to_id(EOT_TOKEN)}, expected {len(ranks)}")
    return tokenizer


def wrap_for_transformers(tokenizer: Tokenizer):
    """The `transformers` fast tokenizer that `save_pretrained` writes (bos/eos/unk = `<|endoftext|>`)."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token=EOT_TOKEN, eos_token=EOT_TOKEN,
                             unk_token=EOT_TOKEN, add_prefix_space=False,
                             model_max_length=GPT2_MODEL_MAX_LENGTH)


def reference_ids(ranks: dict[bytes, int], tokenizer: Tokenizer, text: str) -> list[int]:
    """Rank-BPE ids of `text` (pure Python, no merges list), pre-tokenized by the tokenizer's own regex."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ids: list[int] = []
    for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text):
        ids.extend(ranks[part] for part in bpe_split(ranks, bytes(byte_of[c] for c in piece)))
    return ids


def verify(hf, ranks: dict[bytes, int], extra_texts: tuple[str, ...] = ()) -> list[str]:
    """Check `hf` (a transformers fast tokenizer) is GPT-2's; return lines describing what passed, or raise."""
    report: list[str] = []
    failures: list[str] = []
    if len(hf) != GPT2_VOCAB_SIZE:
        failures.append(f"len(tokenizer) = {len(hf)}, expected {GPT2_VOCAB_SIZE}")
    report.append(f"len(tokenizer) = {len(hf)}; eos_token_id = {hf.eos_token_id}; "
                  f"bos/eos/unk = {hf.bos_token}/{hf.eos_token}/{hf.unk_token}")
    if hf.eos_token_id != GPT2_VOCAB_SIZE - 1:
        failures.append(f"eos_token_id = {hf.eos_token_id}, expected {GPT2_VOCAB_SIZE - 1}")
    for text, want in KNOWN_ENCODINGS.items():
        got = hf.encode(text, add_special_tokens=False)
        report.append(f"encode({text!r}) = {got}")
        if got != want:
            failures.append(f"encode({text!r}) = {got}, expected {want}")
    backend = hf.backend_tokenizer
    for text in (*ROUND_TRIP_TEXTS, *extra_texts):
        ids = backend.encode(text, add_special_tokens=False).ids  # backend: no max-length warning on long files
        back = backend.decode(ids, skip_special_tokens=False)
        ref = reference_ids(ranks, backend, text)
        short = text if len(text) <= 60 else text[:57] + "..."
        report.append(f"round trip {short!r}: {len(ids)} tokens, decode==text {back == text}, "
                      f"== rank-BPE reference {ids == ref}")
        if back != text:
            failures.append(f"decode(encode({short!r})) = {back[:60]!r} != text")
        if ids != ref:
            failures.append(f"encode({short!r}) differs from the rank-BPE reference")
    if failures:
        raise ConversionError("GPT-2 tokenizer verification failed:\n  " + "\n  ".join(failures))
    return report


def save(hf, out: Path, overwrite: bool) -> list[str]:
    """`save_pretrained` into `out` (refusing a non-empty dir unless `overwrite`); returns the file names."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} exists and is not empty (pass --overwrite to write into it)")
    out.mkdir(parents=True, exist_ok=True)
    return [Path(p).name for p in hf.save_pretrained(str(out))]


def reload_and_verify(out: Path, ranks: dict[bytes, int], extra_texts: tuple[str, ...] = ()) -> list[str]:
    """Load the saved dir the way data_prep does (`AutoTokenizer`, fast) and verify it again."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out), use_fast=True)
    if not hf.is_fast:
        raise ConversionError(f"{out} did not load as a fast tokenizer")
    return verify(hf, ranks, extra_texts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--whisper-sdist", type=Path, help="openai-whisper sdist (.tar.gz) holding gpt2.tiktoken")
    source.add_argument("--ranks", type=Path, help="an extracted gpt2.tiktoken (base64 token + rank per line)")
    parser.add_argument("--out", type=Path, required=True, help="directory to save the tokenizer into")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--check-text", type=Path, action="append", default=[], metavar="PATH",
                        help="also check this UTF-8 file round-trips and matches the rank-BPE reference "
                             "(repeatable), e.g. data_prep/sample/polish_sample.jsonl")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        ranks = parse_ranks(read_ranks_text(args.whisper_sdist, args.ranks))
        merges = recover_merges(ranks)
        t_merges = time.perf_counter() - start
        hf = wrap_for_transformers(build_tokenizer(ranks, merges))
        extra = tuple(path.read_text(encoding="utf-8") for path in args.check_text)
        lines = verify(hf, ranks, extra)
        files = save(hf, args.out, args.overwrite)
        lines += ["after save + AutoTokenizer reload:", *reload_and_verify(args.out, ranks, extra)]
    except (ConversionError, OSError, tarfile.TarError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(ranks)} ranks -> {len(merges)} merges ({t_merges:.1f}s)")
    print("\n".join(lines))
    print(f"saved {', '.join(sorted(files))} to {args.out} in {time.perf_counter() - start:.1f}s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
