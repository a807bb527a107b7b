"""`python -m sweep.run`: the technique x window x batch-size sweep (or the max-batch search) on Ray Tune.

    python -m sweep.run                          # default grid for this machine, shipped sample data
    python -m sweep.run --dry-run                # the trials it would run, each with its predicted peak memory
    python -m sweep.run --preset seed            # the seed's 18 experiments (needs GPUs)
    python -m sweep.run --preset seed-report --data DIR   # the seed report's model and table (GPT-2 vocabulary)
    python -m sweep.run --techniques bf16 window --windows 16 32 --batch-sizes 16 32 --max-steps 200
    python -m sweep.run --techniques flash window --seq-lens 512 1024 2048 --tokens-per-batch 65536
    python -m sweep.run --find-max-batch --granularity 8 --gpu-memory-gb 24   # starts at the predicted max batch
    python -m sweep.run --predict --gpu-memory-gb 24 --vocab-size 50257   # predicted peak + max batch, no GPU
    python -m sweep.run --resume --name seed-20250101-120000

Output (--verbose): 0 prints errors and the final table only; 1 (the default) adds one line per trial start,
finish, OOM, NaN or error (step, loss, peak memory, tokens/s) and the dashboard's address; 2 gives Ray Tune's
own output back (its configuration and result boxes, every INFO line).

Fault tolerance: every trial snapshots its full state (model, optimizer, scheduler, data position, RNG) every
--checkpoint-minutes in the background, and a trial that fails (a killed worker, a lost node) restarts from its
latest snapshot up to --max-failures times, reproducing the uninterrupted run; an interrupted driver (Ctrl-C)
prints the --resume command that continues it. Every trial setting (model size, budget, optimizer) is a flag of
its own below. Live metrics and the dashboard: docs/dashboard.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from contract.cli import OneLineParser, add_config_arguments, given
from contract.experiment import GRID_KEY
from contract.io import counted, is_uri

from .config import SweepConfig

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# TrialConfig fields the grid or the sweep's own flags set: not offered as per-trial overrides.
NOT_OVERRIDES = ("technique", "precision", "attention", "window", "checkpointing", "batch_size", "data_dir",
                 "device", "gpu_memory_gb", "checkpoint_interval", "checkpoint_minutes", "vocab_size")
# --help's groups of SweepConfig flags: every field (but those marked no_cli) is in one, or build_parser raises.
GROUPS = {
    "grid": ("preset", "techniques", "batch_sizes", "windows", "seq_lens", "tokens_per_batch", "only", "skip"),
    "data and hardware": ("data_dir", "device", "gpu_memory_gb"),
    "ray": ("address", "storage_path", "shared_storage", "name", "max_concurrent", "cpus_per_trial", "resume",
            "trial_process", "reuse_actors", "verbose"),
    "fault tolerance (a failed trial restarts from its latest checkpoint)":
        ("checkpoint_interval", "checkpoint_minutes", "max_failures"),
    "max-batch search": ("find_max_batch", "granularity", "start", "max_batch", "probe_steps", "seed_search"),
    "prediction (no Ray, no GPU)": ("gpu", "gpu_total_gb", "vocab_size"),
}


def build_parser() -> argparse.ArgumentParser:
    from trainable.config import TrialConfig

    p = OneLineParser(prog="python -m sweep.run", description=__doc__, error_prefix="error",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_fields: list[str] = []
    for title, names in GROUPS.items():
        group = p.add_argument_group(title)
        sweep_fields += add_config_arguments(group, SweepConfig, only=names)
        if title == "grid":
            group.add_argument("--dry-run", action="store_true",
                               help="validate, then list the trials with their predicted peak memory; runs nothing")
        if title.startswith("prediction"):
            group.add_argument("--predict", action="store_true",
                               help="print every config's predicted peak memory and max batch size, run nothing")
            group.add_argument("--json", action="store_true", help="with --predict: one JSON object per config")
    if missing := [f.name for f in dataclasses.fields(SweepConfig)
                   if not f.metadata.get("no_cli") and f.name not in sweep_fields]:
        raise RuntimeError(f"SweepConfig fields in no GROUPS entry (so without a flag): {', '.join(missing)}")
    trial = p.add_argument_group("every trial (override the preset)")
    trial_fields = add_config_arguments(trial, TrialConfig, exclude=NOT_OVERRIDES)
    p.set_defaults(_sweep_fields=sweep_fields, _trial_fields=trial_fields)
    return p


class _UsageError(Exception):
    pass


def _check_modes(args: argparse.Namespace) -> None:
    """Flags that belong to one mode only."""
    if args.json and not args.predict:
        raise _UsageError("--json goes with --predict")
    if getattr(args, "vocab_size", None) is not None and not args.predict:
        raise _UsageError("--vocab-size goes with --predict (a sweep takes the vocabulary from its dataset)")
    if args.predict:
        if args.dry_run:
            raise _UsageError("--predict runs nothing: drop --dry-run")
        for flag, dest in (("--find-max-batch", "find_max_batch"), ("--resume", "resume"),
                           ("--seed-search", "seed_search"), ("--checkpoint-interval", "checkpoint_interval"),
                           ("--checkpoint-minutes", "checkpoint_minutes"), ("--max-failures", "max_failures")):
            if hasattr(args, dest):
                raise _UsageError(f"--predict runs nothing: drop {flag}")


def config_from_args(argv: Sequence[str] | None = None) -> tuple[SweepConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    _check_modes(args)
    cfg = SweepConfig(**given(args, args._sweep_fields), overrides=given(args, args._trial_fields))
    return cfg, args


# -- modes that run nothing -------------------------------------------------------------------------------
PREDICT_COLUMNS = {  # header -> prediction row key
    "trial": "trial", "kernel": "kernel", "batch": "batch_size", "window": "window", "vocab": "vocab_size",
    "peak_mib": "predicted_peak_mib", "reserved_mib": "predicted_reserved_mib", "peak_phase": "phase",
    "fits": "fits", "max_batch": "predicted_max_batch",
}
COMPILE_NOTE = ("compiled configs (*_compile): torch.compile is not modelled; they show the eager step's memory, an "
                "upper bound (on an H200, compile cut bf16_flash_bs128's peak by 42%).")


def format_prediction(prediction) -> str:
    """`--predict`'s aligned table with the budget and vocabulary it assumes."""
    from contract.table import render_rows

    columns = dict(PREDICT_COLUMNS)
    if any(r["error"] for r in prediction.rows):
        columns["error"] = "error"
    rows = [{h: r.get(k) for h, k in columns.items()} for r in prediction.rows]
    return "\n".join([
        f"budget: {prediction.budget.source}",
        f"vocab:  {prediction.vocab_size} ({prediction.vocab_source})",
        "",
        render_rows(rows),
        "",
        "peak_mib predicts max_memory_allocated; reserved_mib adds the allocator allowance and must fit the budget;",
        "max_batch: the largest batch size predicted to fit (an estimate: --find-max-batch measures it).",
        *([COMPILE_NOTE] if any(r.get("upper_bound") for r in prediction.rows) else []),
    ])


