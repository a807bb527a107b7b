"""What does the trainable's measurement and reporting cost? A plain PyTorch loop vs `run_trial`, one GPU.

For each technique, in ONE process: (1) a plain loop over the same model, optimizer, schedule and data path
with no measurement at all, timed by wall clock between two synchronisations; (2) `run_trial` with per-phase
memory peaks, CUDA-event timing and a report every step, timed by wall clock between the arrival of two
reports (steps warmup+1 .. N-1; the last step also evaluates and is left out). Prints a markdown table.

    python bench/bench_trainable.py --synthetic 8192                       # random tokens, seed model, batch 128
    python bench/bench_trainable.py --data data/prepared --techniques baseline,flash --steps 50
    python bench/bench_trainable.py --synthetic 8192 --report tune         # the real tune.report inside a Tune trial

--report mimic (default) hands each report to a consumer thread and blocks until it is logged, like Tune's
function-trainable session does; --report none measures the trainable's own host work only.
"""
from __future__ import annotations

import argparse
import json
import math
import queue
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainable import TECHNIQUES, ConfigError, TrialConfig, run_trial  # noqa: E402
from trainable.attention import select_kernel  # noqa: E402
from trainable.losses import LOSSES  # noqa: E402
from trainable.precision import PRECISIONS, tf32_matmuls  # noqa: E402
from trainable.trial import build_model, build_optimizer, lr_multiplier, open_trial_data  # noqa: E402

DEFAULT_TECHNIQUES = "baseline,bf16,flash,gradcp,window16"


