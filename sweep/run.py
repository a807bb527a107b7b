"""`python -m sweep.run`: the technique x window x batch-size sweep (or the max-batch search) on Ray Tune.

    python -m sweep.run                          # default grid for this machine, shipped sample data
    python -m sweep.run --preset seed            # the seed's 18 experiments (needs GPUs)
    python -m sweep.run --techniques bf16 window --windows 16 32 --batch-sizes 16 32 --max-steps 200
    python -m sweep.run --find-max-batch --granularity 8 --gpu-memory-gb 24   # starts at the predicted max batch
    python -m sweep.run --predict --gpu-memory-gb 24 --vocab-size 50257   # predicted peak + max batch, no GPU
    python -m sweep.run --resume --name seed-20250101-120000
    python -m sweep.run --checkpoint-interval 100 --max-failures 3   # a failed trial restarts from its checkpoint

Fault tolerance: every trial saves its full state (model, optimizer, scheduler, data position, RNG) every
--checkpoint-interval steps, and a trial that fails (a killed worker, a lost node) restarts from its latest save
up to --max-failures times, reproducing the uninterrupted run; an interrupted driver continues with --resume.
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
    d.add_argument("--gpu", metavar="NAME", help="the GPU the memory model predicts for (default h200; the search asks nvidia-smi first)")
    d.add_argument("--gpu-total-gb", type=float, metavar="GB", help="the predicted-for GPU's total memory (GiB)")
    pr = p.add_argument_group("prediction (no Ray, no GPU)")
    pr.add_argument("--predict", action="store_true",
                    help="print every config's predicted peak memory and max batch size, run nothing")
    pr.add_argument("--json", action="store_true", help="with --predict: one JSON object per config")
    pr.add_argument("--vocab-size", type=int, metavar="V",
                    help="with --predict and no --data: the vocabulary (default 10000; gpt2 is 50257)")
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
    f = p.add_argument_group("fault tolerance (a failed trial restarts from its latest checkpoint)")
    f.add_argument("--checkpoint-interval", type=int, metavar="N",
                   help="steps between trial checkpoints: model, optimizer, scheduler, data position, RNG "
                        "(default 50 on GPU, 10 on CPU; 0: off)")
    f.add_argument("--max-failures", type=int, metavar="N",
                   help="restarts of a failed trial, each from its latest checkpoint (default 2; a resumed "
                        "sweep keeps the value it started with)")
    b = p.add_argument_group("max-batch search")
    b.add_argument("--find-max-batch", action="store_true", help="search the largest batch size per technique")
    b.add_argument("--granularity", type=int, default=1)
    b.add_argument("--start", type=int,
                   help="first batch size of an unseeded search (default 32 on GPU, 1 on CPU)")
    b.add_argument("--max", dest="max_batch", type=int, help="upper bound (default: the dataset's training rows)")
    b.add_argument("--probe-steps", type=int, default=3)
    b.add_argument("--no-seed", action="store_true",
                   help="grow from --start instead of starting at the memory model's predicted max batch")
    return p


def _check_modes(args: argparse.Namespace) -> None:
    """Flags that belong to one mode only."""
    if args.json and not args.predict:
        raise _UsageError("--json goes with --predict")
    if args.vocab_size is not None and not args.predict:
        raise _UsageError("--vocab-size goes with --predict (a sweep takes the vocabulary from its dataset)")
    if args.predict:
        for flag, on in (("--find-max-batch", args.find_max_batch), ("--resume", args.resume),
                         ("--dry-run", args.dry_run), ("--no-seed", args.no_seed),
                         ("--checkpoint-interval", args.checkpoint_interval is not None),
                         ("--max-failures", args.max_failures is not None)):
            if on:
                raise _UsageError(f"--predict runs nothing: drop {flag}")


def config_from_args(argv: Sequence[str] | None = None):
    from .runner import SweepConfig

    args = build_parser().parse_args(argv)
    _check_modes(args)
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
        seed_search=not args.no_seed,
        gpu=args.gpu,
        gpu_total_gb=args.gpu_total_gb,
        vocab_size=args.vocab_size,
        checkpoint_interval=args.checkpoint_interval,
        max_failures=args.max_failures,
    )
    return cfg, args


def print_prediction(cfg, as_json: bool) -> int:
    """`--predict`: everything is computed before the first line is printed (no half output)."""
    import json

    from .predict import format_prediction, predict_grid

    prediction = predict_grid(cfg)
    if as_json:
        print("\n".join(json.dumps({**row, "budget_source": prediction.budget.source,
                                    "vocab_source": prediction.vocab_source}) for row in prediction.rows))
    else:
        print(format_prediction(prediction))
    return 0


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
        if args.predict:
            return print_prediction(cfg, args.json)
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
