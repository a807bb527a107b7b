"""`python -m trainable`: one trial from the command line (flags compatible with the seed's train.py).

    python -m trainable --data data/prepared --bf16 --flash-attn --batch-size 32 --max-steps 200
    python -m trainable --data data/prepared --technique window --window-size 16 --metrics-out m.jsonl
    python -m trainable --data data/prepared --technique flash --checkpointing selective --compile

Seed flags map onto switches: --bf16 -> precision bf16, --flash-attn -> attention flash,
--window-size W -> attention window with window W, --gradient-checkpointing -> checkpointing full.
They override the --technique preset, and so do --checkpointing, --loss and --compile. Bad input
prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .checkpoint_io import DirectoryCheckpointIO
from .config import TECHNIQUES, TrialConfig
from .errors import ConfigError

# flag dest -> TrialConfig field for plain value flags (None: not given, the config default applies)
VALUE_FLAGS = {
    "technique": "technique", "precision": "precision", "kernel": "kernel", "batch_size": "batch_size",
    "data": "data_dir", "max_steps": "max_steps", "max_tokens": "max_tokens", "epochs": "epochs",
    "n_layers": "n_layers", "d_model": "d_model", "n_heads": "n_heads", "ff_dim": "ff_dim", "seq_len": "seq_len",
    "vocab_size": "vocab_size", "device": "device", "lr": "lr", "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps", "schedule": "schedule", "grad_clip": "grad_clip", "seed": "seed",
    "gpu_memory_gb": "gpu_memory_gb", "eval_interval": "eval_interval", "eval_batches": "eval_batches",
    "eval_batch_size": "eval_batch_size", "checkpoint_interval": "checkpoint_interval", "loss": "loss",
    "checkpointing": "checkpointing", "peak_flops": "peak_flops",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m trainable", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", metavar="DIR", help="prepared dataset directory (python -m data_prep prepare)")
    p.add_argument("--technique", metavar="NAME", help=f"preset: {', '.join(TECHNIQUES)}")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    p.add_argument("--flash-attn", action="store_true", help="FlashAttention (needs CUDA and bf16)")
    p.add_argument("--window-size", type=int, metavar="W", help="sliding-window attention of W keys")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute every block in backward")
    p.add_argument("--precision", help="fp32 | tf32 | bf16")
    p.add_argument("--kernel", help="force an attention kernel (default: auto)")
    p.add_argument("--checkpointing", help="none | full | selective (save matmuls, recompute the rest)")
    p.add_argument("--loss", help="standard | fused_ce (default: standard)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model and loss")
    p.add_argument("--peak-flops", type=float, metavar="FLOPS", help="the GPU's peak dense bf16 FLOP/s for MFU")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--max-steps", type=int, metavar="N")
    p.add_argument("--max-tokens", type=int, metavar="N")
    p.add_argument("--epochs", type=int, metavar="N")
    for name in ("--n-layers", "--d-model", "--n-heads", "--ff-dim", "--seq-len", "--vocab-size"):
        p.add_argument(name, type=int)
    p.add_argument("--device", help="auto | cuda | cpu")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--schedule", help="cosine | constant")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--gpu-memory-gb", type=float, metavar="X", help="cap the CUDA allocator at X GiB")
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--checkpoint-dir", metavar="DIR", help="save resumable state here and resume from it")
    p.add_argument("--checkpoint-interval", type=int, metavar="STEPS")
    p.add_argument("--metrics-out", metavar="FILE", help="write one JSON object per step (JSON lines)")
    p.add_argument("--verify-data", choices=("full", "size"), default="full",
                   help="check the dataset's shards before training: full = sha256 (default), size = sizes only")
    p.add_argument("--log-every", type=int, default=10, metavar="N", help="print progress every N steps (0: quiet)")
    return p


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    d: dict[str, Any] = {field: getattr(args, dest) for dest, field in VALUE_FLAGS.items()
                         if getattr(args, dest) is not None}
    if args.bf16:
        d["precision"] = "bf16"
    if args.flash_attn:
        d["attention"] = "flash"
    if args.window_size is not None:  # the window kernels are flash-type: --flash-attn --window-size W is a window
        d["attention"], d["window"] = "window", args.window_size
    if args.gradient_checkpointing:
        d["checkpointing"] = "full"
    if args.compile:
        d["compile"] = True
    return TrialConfig.from_dict(d)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


class ProgressPrinter:
    """report() for the terminal: a line every `every` steps, at eval steps and at the end."""

    def __init__(self, every: int, sink: Any = None):
        self.every, self.sink = every, sink

    def __call__(self, m: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.write(json.dumps(m) + "\n")
        if not self.every:
            return
        if m.get("oom"):
            print(f"step {m['step']}: out of memory in {m['oom_phase']} "
                  f"(batch {m['batch_size']}, {_fmt(m.get('mem_reserved_mib'), '.0f')} MiB reserved)", flush=True)
            return
        if m["step"] % self.every and "val_loss" not in m and not m.get("final"):
            return
        line = (f"step {m['step']:>6}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s']:,.0f} tok/s  "
                f"MFU {_fmt(m.get('mfu'), '.1%')}  peak {_fmt(m['mem_step_peak_mib'], ',.0f')} MiB")
        if m.get("compiling"):
            line += "  (compiling)"
        if "val_loss" in m:
            line += f"  val_loss {m['val_loss']:.4f}  val_ppl {_fmt(m['val_ppl'], '.2f')}"
        print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        verify_data(cfg.data_dir, args.verify_data)
        from .trial import run_trial

        checkpoint_io = DirectoryCheckpointIO(args.checkpoint_dir) if args.checkpoint_dir else None
        print(f"{cfg.label}: batch {cfg.batch_size}, seq {cfg.seq_len}, data {cfg.data_dir}", flush=True)
        final = _run_with_metrics_file(cfg, args, checkpoint_io, run_trial)
    except ConfigError as exc:
        print(f"python -m trainable: error: {exc}", file=sys.stderr)
        return 2
    if final.get("oom"):
        print(f"{cfg.label}: out of memory in {final['oom_phase']} at batch size {cfg.batch_size}")
    elif final:
        print(f"{cfg.label}: done in {final['train_time_s']:.1f}s, val_loss {_fmt(final.get('val_loss'), '.4f')}, "
              f"kernel {final['attention_kernel']}, steady {_fmt(final.get('steady_tokens_per_s'), ',.0f')} tok/s "
              f"(MFU {_fmt(final.get('steady_mfu'), '.1%')}), compile {final.get('compile_time_s', 0.0):.1f}s")
    return 0


def verify_data(data_dir: str, verify: str) -> None:
    """Hash every shard before training (a flipped byte keeps the size); run_trial itself only checks sizes."""
    if verify != "full" or not Path(data_dir).is_dir():  # a missing directory: run_trial says so
        return
    from data_prep import DataPrepError, open_dataset

    try:
        open_dataset(data_dir, verify="full")
    except DataPrepError as exc:
        raise ConfigError(f"data_dir {data_dir}: {exc}") from None


def _run_with_metrics_file(cfg: TrialConfig, args: argparse.Namespace, checkpoint_io, run_trial) -> dict:
    """Run, streaming metrics to FILE.partial; it becomes FILE only when the trial ends (ok or OOM)."""
    if not args.metrics_out:
        return run_trial(cfg, ProgressPrinter(args.log_every), checkpoint_io=checkpoint_io)
    out = Path(args.metrics_out)
    if not out.parent.is_dir():
        raise ConfigError(f"--metrics-out: directory {out.parent} does not exist")
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as sink:
            final = run_trial(cfg, ProgressPrinter(args.log_every, sink), checkpoint_io=checkpoint_io)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return final
