"""Benchmark `prepare` against the tokenizer's own batch encoder on the same text, and its peak RSS.

    python bench/bench_prepare.py                    # 40 MB and 120 MB generated corpora, table on stdout
    python bench/bench_prepare.py --sizes-mb 10 --write docs/results/data_prep_bench.md

Every measurement runs in a fresh subprocess so each peak RSS (ru_maxrss) is its own. The BPE is trained once
(on the smaller corpus, timed separately) and reused through `tokenizer_path`, so the prepare rows time what
scales with the corpus: read + split + encode + shard writing. "raw" rows time only the encode calls on batches
already in memory (reading excluded): the ceiling prepare is compared against. Ratios are given in wall time and
in process CPU time (all threads); the CPU ratio is the one that survives other load on a shared machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_prepare(corpus: Path, tokenizer: Path | None, out: Path) -> dict:
    from data_prep import prepare_dataset

    start, cpu_start = time.perf_counter(), time.process_time()
    prepare_dataset(corpus, out, tokenizer_path=tokenizer, vocab_size=10_000, seq_len=512, overwrite=True,
                    progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    manifest = json.loads((out / "manifest.json").read_text())
    splits = manifest["splits"].values()
    real = sum(s["num_tokens"] - s["num_documents"] for s in splits)  # without the EOTs, as raw encode counts
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": real, "peak_rss_mib": _peak_rss_mib()}


def worker_raw(corpus: Path, tokenizer: Path, method: str) -> dict:
    from tokenizers import Tokenizer

    from data_prep.corpus import Corpus
    from data_prep.prepare import DEFAULT_BATCH_CHARS

    tok = Tokenizer.from_file(str(tokenizer))
    batches = list(Corpus.from_path(corpus).batches(DEFAULT_BATCH_CHARS))
    encode = getattr(tok, method)
    tokens = 0
    seconds = cpu = 0.0
    for batch in batches:
        start, cpu_start = time.perf_counter(), time.process_time()  # process_time counts every Rust thread
        encodings = encode(batch, add_special_tokens=False)
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        tokens += sum(len(e) for e in encodings)
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "peak_rss_mib": _peak_rss_mib()}


def run_worker(*args: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, __file__, "_worker", *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_corpus(path: Path, size_mb: int, seed: int) -> Path:
    from data_prep.prepare import SAMPLE_CORPUS
    from data_prep.synthetic import synthetic_documents, write_jsonl

    if not path.exists() or abs(path.stat().st_size - size_mb * 1e6) > 0.05 * size_mb * 1e6:
        base = SAMPLE_CORPUS if SAMPLE_CORPUS.exists() else None
        write_jsonl(path, synthetic_documents(size_mb * 10**6, seed=seed, base=base))
    return path


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import tokenizers

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, tokenizers {tokenizers.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[40, 120])
    parser.add_argument("--repeats", type=int, default=2, help="best of N per measurement (shared machines are noisy)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/data_prep_bench"))
    parser.add_argument("--write", type=Path, default=None, help="also write the results as markdown here")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    corpora = {mb: make_corpus(args.work_dir / f"corpus-{mb}mb.jsonl", mb, seed=mb) for mb in args.sizes_mb}
    smallest = min(corpora)
    trained = run_worker("prepare", str(corpora[smallest]), "-", str(args.work_dir / "trained"))
    tokenizer = args.work_dir / "tokenizer.json"
    shutil.copy(args.work_dir / "trained" / "tokenizer.json", tokenizer)

    rows = []
    for mb, corpus in corpora.items():
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # interleaved, so background load hits every variant alike
            for name, worker_args in (("raw encode_batch", ("raw", str(corpus), str(tokenizer), "encode_batch")),
                                      ("raw encode_batch_fast", ("raw", str(corpus), str(tokenizer), "encode_batch_fast")),
                                      ("prepare", ("prepare", str(corpus), str(tokenizer), str(args.work_dir / "out")))):
                r = run_worker(*worker_args)
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
        for name, r in best.items():
            rows.append({"corpus_mb": corpus.stat().st_size / 1e6, "what": name, **r,
                         "tokens_per_s": r["tokens"] / r["seconds"],
                         "vs_encode_batch": best["raw encode_batch"]["seconds"] / r["seconds"],
                         "vs_encode_batch_fast": best["raw encode_batch_fast"]["seconds"] / r["seconds"],
                         "cpu_vs_encode_batch": best["raw encode_batch"]["cpu_seconds"] / r["cpu_seconds"],
                         "cpu_vs_encode_batch_fast": best["raw encode_batch_fast"]["cpu_seconds"] / r["cpu_seconds"]})
        print(f"{mb} MB done", file=sys.stderr)

    table = ["| corpus (MB) | what | tokens | wall s | tokens/s | x encode_batch (wall) | x encode_batch_fast (wall) "
             "| CPU s | x encode_batch (CPU) | x encode_batch_fast (CPU) | peak RSS (MiB) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    table += [f"| {r['corpus_mb']:.0f} | {r['what']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['vs_encode_batch']:.2f} | {r['vs_encode_batch_fast']:.2f} | {r['cpu_seconds']:.1f} | "
              f"{r['cpu_vs_encode_batch']:.2f} | {r['cpu_vs_encode_batch_fast']:.2f} | {r['peak_rss_mib']:.0f} |"
              for r in rows]
    train_line = (f"BPE training + prepare of the {corpora[smallest].stat().st_size / 1e6:.0f} MB corpus (vocab 10,000, "
                  f"seq_len 512): {trained['seconds']:.1f} s, peak RSS {trained['peak_rss_mib']:.0f} MiB.")
    report = "\n".join(table) + "\n\n" + train_line
    print(report)
    if args.write:
        command = "python bench/bench_prepare.py " + " ".join(sys.argv[1:])
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(
            f"# data_prep benchmark\n\n- date: {datetime.date.today().isoformat()}\n- machine: {machine()}\n"
            f"- command: `{command}`\n- corpus: generated by `data_prep.synthetic` (sentences of the shipped sample "
            f"recombined into distinct documents), JSONL\n- best of {args.repeats} runs each, every run in a fresh "
            f"process (peak RSS = its ru_maxrss)\n\n{report}\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind, *rest = sys.argv[2:]
        if kind == "prepare":
            corpus, tok, out = rest
            result = worker_prepare(Path(corpus), None if tok == "-" else Path(tok), Path(out))
        else:
            corpus, tok, method = rest
            result = worker_raw(Path(corpus), Path(tok), method)
        print(json.dumps(result))
    else:
        main()
