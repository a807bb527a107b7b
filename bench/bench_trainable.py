"""Plain PyTorch loop vs the trainable, side by side in ONE process on one GPU: speed, memory, MFU.

For each technique and vocabulary: (1) a plain loop over the same model, optimizer, schedule and data
path with no measurement at all (eager; with `+compile` the same torch.compile of forward + loss, whose
backward AOTAutograd compiles), timed by wall clock between two synchronisations after the warm-up;
(2) `run_trial` with per-phase memory peaks, CUDA-event timing and a report every step, timed by wall
clock between the arrival of two reports (steps warmup+1 .. N-1; the last step also evaluates and is
left out). Both speeds of the trainable are shown: wall clock (what the user waits; `ratio` is it over
the plain loop's) and GPU time (its CUDA-event figure, `steady_tokens_per_s`). Prints a markdown table.
The seed model at batch 128 x 512 tokens by default, on random tokens with vocabularies of 10k and 50257.
Checkpointing's cost (none / every N steps / every M minutes, in a real Tune trial) is bench_checkpoint.py.

    python bench/bench_trainable.py                                            # defaults, < 6 min on an H200
    python bench/bench_trainable.py --vocabs 50257 --techniques flash,flash+compile,fused_ce+compile
    python bench/bench_trainable.py --techniques flash+compile --vocabs 10000 --report tune   # in a Tune trial
    python bench/bench_trainable.py --profile fused_ce+compile --vocabs 50257  # top CUDA kernels -> a file

A technique is a preset (`baseline`, `flash`, `fused_ce`, ..., window ones with their size: `window16`)
plus `+` modifiers: `+compile`, `+fused_ce`, `+sac` (selective checkpointing), `+gradcp` (full).
--report mimic (default) hands each report to a thread and blocks until it is logged, like Tune's
function-trainable session; none: the trainable's own host work only; tune: all in one real Tune trial.
"""
from __future__ import annotations

import argparse
import hashlib
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

from trainable import TECHNIQUES, ConfigError, TrialConfig, is_oom_error, run_trial  # noqa: E402
from trainable.compile_policy import build_forward_loss, release_compiled  # noqa: E402
from trainable.flops import mfu, model_flops_per_token, peak_bf16_flops  # noqa: E402
from trainable.losses import loss_for  # noqa: E402
from trainable.precision import tf32_matmuls  # noqa: E402
from trainable.setup import build_optimizer, build_run, lr_multiplier, model_config  # noqa: E402

DEFAULT_TECHNIQUES = "baseline,flash,flash+compile,fused_ce,fused_ce+compile,flash+sac"
DEFAULT_VOCABS = "10000,50257"
MODIFIERS: dict[str, dict] = {"compile": {"compile": True}, "fused_ce": {"loss": "fused_ce"},
                               "fusedce": {"loss": "fused_ce"}, "sac": {"checkpointing": "selective"},
                               "selective": {"checkpointing": "selective"}, "gradcp": {"checkpointing": "full"}}