def print_prediction(cfg: SweepConfig, as_json: bool) -> int:
    """`--predict`: everything is computed before the first line is printed (no half output)."""
    import json

    from .predict import predict_grid

    cfg.validate()
    prediction = predict_grid(cfg)
    if as_json:
        print("\n".join(json.dumps({**row, "budget_source": prediction.budget.source,
                                    "vocab_source": prediction.vocab_source}) for row in prediction.rows))
    else:
        print(format_prediction(prediction))
    return 0


def print_dry_run(cfg: SweepConfig) -> int:
    """`--dry-run`: what would run and where, with the memory model's predicted peak per trial; nothing runs,
    nothing is written (the shipped sample is not even prepared)."""
    from contract.table import render_rows

    from .orchestrate import known_gpus
    from .plan import check_data, plan_sweep
    from .predict import dry_run_rows

    plan = plan_sweep(cfg, known_gpus(cfg))
    if plan.sample is None:
        check_data(plan, verify="full")
    rows, assumed = dry_run_rows(plan)
    lines = [f"dry run: {counted(len(plan.grid), 'trial')} ({plan.preset_name} grid) -> {plan.path}; nothing runs"]
    lines += [plan.notice] if plan.notice else []
    lines += [render_rows(rows), ""]
    if any(r["fits"] is None and r["device"] == "cpu" for r in rows):
        lines.append("predicted peak: what one training step would allocate on a CUDA GPU (the memory model); these "
                     "trials run on the CPU, whose memory is not measured")
    else:
        lines.append("predicted peak: the memory model's max_memory_allocated of one step; fits: its reserved "
                     "memory fits the budget")
    lines.append(f"assumed: {assumed}")
    print("\n".join(lines))
    return 0