# -- data ---------------------------------------------------------------------------------------------
def write_synthetic_dataset(root: Path, *, vocab_size: int, seq_len: int, rows: dict[str, int], seed: int = 0) -> Path:
    """A Contract 1 dataset of uniformly random tokens (speed does not depend on the text)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    row_len = seq_len + 1
    dtype, arrow_type = ("uint16", pa.uint16()) if vocab_size <= 2**16 else ("uint32", pa.uint32())
    schema = pa.schema([pa.field("tokens", pa.list_(arrow_type, row_len), nullable=False)])
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in rows.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        values = rng.integers(0, vocab_size, size=n * row_len).astype(dtype)
        column = pa.FixedSizeListArray.from_arrays(pa.array(values, type=arrow_type), row_len)
        path = root / split / "00000.arrow"
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.record_batch([column], schema=schema))
        splits[split] = {"num_documents": n, "num_tokens": n * row_len, "num_rows": n, "num_pad_tokens": 0,
                         "shards": [{"path": f"{split}/00000.arrow", "num_rows": n, "num_tokens": n * row_len,
                                     "num_bytes": path.stat().st_size, "sha256": ""}]}
    manifest = {"format_version": 1, "tokenizer": "bpe", "tokenizer_path": "tokenizer.json", "vocab_size": vocab_size,
                "seq_len": seq_len, "row_len": row_len, "eot_id": 0, "dtype": dtype, "seed": seed,
                "sources": ["synthetic uniform tokens (bench)"], "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# -- reporting ----------------------------------------------------------------------------------------
class TuneLikeReport:
    """report(): copy + timestamp, hand to a consumer thread that logs it as JSON, block until consumed
    (the handshake of Tune's function-trainable session, without Ray)."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._consumed = threading.Semaphore(0)
        self.log: list[str] = []
        threading.Thread(target=self._consume, daemon=True).start()

    def _consume(self) -> None:
        while True:
            result = self._queue.get()
            self.log.append(json.dumps(result, default=str))
            self._consumed.release()

    def __call__(self, metrics: dict) -> None:
        result = dict(metrics, timestamp=int(time.time()))
        self._queue.put(result)
        self._consumed.acquire()


def make_report(kind: str):
    if kind == "mimic":
        return TuneLikeReport()
    if kind == "tune":
        from ray import tune

        return tune.report
    return lambda metrics: None


# -- the two loops ------------------------------------------------------------------------------------
def plain_loop(cfg: TrialConfig, steps: int, warmup: int) -> dict:
    """The same model/optimizer/schedule/data path with no measurement: wall clock over `steps` steps."""
    cuda = cfg.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    data = open_trial_data(cfg)
    precision = PRECISIONS[cfg.precision]
    kernel = select_kernel(cfg.attention, cfg.precision, device.type, cfg.kernel)
    loss_fn = LOSSES[cfg.loss]
    model = build_model(cfg, data.vocab_size, kernel).to(device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, warmup + steps))
    batches = data.train.iter_batches(cfg.batch_size, seed=cfg.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tf32_matmuls(precision.tf32_active(device.type)):
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            tokens = torch.from_numpy(next(batches)[:, : cfg.seq_len + 1])
            if cuda:
                tokens = tokens.pin_memory().to(device, non_blocking=True)
            with precision.autocast(device.type):
                loss = loss_fn(model(tokens[:, :-1]), model.output_weight, tokens[:, 1:])
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        sync()
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan
    result = {"tok_s": steps * cfg.tokens_per_step / seconds, "peak_mib": peak, "loss": loss.item()}
    del model, optimizer, scheduler, loss
    if cuda:
        torch.cuda.empty_cache()
    return result


def trainable_loop(cfg: TrialConfig, steps: int, warmup: int, report_kind: str) -> dict:
    """run_trial with measurement and a report per step; speed from the report arrival times."""
    report = make_report(report_kind)
    arrivals: dict[int, float] = {}
    peaks: list[float] = []

    def timed_report(metrics: dict) -> None:
        arrivals[metrics["step"]] = time.perf_counter()
        peaks.append(metrics["mem_step_peak_mib"])
        report(metrics)

    final = run_trial(cfg, timed_report)
    if final.get("oom"):
        return {"tok_s": math.nan, "peak_mib": math.nan, "oom": True, "kernel": final["attention_kernel"]}
    first, last = warmup, warmup + steps - 1  # report k arrives once step k is done and step k+1 is queued
    seconds = arrivals[last] - arrivals[first]
    return {"tok_s": (last - first) * cfg.tokens_per_step / seconds, "peak_mib": max(peaks),
            "kernel": final["attention_kernel"], "report_ms": 1000 * final["report_time_s"] / final["step"],
            "step_time_s": final["step_time_s"]}


# -- driver -------------------------------------------------------------------------------------------
def technique_switches(name: str) -> dict:
    """`flash`, `gradcp`, ... or `window16` / `window_gradcp16` (a window preset with its size appended)."""
    match = re.fullmatch(r"([a-z0-9_]*?[a-z_])(\d+)", name)
    if name in TECHNIQUES:
        return {"technique": name}
    if match and match.group(1) in TECHNIQUES and TECHNIQUES[match.group(1)]["attention"] == "window":
        return {"technique": match.group(1), "window": int(match.group(2))}
    raise ConfigError(f"unknown technique {name!r}: use {', '.join(TECHNIQUES)} (window ones as window16)")


def bench(args: argparse.Namespace) -> str:
    rows = ["| technique | kernel | tok/s plain | tok/s trainable | ratio | peak MiB plain | peak MiB trainable "
            "| report ms/step |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.techniques.split(","):
        cfg = TrialConfig.from_dict({
            **technique_switches(name), "data_dir": args.data, "device": args.device, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "n_layers": args.n_layers, "d_model": args.d_model, "n_heads": args.n_heads,
            "ff_dim": args.ff_dim, "max_steps": args.warmup + args.steps + 1, "warmup_steps": 2,
            "eval_interval": 0, "eval_batches": 1, "eval_batch_size": min(args.batch_size, 16), "seed": 0,
        })
        plain = plain_loop(cfg, args.steps, args.warmup)
        measured = trainable_loop(cfg, args.steps, args.warmup, args.report)
        ratio = measured["tok_s"] / plain["tok_s"]
        rows.append(f"| {cfg.label} | {measured['kernel']} | {plain['tok_s']:,.0f} | {measured['tok_s']:,.0f} | "
                    f"{ratio:.3f} | {plain['peak_mib']:,.0f} | {measured['peak_mib']:,.0f} | "
                    f"{measured.get('report_ms', math.nan):.2f} |")
        print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (CPU smoke run)"
    header = (f"GPU {gpu}, torch {torch.__version__}, batch {args.batch_size} x seq {args.seq_len}, model "
              f"{args.n_layers}L/{args.d_model}d/{args.n_heads}h/{args.ff_dim}ff, {args.steps} timed steps after "
              f"{args.warmup} warm-up, report={args.report}")
    return header + "\n\n" + "\n".join(rows) + "\n"


def _bench_in_tune(config: dict) -> None:
    """Tune trial body for --report tune: the whole bench in one trial process, tune.report for real."""
    args = argparse.Namespace(**config["args"])
    Path(args.table_out).write_text(bench(args))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a prepared dataset directory")
    src.add_argument("--synthetic", type=int, metavar="VOCAB", help="random tokens with this vocabulary size")
    p.add_argument("--techniques", default=DEFAULT_TECHNIQUES)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--ff-dim", type=int, default=2048)
    p.add_argument("--report", choices=("mimic", "tune", "none"), default="mimic")
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the script only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_trainable: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.data:
        args.data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory(prefix="bench_trainable_") as tmp:
        if args.synthetic:
            rows = (args.warmup + args.steps + 2) * args.batch_size
            args.data = str(write_synthetic_dataset(Path(tmp) / "data", vocab_size=args.synthetic,
                                                    seq_len=args.seq_len, rows={"train": rows, "val": 64, "test": 1}))
        try:
            if args.report == "tune":
                table = _run_under_tune(args, Path(tmp))
            else:
                table = bench(args)
        except ConfigError as exc:
            print(f"bench_trainable: error: {exc}", file=sys.stderr)
            return 2
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


def _run_under_tune(args: argparse.Namespace, tmp: Path) -> str:
    import ray
    from ray import tune

    args.table_out = str(tmp / "table.md")
    gpus = 1 if args.device == "cuda" else 0
    ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=True)
    try:
        tuner = tune.Tuner(tune.with_resources(_bench_in_tune, {"cpu": 1, "gpu": gpus}),
                           param_space={"args": vars(args)},
                           run_config=tune.RunConfig(name="bench_trainable", storage_path=str(tmp / "ray"), verbose=0))
        result = tuner.fit()[0]
        if result.error is not None:
            raise RuntimeError(f"bench trial failed: {result.error}")
    finally:
        ray.shutdown()
    return Path(args.table_out).read_text()


if __name__ == "__main__":
    raise SystemExit(main())
