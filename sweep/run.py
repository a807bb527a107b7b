"""`python -m sweep.run`: the technique x window x batch-size sweep (or the max-batch search) on Ray Tune.

    python -m sweep.run                          # default grid for this machine, shipped sample data
    python -m sweep.run --preset seed            # the seed's 18 experiments (needs GPUs)
    python -m sweep.run --techniques bf16 window --windows 16 32 --batch-sizes 16 32 --max-steps 200
    python -m sweep.run --find-max-batch --granularity 8 --gpu-memory-gb 24
    python -m sweep.run --resume --name seed-20250101-120000
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_USAGE = 2

MODEL_FLAGS = {"n_layers": int, "d_model": int, "n_heads": int, "ff_dim": int, "seq_len": int}
BUDGET_FLAGS = {"epochs": int, "max_steps": int, "max_tokens": int, "eval_interval": int, "lr": float, "seed": int}


def _split(values: Sequence[str] | None) -> list[str] | None:
    """`--techniques a b,c` -> [a, b, c] (space- or comma-separated)."""
    if values is None:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _ints(values: Sequence[str] | None, flag: str) -> tuple[int, ...] | None:
    items = _split(values)
    if items is None:
        return None
    try:
        return tuple(int(v) for v in items)
    except ValueError:
        raise _UsageError(f"{flag} takes integers, got {' '.join(values)}") from None


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other user error
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sweep.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--preset", choices=("seed", "cpu"), help="a named grid (default: seed with GPUs, else cpu)")
    g.add_argument("--techniques", nargs="+", metavar="T", help="technique presets (baseline bf16 flash window gradcp ...)")
    g.add_argument("--batch-sizes", nargs="+", metavar="N")
    g.add_argument("--windows", nargs="+", metavar="W", help="window sizes for windowed techniques")
    g.add_argument("--only", nargs="+", default=[], metavar="S", help="keep trials whose name contains S")
    g.add_argument("--skip", nargs="+", default=[], metavar="S", help="drop trials whose name contains S")
    g.add_argument("--dry-run", action="store_true", help="validate and list the trials, run nothing")
    m = p.add_argument_group("model and budget (override the preset)")
    for key, kind in {**MODEL_FLAGS, **BUDGET_FLAGS}.items():
        m.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind)
    d = p.add_argument_group("data and hardware")
    d.add_argument("--data", metavar="DIR", help="a prepared dataset (default: the shipped sample, prepared once)")
    d.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    d.add_argument("--gpu-memory-gb", type=float, help="cap each trial's CUDA allocator (emulate a smaller GPU)")
    r = p.add_argument_group("ray")
    r.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local instance)")
    r.add_argument("--storage-path", default="results", help="local dir, NFS or s3://... (default ./results)")
    r.add_argument("--shared-storage", action="store_true",
                   help="the local --storage-path is mounted by every node (NFS); required for a local path on a multi-node cluster")
    r.add_argument("--name", help="experiment name (default: <grid>-<timestamp>)")
    r.add_argument("--max-concurrent", type=int)
    r.add_argument("--cpus-per-trial", type=int)
    r.add_argument("--resume", action="store_true", help="continue an interrupted sweep (--name, else the latest)")
    r.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    b = p.add_argument_group("max-batch search")
    b.add_argument("--find-max-batch", action="store_true", help="search the largest batch size per technique")
    b.add_argument("--granularity", type=int, default=1)
    b.add_argument("--start", type=int, help="first batch size tried (default 32 on GPU, 1 on CPU)")
    b.add_argument("--max", dest="max_batch", type=int, help="upper bound (default: the dataset's training rows)")
    b.add_argument("--probe-steps", type=int, default=3)
    return p


def config_from_args(argv: Sequence[str] | None = None):
    from .runner import SweepConfig

    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in {**MODEL_FLAGS, **BUDGET_FLAGS} if getattr(args, k) is not None}
    cfg = SweepConfig(
        preset=args.preset,
        techniques=tuple(_split(args.techniques)) if args.techniques is not None else None,
        batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
        windows=_ints(args.windows, "--windows"),
        only=tuple(_split(args.only) or ()),
        skip=tuple(_split(args.skip) or ()),
        overrides=overrides,
        data_dir=args.data,
        device=args.device,
        gpu_memory_gb=args.gpu_memory_gb,
        address=args.address,
        storage_path=args.storage_path,
        shared_storage=args.shared_storage,
        name=args.name,
        max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial,
        resume=args.resume,
        verbose=args.verbose,
        find_max_batch=args.find_max_batch,
        granularity=args.granularity,
        start=args.start,
        max_batch=args.max_batch,
        probe_steps=args.probe_steps,
    )
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, args = config_from_args(argv)
        from .grid import SweepError
        from data_prep import DataPrepError

        from .connect import ClusterError, StorageError

        from .runner import _precheck_local_gpus, find_max_batch_size, plan_sweep, prepare, results_table, run_sweep
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.dry_run:
            plan = plan_sweep(cfg, _precheck_local_gpus(cfg))
            for point in plan.grid:
                from .grid import trial_name

                print(trial_name(point))
            return 0
        plan = prepare(cfg)
        if cfg.find_max_batch:
            from .probe import format_max_batch

            records, path = find_max_batch_size(cfg, plan)
            print("\n" + format_max_batch(records))
            print(f"\nresults: {path}/max_batch.json")
            return 1 if any(r["status"] == "error" for r in records) else 0
        results, path = run_sweep(cfg, plan)
        print("\n" + results_table(results, path))
        print(f"\nresults: {path}")
        errored = sum(r.error is not None for r in results)
        if errored:
            print(f"{errored} trial(s) failed; see the error column above and {path}", file=sys.stderr)
        return 1 if errored else 0
    except (SweepError, DataPrepError, ClusterError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
