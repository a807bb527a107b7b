"""`python -m data_prep {list,download,prepare}`: a thin CLI over the data_prep functions."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DataPrepError
from .hub import DEFAULT_DATA_DIR, SPEAKLEASH_URL_ENV, download_dataset, list_datasets
from .prepare import DEFAULT_SHARD_ROWS, SAMPLE_CORPUS, prepare_dataset
from .reader import open_dataset


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line and exit status 2, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_list(args: argparse.Namespace) -> None:
    if sys.stderr.isatty():  # a progress note for a person waiting; logs and failures stay one line
        print("fetching the speakleash index and each dataset's manifest...", file=sys.stderr)
    datasets = list_datasets(args.data_dir, url=args.url)
    width = max((len(d.name) for d in datasets), default=4)
    print(f"{'name':<{width}}  {'documents':>12}  {'size':>10}")
    for d in datasets:
        print(f"{d.name:<{width}}  {d.documents:>12,}  {_human(d.size_bytes):>10}")
    print(f"{len(datasets)} datasets", file=sys.stderr)


def cmd_download(args: argparse.Namespace) -> None:
    path = download_dataset(args.name, args.data_dir, url=args.url)
    print(f"downloaded {args.name} to {path}")
    print(f"next: python -m data_prep prepare --input {path}")


def cmd_prepare(args: argparse.Namespace) -> None:
    out = prepare_dataset(args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                          seq_len=args.seq_len, seed=args.seed, tokenizer_path=args.tokenizer_path,
                          overwrite=args.overwrite, progress=not args.quiet, shard_rows=args.shard_rows)
    ds = open_dataset(out, verify="none")
    rows = ", ".join(f"{s} {ds.split(s).num_rows:,} rows" for s in ds.manifest["splits"])
    print(f"prepared dataset written to {out} ({ds.manifest['tokenizer']} vocab {ds.vocab_size}, "
          f"seq_len {ds.seq_len}: {rows})")


_URL_HELP = f"speakleash index URL (default: ${SPEAKLEASH_URL_ENV}, else the one speakleash ships)"


def build_parser() -> argparse.ArgumentParser:
    """Every option's help ends with its default, so `--help` documents what a bare command does."""
    parser = _Parser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("list", help="list speakleash Polish datasets (name, documents, size)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="speakleash cache dir (default: %(default)s)")
    p.add_argument("--url", default=None, help=_URL_HELP)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("download", help="download one speakleash dataset (.jsonl.zst)")
    p.add_argument("name", help="dataset name, as `list` shows it (no default)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where to put it (default: %(default)s)")
    p.add_argument("--url", default=None, help=_URL_HELP)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("prepare", help="tokenize a corpus into Arrow token shards")
    p.add_argument("--input", type=Path, default=None,
                   help=".jsonl[.zst] with a 'text' field, .txt (blank-line separated), or a directory of them "
                        f"(default: the shipped sample {SAMPLE_CORPUS.name})")
    p.add_argument("--tokenizer", choices=("bpe", "gpt2"), default="bpe",
                   help="bpe: train a byte-level BPE on the train split; gpt2: GPT-2's (default: %(default)s)")
    p.add_argument("--tokenizer-path", default=None,
                   help="gpt2: hub name or saved tokenizer dir; bpe: reuse a trained tokenizer.json "
                        "(default: gpt2 for gpt2, none for bpe: train one)")
    p.add_argument("--vocab-size", type=int, default=10_000, help="bpe vocabulary size (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="output dir (default: prepared/<input stem>-<tokenizer><vocab>-s<seq_len>)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the document-level train/val/test split (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that this tool prepared, atomically (default: off, refuse)")
    p.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="rows per shard (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes (default: off, show them)")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
