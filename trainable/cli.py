"""`python -m trainable`: one trial from the command line (flags compatible with the seed's train.py).

    python -m trainable --data prepared/sample-bpe1024-s64 --seq-len 64 --n-layers 2 --d-model 128 --max-steps 20
    python -m trainable --data DIR --bf16 --flash-attn --batch-size 32 --max-steps 200
    python -m trainable --data DIR --technique window --window-size 16 --metrics-out m.jsonl
    python -m trainable --data DIR --technique flash --checkpointing selective --compile

Every `TrialConfig` field is a flag (generated from the dataclass, defaults in `--help`). The seed's
flags map onto switches: --bf16 -> precision bf16, --flash-attn -> attention flash, --window-size W ->
attention window with window W, --gradient-checkpointing -> checkpointing full. They override the
--technique preset, and so do --checkpointing, --loss and --compile. Bad input prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from contract.cli import OneLineParser, add_config_arguments, given

from .config import TrialConfig
from .errors import ConfigError

# the seed report's train.py flags, each a shorthand for switches
SEED_ALIASES = {"bf16": {"precision": "bf16"}, "flash_attn": {"attention": "flash"},
                "gradient_checkpointing": {"checkpointing": "full"}}


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m trainable", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="Exit status: 0 done (an OOM is a result too), 1 the loss became NaN, 2 bad input, "
                             "130 interrupted.")
    seed = p.add_argument_group("the seed's flags")
    seed.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    seed.add_argument("--flash-attn", action="store_true", help="FlashAttention (needs CUDA and bf16)")
    seed.add_argument("--window-size", type=int, metavar="W", help="sliding-window attention of W keys "
                      "(default: unset: --window and the technique decide)")
    seed.add_argument("--gradient-checkpointing", action="store_true", help="recompute every block in backward")
    p.set_defaults(_fields=add_config_arguments(p.add_argument_group("trial configuration"), TrialConfig))
    run = p.add_argument_group("this run")
    run.add_argument("--checkpoint-dir", metavar="DIR", help="save resumable state here and resume from it "
                     "(default: unset: no resumable state)")
    run.add_argument("--metrics-out", metavar="FILE", help="write one JSON object per step (JSON lines) "
                     "(default: unset: not written)")
    run.add_argument("--verify-data", choices=("full", "size"), default="full",
                     help="check the dataset's shards before training: full = sha256, size = sizes only "
                          "(default: %(default)s)")
    run.add_argument("--log-every", type=int, default=10, metavar="N",
                     help="print progress every N steps, 0: quiet (default: %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    d: dict[str, Any] = given(args, args._fields)
    for flag, switches in SEED_ALIASES.items():
        if getattr(args, flag):
            d.update(switches)
    if args.window_size is not None:  # the window kernels are flash-type: --flash-attn --window-size W is a window
        d["attention"], d["window"] = "window", args.window_size
    return TrialConfig.from_dict(d)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


class ProgressPrinter:
    """report() for the terminal: a line every `every` steps, at eval steps and at the end."""

    def __init__(self, every: int, batch_size: int, sink: Any = None):
        self.every, self.batch_size, self.sink = every, batch_size, sink

    def __call__(self, m: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.write(json.dumps(m) + "\n")
        if not self.every:
            return
        if m.get("oom"):
            print(f"step {m['step']}: out of memory in {m['oom_phase']} "
                  f"(batch {self.batch_size}, {_fmt(m.get('mem_reserved_mib'), '.0f')} MiB reserved)", flush=True)
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


def check_outputs(args: argparse.Namespace) -> None:
    """--metrics-out and --checkpoint-dir are usable, checked before any training (not after the whole run).

    Each is tried for real (a file created and removed where the run will write): permission bits say
    nothing to root, nor about /proc or a name too long for the file system."""
    for flag, check in (("--metrics-out", _check_metrics_out), ("--checkpoint-dir", _check_checkpoint_dir)):
        try:
            check(args)
        except OSError as exc:  # e.g. a name too long even to stat
            raise ConfigError(f"{flag}: cannot use it ({exc.strerror or exc})") from None


def _check_metrics_out(args: argparse.Namespace) -> None:
    if args.metrics_out:
        out = Path(args.metrics_out)
        if out.is_dir():
            raise ConfigError(f"--metrics-out {out} is a directory: give a file name")
        if not out.parent.is_dir():
            raise ConfigError(f"--metrics-out: directory {out.parent} does not exist")
        _try_write(out.with_name(out.name + ".partial"), f"--metrics-out {out}")


def _check_checkpoint_dir(args: argparse.Namespace) -> None:
    if args.checkpoint_dir:
        path = Path(args.checkpoint_dir)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--checkpoint-dir {path} exists and is not a directory")
        made = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            _try_write(path / ".memeff-write-check", f"--checkpoint-dir {path}")
        except OSError as exc:
            raise ConfigError(f"--checkpoint-dir {path}: cannot write there ({exc.strerror or exc})") from None
        except ConfigError:
            if made:
                path.rmdir()
            raise


def _try_write(file: Path, flag: str) -> None:
    """Create `file` (that the run writes later) and remove it again; one ConfigError line if that fails."""
    existed = file.exists()
    try:
        with open(file, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        file.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_outputs(args)
        verify_data(cfg.data_dir, args.verify_data)
        from .checkpoint_io import DirectoryCheckpointIO
        from .trial import run_trial

        checkpoint_io = DirectoryCheckpointIO(args.checkpoint_dir) if args.checkpoint_dir else None
        print(f"{cfg.label}: batch {cfg.batch_size}, seq {cfg.seq_len}, data {cfg.data_dir}", flush=True)
        final = _run_with_metrics_file(cfg, args, checkpoint_io, run_trial)
    except ConfigError as exc:
        print(f"python -m trainable: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m trainable: interrupted" + (f"; --checkpoint-dir {args.checkpoint_dir} resumes it"
                                                     if args.checkpoint_dir else ""), file=sys.stderr)
        return 130
    status = final.get("status")
    if status == "oom":
        print(f"{cfg.label}: out of memory in {final['oom_phase']} at batch size {cfg.batch_size}")
    elif status == "nan":
        print(f"{cfg.label}: the loss became {final['loss']} at step {final['step']}; training stopped", file=sys.stderr)
        return 1
    elif final:
        print(f"{cfg.label}: done in {final['train_time_s']:.1f}s, val_loss {_fmt(final.get('val_loss'), '.4f')}, "
              f"kernel {final['attention_kernel']}, steady {_fmt(final.get('steady_tokens_per_s'), ',.0f')} tok/s "
              f"GPU time, {_fmt(final.get('wall_tokens_per_s'), ',.0f')} tok/s wall clock "
              f"(MFU {_fmt(final.get('steady_mfu'), '.1%')}), compile {final.get('compile_time_s', 0.0):.1f}s")
    return 0


def verify_data(data_dir: str, verify: str) -> None:
    """Hash every shard before training (a flipped byte keeps the size); run_trial itself only checks sizes."""
    if verify == "full" and Path(data_dir).is_dir():  # a missing directory: run_trial says so
        from .dataset_check import open_checked

        open_checked(data_dir, verify="full")


def _run_with_metrics_file(cfg: TrialConfig, args: argparse.Namespace, checkpoint_io, run_trial) -> dict:
    """Run, streaming metrics to FILE.partial; it becomes FILE only when the trial ends (ok, OOM or NaN)."""
    if not args.metrics_out:
        return run_trial(cfg, ProgressPrinter(args.log_every, cfg.batch_size), checkpoint_io=checkpoint_io)
    out = Path(args.metrics_out)
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as sink:
            final = run_trial(cfg, ProgressPrinter(args.log_every, cfg.batch_size, sink), checkpoint_io=checkpoint_io)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return final