# -- a run ------------------------------------------------------------------------------------------------
def _finished(result) -> bool:
    return result.error is not None or (result.metrics or {}).get("final") is True


def incomplete(plan, results) -> list[str]:
    """Grid trials without a final report or an error, including those Tune had not created yet."""
    done = {str((r.config or {}).get(GRID_KEY)) for r in results if _finished(r)}
    return [name for name in plan.names if name not in done]


def event_files_exist(path: str) -> bool:
    """Whether any trial of the experiment wrote TensorBoard event files (Tune does when tensorboardX is there)."""
    if not is_uri(path):
        return any(Path(path).glob("*/events.out.tfevents.*"))
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
    except (OSError, ValueError):
        return False
    return any(Path(i.path).name.startswith("events.out.tfevents.") for i in infos)


def tensorboard_line(path: str) -> str | None:
    """The command that opens the experiment in TensorBoard; None when no event files were written."""
    if not event_files_exist(path):
        return None
    shown = path
    if not is_uri(path) and Path(path).resolve().is_relative_to(Path.cwd().resolve()):
        shown = os.path.relpath(path)
    hint = "" if shutil.which("tensorboard") else "   (the viewer: pip install -e '.[tensorboard]')"
    return f"TensorBoard: tensorboard --logdir {shlex.quote(shown)}{hint}"


def print_results(path: str) -> None:
    """The tables first (what the user waits for), then the report and its plots (seconds of drawing)."""
    from .orchestrate import results_table, write_report

    text, loaded = results_table(path)
    print("\n" + text, flush=True)
    out_dir = write_report(path, loaded)
    if out_dir:
        print(f"\nreport and plots: {out_dir}")


def _run(cfg: SweepConfig) -> int:
    from .orchestrate import find_max_batch_size, prepare, resume_command, run_sweep

    plan = prepare(cfg)
    from .progress import quiet_tune  # imports Ray Tune: only once the sweep is known to be good

    quiet_tune(cfg.verbose)
    if cfg.find_max_batch:
        records, path = find_max_batch_size(cfg, plan)
        print_results(path)
        if cfg.verbose >= 1:
            print(f"\nresults: {path}/max_batch.json")
        return 1 if any(r["status"] == "error" for r in records) else 0
    results, path = run_sweep(cfg, plan)
    stopped = incomplete(plan, results)
    if stopped:
        print(f"interrupted: {len(stopped)} of {counted(len(plan.names), 'trial')} incomplete ({', '.join(stopped)}); "
              f"continue with: {resume_command(cfg, plan)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_results(path)
    if cfg.verbose >= 1:
        print(f"\nresults: {path}")
        board = tensorboard_line(path)
        if board:
            print(board)
    errored = sum(r.error is not None for r in results)
    if errored:
        print(f"{errored} trial(s) failed; see the error column above and {path}", file=sys.stderr)
    return 1 if errored else 0


def main(argv: Sequence[str] | None = None) -> int:
    from data_prep import DataPrepError

    from .connect import ClusterError, StorageError
    from .errors import SweepError

    try:
        cfg, args = config_from_args(argv)
        if args.predict:
            return print_prediction(cfg, args.json)
        if args.dry_run:
            return print_dry_run(cfg)
        return _run(cfg)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SweepError, DataPrepError, ClusterError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted before the sweep started: nothing ran", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