def write_synthetic_dataset(root: Path, *, vocab_size: int, seq_len: int, rows: dict[str, int], seed: int = 0) -> Path:
    """A Contract 1 dataset of uniformly random tokens (speed does not depend on the text), sweep-ready."""
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
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        splits[split] = {"num_documents": n, "num_tokens": n * row_len, "num_rows": n, "num_pad_tokens": 0,
                         "shards": [{"path": f"{split}/00000.arrow", "num_rows": n, "num_tokens": n * row_len,
                                     "num_bytes": path.stat().st_size, "sha256": digest}]}
    manifest = {"format_version": 1, "tokenizer": "bpe", "tokenizer_path": "tokenizer.json", "vocab_size": vocab_size,
                "seq_len": seq_len, "row_len": row_len, "eot_id": 0, "dtype": dtype, "seed": seed,
                "sources": ["synthetic uniform tokens (bench)"], "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


class TuneLikeReport:
    """report(): copy + timestamp, hand to a consumer thread that logs it as JSON, block until consumed
    (the handshake of Tune's function-trainable session, without Ray)."""

    def __init__(self):
        self._queue, self._consumed, self.log = queue.Queue(maxsize=1), threading.Semaphore(0), []
        threading.Thread(target=self._consume, daemon=True).start()

    def _consume(self) -> None:
        while True:
            self.log.append(json.dumps(self._queue.get(), default=str))
            self._consumed.release()

    def __call__(self, metrics: dict) -> None:
        self._queue.put(dict(metrics, timestamp=int(time.time())))
        self._consumed.acquire()


def make_report(kind: str):
    if kind == "tune":
        from ray import tune

        return tune.report
    return TuneLikeReport() if kind == "mimic" else (lambda metrics: None)


def plain_loop(cfg: TrialConfig, steps: int, warmup: int, on_step=None) -> dict:
    """The same model/optimizer/schedule/data path with no measurement: wall clock over `steps` steps.
    With `compile`, the same torch.compile of forward + loss the trainable makes (backward compiled too)."""
    run = build_run(cfg)  # the trial's own set-up: device, data, kernel, model
    device, precision, kernel = run.device, run.precision, run.kernel
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = run.build_model().to(device)
    if kernel.prepare is not None:
        kernel.prepare(cfg.seq_len, cfg.window, device)
    step_loss = build_forward_loss(model, cfg.loss, loss_for(cfg.loss, cfg.loss_precision), cfg.compile)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, warmup + steps))
    batches = (rows for _, _, rows in run.batches())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tf32_matmuls(precision.tf32_active(device.type)):
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            tokens = torch.from_numpy(next(batches)[:, : cfg.seq_len + 1])
            if cuda:
                tokens = tokens.pin_memory().to(device, non_blocking=True)
            with precision.autocast(device.type):
                loss = step_loss(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if on_step is not None:
                on_step()
        sync()
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan
    result = {"tok_s": steps * cfg.tokens_per_step / seconds, "peak_mib": peak, "loss": loss.item(),
              "warmup_s": t0 - started}
    del model, optimizer, scheduler, loss, step_loss
    if cfg.compile:
        release_compiled()
    if cuda:
        torch.cuda.empty_cache()
    return result


def trainable_loop(cfg: TrialConfig, steps: int, warmup: int, report_kind: str, checkpoint_io=None) -> dict:
    """run_trial with measurement and a report per step; speed from the report arrival times."""
    report, arrivals, step_times, peaks = make_report(report_kind), {}, {}, []

    def record(metrics: dict) -> None:
        arrivals[metrics["step"]], step_times[metrics["step"]] = time.perf_counter(), metrics["step_time_s"]
        peaks.append(metrics["mem_step_peak_mib"])

    final = run_trial(cfg, lambda metrics: (record(metrics), report(metrics)),
                      checkpoint_io=checkpoint_io and checkpoint_io(record))
    if final.get("oom"):
        return {"tok_s": math.nan, "peak_mib": math.nan, "oom": True, "kernel": final["attention_kernel"]}
    first, last = warmup, warmup + steps - 1  # report k arrives once step k is done and step k+1 is queued
    seconds = arrivals[last] - arrivals[first]
    # Each step's own time (CUDA events on a GPU) against the wall time of the same steps: what is left is
    # time the GPU spent between steps, waiting for the host. The slowest step shows a one-off stall.
    timed = [step_times[k] for k in range(first + 1, last + 1)]
    return {"tok_s": (last - first) * cfg.tokens_per_step / seconds, "peak_mib": max(peaks),
            "idle": max(0.0, 1 - sum(timed) / seconds), "step_ms": 1000 * float(np.median(timed)),
            "max_step_ms": 1000 * max(timed), "final": final,
            "kernel": final["attention_kernel"], "report_ms": 1000 * final["report_time_s"] / final["step"],
            "compile_s": final["compile_time_s"], "steady_tok_s": final["steady_tokens_per_s"],
            "peak_flops": final["peak_flops"]}


def technique_switches(spec: str) -> dict:
    """`flash`, `gradcp`, `window16` (a window preset with its size appended), each with `+modifier`s:
    `flash+compile+fused_ce` -> the flash preset with compile on and the fused CE loss."""
    name, *mods = spec.strip().split("+")
    if name in TECHNIQUES:
        switches: dict = {"technique": name}
    else:
        match = re.fullmatch(r"([a-z0-9_]*?[a-z_])(\d+)", name)
        if not (match and match.group(1) in TECHNIQUES and TECHNIQUES[match.group(1)]["attention"] == "window"):
            raise ConfigError(f"unknown technique {name!r}: use {', '.join(TECHNIQUES)} (window ones as window16)")
        switches = {"technique": match.group(1), "window": int(match.group(2))}
    for mod in mods:
        if mod not in MODIFIERS:
            raise ConfigError(f"unknown modifier +{mod} in {spec!r}: use {', '.join('+' + m for m in MODIFIERS)}")
        switches.update(MODIFIERS[mod])
    return switches


def trial_config(args: argparse.Namespace, spec: str, data_dir: str) -> TrialConfig:
    return TrialConfig.from_dict({
        **technique_switches(spec), "data_dir": data_dir, "device": args.device, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "n_layers": args.n_layers, "d_model": args.d_model, "n_heads": args.n_heads,
        "ff_dim": args.ff_dim, "max_steps": args.warmup + args.steps + 1, "warmup_steps": 2,
        "eval_interval": 0, "eval_batches": 1, "eval_batch_size": min(args.batch_size, 16), "seed": 0,
        "peak_flops": args.peak_flops,
    })


def _num(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def bench_one(args: argparse.Namespace, spec: str, data_dir: str, vocab: int | str) -> str:
    """One table row: the plain loop, then the trainable, for one technique."""
    cfg = trial_config(args, spec, data_dir)
    plain = {"tok_s": math.nan, "peak_mib": math.nan}
    if args.plain:
        try:
            plain = plain_loop(cfg, args.steps, args.warmup)
        except Exception as exc:  # noqa: BLE001 - an OOM is a table entry (NaN), anything else a bug
            if not is_oom_error(exc):
                raise
            release_compiled()
            torch.cuda.empty_cache()
    measured = trainable_loop(cfg, args.steps, args.warmup, args.report)
    vocab_size = build_run(cfg).data.vocab_size
    flops = model_flops_per_token(model_config(cfg, vocab_size), cfg.window)
    gpu = torch.cuda.get_device_name() if cfg.device == "cuda" else None
    peak = peak_bf16_flops(gpu, args.peak_flops)
    ratio = measured["tok_s"] / plain["tok_s"]
    return (f"| {cfg.label} | {vocab} | {measured['kernel']} | {_num(plain['tok_s'], ',.0f')} | "
            f"{_num(measured['tok_s'], ',.0f')} | {_num(ratio, '.3f')} | "
            f"{_num(measured.get('steady_tok_s', math.nan), ',.0f')} | {_num(plain['peak_mib'], ',.0f')} | "
            f"{_num(measured['peak_mib'], ',.0f')} | {_num(mfu(plain['tok_s'], flops, peak), '.1%')} | "
            f"{_num(mfu(measured['tok_s'], flops, peak), '.1%')} | "
            f"{_num(measured.get('compile_s', math.nan), '.1f')} | "
            f"{_num(measured.get('report_ms', math.nan), '.2f')} | {_num(measured.get('idle', math.nan), '.1%')} | "
            f"{_num(measured.get('step_ms', math.nan), '.1f')} / {_num(measured.get('max_step_ms', math.nan), '.1f')} |")


def bench(args: argparse.Namespace) -> str:
    rows = ["| technique | vocab | kernel | tok/s plain | tok/s trainable | ratio | GPU-time tok/s trainable | "
            "peak MiB plain | peak MiB trainable | MFU plain | MFU trainable | compile s | report ms/step | "
            "idle between steps | step ms median / max |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for vocab, data_dir in args.datasets:
        for spec in args.techniques.split(","):
            rows.append(bench_one(args, spec, data_dir, vocab))
            print(rows[-1], flush=True)
    return setting_line(args) + (
        " tok/s: wall clock (plain: between two syncs; trainable: between report arrivals), ratio = trainable / "
        "plain; GPU-time: the trainable's CUDA-event figure. MFU: model FLOPs (trainable/flops.py, causal half of "
        "attention) over the GPU's peak dense bf16 rate; compile s: the trainable's compiling steps; idle between "
        "steps: 1 - the trainable's summed step times (CUDA events) / their wall time; step ms: its timed steps' "
        "median and slowest.") + "\n\n" + "\n".join(rows) + "\n"


def setting_line(args: argparse.Namespace) -> str:
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (CPU smoke run)"
    return (f"GPU {gpu}, torch {torch.__version__}, batch {args.batch_size} x seq {args.seq_len}, model "
            f"{args.n_layers}L/{args.d_model}d/{args.n_heads}h/{args.ff_dim}ff, {args.steps} timed steps after "
            f"{args.warmup} warm-up, report={args.report}.")


def profile(args: argparse.Namespace) -> str:
    """Run the trainable for `--profile SPEC` under torch.profiler (a few steps after the warm-up) and
    write the top kernels by self device time to a text file; returns its path."""
    from torch.profiler import ProfilerActivity, schedule

    vocab, data_dir = args.datasets[0]
    cfg = trial_config(args, args.profile, data_dir)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    active = max(1, min(3, args.steps - 1))
    steps = schedule(wait=max(0, args.warmup - 1), warmup=1, active=active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=steps) as prof:
        final = run_trial(cfg, lambda metrics: prof.step(), background_reports=False)
    sort_by = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows)
    out = Path(args.profile_out or f"profile_{cfg.label}_v{vocab}_bs{cfg.batch_size}.txt")
    out.write_text(f"{cfg.label}, vocab {vocab}, batch {cfg.batch_size} x seq {cfg.seq_len}, {active} profiled steps "
                   f"after {args.warmup} warm-up, kernel {final['attention_kernel']}, sorted by {sort_by}\n\n{table}\n")
    return str(out)


def device_time(args: argparse.Namespace) -> str:
    """Kernel time per step of the plain loop and of the trainable, for each technique (under torch.profiler).

    Equal kernel time with lower throughput means the trainable leaves the GPU idle (a host stall or a sync);
    more kernel time means the measured step does extra GPU work. Either way, this says where to look.
    """
    from torch.profiler import ProfilerActivity, schedule

    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    active = max(1, args.steps - 2)

    def ms_per_step(run) -> float:
        with torch.profiler.profile(activities=activities,
                                    schedule=schedule(wait=args.warmup, warmup=1, active=active, repeat=1)) as prof:
            run(prof.step)
        return sum(getattr(e, attr) for e in prof.key_averages()) / 1000.0 / active

    unit = "kernel" if cuda else "CPU op (smoke run)"
    rows = [f"| technique | plain {unit} ms/step | trainable {unit} ms/step | ratio |", "|---|---:|---:|---:|"]
    for _, data_dir in args.datasets:
        for spec in args.techniques.split(","):
            cfg = trial_config(args, spec, data_dir)
            plain = ms_per_step(lambda step: plain_loop(cfg, args.steps, args.warmup, on_step=step))
            trainable = ms_per_step(lambda step: run_trial(cfg, lambda metrics: step(), background_reports=False))
            rows.append(f"| {cfg.label} | {plain:.2f} | {trainable:.2f} | {trainable / plain:.3f} |")
            print(rows[-1], flush=True)
    return "\n".join(rows) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a prepared dataset directory (instead of synthetic tokens)")
    src.add_argument("--vocabs", "--synthetic", dest="vocabs", default=DEFAULT_VOCABS, metavar="V[,V...]",
                     help=f"random tokens with these vocabulary sizes (default {DEFAULT_VOCABS})")
    p.add_argument("--techniques", default=DEFAULT_TECHNIQUES, help=f"comma list (default {DEFAULT_TECHNIQUES})")
    for flag, default in (("--batch-size", 128), ("--steps", 20), ("--warmup", 5), ("--seq-len", 512),
                          ("--n-layers", 6), ("--d-model", 512), ("--n-heads", 8), ("--ff-dim", 2048)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--peak-flops", type=float, help="the GPU's peak dense bf16 FLOP/s (default: looked up by name)")
    p.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain loop (trainable only)")
    p.add_argument("--report", choices=("mimic", "tune", "none"), default="mimic")
    p.add_argument("--profile", metavar="TECHNIQUE", help="profile this one technique (first vocab) instead")
    p.add_argument("--profile-out", metavar="FILE", help="where the profile table goes")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--device-time", action="store_true",
                   help="kernel time per step of both loops (is the trainable's gap idle GPU or extra work?)")
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the script only")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 2:
        p.error("--warmup must be >= 1 and --steps >= 2")
    return args


def _prepare_datasets(args: argparse.Namespace, tmp: Path) -> None:
    """args.datasets: [(vocab label, data dir)], synthetic ones written under `tmp`."""
    if args.data:
        args.datasets = [("data", str(Path(args.data).resolve()))]
        return
    try:
        vocabs = [int(v) for v in args.vocabs.split(",")]
    except ValueError:
        raise ConfigError(f"--vocabs must be comma-separated integers, got {args.vocabs!r}") from None
    rows = (args.warmup + args.steps + 2) * args.batch_size
    args.datasets = [(v, str(write_synthetic_dataset(tmp / f"data_v{v}", vocab_size=v, seq_len=args.seq_len,
                                                     rows={"train": rows, "val": 64, "test": 1}))) for v in vocabs]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_trainable: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_trainable_") as tmp:
        try:
            _prepare_datasets(args, Path(tmp))
            for spec in ([args.profile] if args.profile else args.techniques.split(",")):
                trial_config(args, spec, args.datasets[0][1])  # validate every technique before any GPU work
            if args.profile:
                print(f"profile written to {profile(args)}")
                return 0
            if args.device_time:
                table = device_time(args)
            else:
                table = _run_under_tune(args, Path(tmp)) if args.report == "tune" else bench(args)
        except ConfigError as exc:
            print(f"bench_trainable: error: {exc}", file=sys.stderr)
            return 2
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


def _run_under_tune(args: argparse.Namespace, tmp: Path) -> str:
    """The whole bench inside one real Tune trial (bench_checkpoint.run_in_tune)."""
    return sibling("bench_checkpoint").run_in_tune("bench_trainable", "bench", args, tmp)


def sibling(name: str):
    """Another script of bench/ as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # findable: pickled by value for Ray
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    raise SystemExit(main())
