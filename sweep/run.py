"""`python -m sweep.run`: the technique x window x batch-size sweep (or the max-batch search) on Ray Tune.

    python -m sweep.run                          # default grid for this machine, shipped sample data
    python -m sweep.run --preset seed            # the seed's 18 experiments (needs GPUs)
    python -m sweep.run --preset seed-report --data DIR   # the seed report's model and table (GPT-2 vocabulary)
    python -m sweep.run --techniques bf16 window --windows 16 32 --batch-sizes 16 32 --max-steps 200
    python -m sweep.run --techniques flash window --seq-lens 512 1024 2048 --tokens-per-batch 65536
    python -m sweep.run --find-max-batch --granularity 8 --gpu-memory-gb 24   # starts at the predicted max batch
    python -m sweep.run --predict --gpu-memory-gb 24 --vocab-size 50257   # predicted peak + max batch, no GPU
    python -m sweep.run --resume --name seed-20250101-120000

Fault tolerance: every trial snapshots its full state (model, optimizer, scheduler, data position, RNG) every
--checkpoint-minutes in the background, and a trial that fails (a killed worker, a lost node) restarts from its
latest snapshot up to --max-failures times, reproducing the uninterrupted run; an interrupted driver (Ctrl-C)
continues with --resume. Every trial setting (model size, budget, optimizer) is a flag of its own below.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from contract.cli import OneLineParser, add_config_arguments, given

from .config import SweepConfig

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# TrialConfig fields the grid or the sweep's own flags set: not offered as per-trial overrides.
NOT_OVERRIDES = ("technique", "precision", "attention", "window", "checkpointing", "batch_size", "data_dir",
                 "device", "gpu_memory_gb", "checkpoint_interval", "checkpoint_minutes", "vocab_size")
GROUPS = {
    "grid": ("preset", "techniques", "batch_sizes", "windows", "seq_lens", "tokens_per_batch", "only", "skip"),
    "data and hardware": ("data_dir", "device", "gpu_memory_gb"),
    "ray": ("address", "storage_path", "shared_storage", "name", "max_concurrent", "cpus_per_trial", "resume",
            "reuse_actors", "verbose"),
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
            group.add_argument("--dry-run", action="store_true", help="validate and list the trials, run nothing")
        if title.startswith("prediction"):
            group.add_argument("--predict", action="store_true",
                               help="print every config's predicted peak memory and max batch size, run nothing")
            group.add_argument("--json", action="store_true", help="with --predict: one JSON object per config")
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


def print_prediction(cfg: SweepConfig, as_json: bool) -> int:
    """`--predict`: everything is computed before the first line is printed (no half output)."""
    import json

    from .predict import format_prediction, predict_grid

    cfg.validate()
    prediction = predict_grid(cfg)
    if as_json:
        print("\n".join(json.dumps({**row, "budget_source": prediction.budget.source,
                                    "vocab_source": prediction.vocab_source}) for row in prediction.rows))
    else:
        print(format_prediction(prediction))
    return 0


def print_dry_run(cfg: SweepConfig) -> int:
    """`--dry-run`: the trials that would run, with the memory model's predicted peak each; nothing runs."""
    from contract.table import render

    from .orchestrate import known_gpus
    from .plan import check_data, plan_sweep
    from .predict import dry_run_rows

    plan = plan_sweep(cfg, known_gpus(cfg))
    if plan.sample is None:
        check_data(plan, verify="full")
    rows, budget = dry_run_rows(plan)
    print(f"{len(plan.grid)} trials ({plan.preset_name} grid) -> {plan.path}")
    print(render(["trial", "device", "batch", "seq_len", "predicted peak (MiB)", "fits"], rows))
    print(f"predicted peak: the memory model's max_memory_allocated of one step on CUDA ({budget})")
    return 0


def _run(cfg: SweepConfig) -> int:
    from .orchestrate import find_max_batch_size, incomplete_trials, prepare, resume_command, results_table, run_sweep

    plan = prepare(cfg)
    if cfg.find_max_batch:
        records, path = find_max_batch_size(cfg, plan)
        print("\n" + results_table(path))
        print(f"\nresults: {path}/max_batch.json")
        return 1 if any(r["status"] == "error" for r in records) else 0
    results, path = run_sweep(cfg, plan)
    stopped = incomplete_trials(results)
    if stopped:
        print(f"interrupted: {len(stopped)} of {len(results)} trials incomplete ({', '.join(stopped)}); "
              f"continue with: {resume_command(cfg, plan)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print("\n" + results_table(path))
    print(f"\nresults: {path}")
    print(f"TensorBoard: tensorboard --logdir {path}   (pip install 'memeff-sweep[tensorboard]')")
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
