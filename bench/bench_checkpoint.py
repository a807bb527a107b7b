"""What checkpointing costs training: wall-clock throughput with no checkpoints, every N steps, every M minutes.

The trainable checkpoints in the background (trainable/reporter.py): the loop queues copies of the state to
pinned host memory behind the step and goes on; a thread writes the checkpoint and hands it to Tune (which
copies it into the trial's storage) with its step's report. This runs `bench_trainable.trainable_loop` once per
checkpoint setting on the same model and data and compares the wall-clock tokens/s over the same timed steps
(report arrivals: a checkpointed step's report arrives once its checkpoint is written and registered) against
no checkpoints, and the plain loop's. With --report tune all of it runs in one real Tune trial (TuneCheckpointIO:
Tune's own registration and copy); else checkpoints go to a directory (DirectoryCheckpointIO).

    python bench/bench_checkpoint.py --device cpu --vocabs 512 --batch-size 4 --seq-len 64 --n-layers 2 \\
        --d-model 32 --n-heads 4 --ff-dim 64 --steps 20 --warmup 2 --checkpoints none,steps:5   # CPU smoke run
    python bench/bench_checkpoint.py --techniques flash --vocabs 10000 --steps 60 --report tune \\
        --checkpoints none,steps:10,minutes:5                                                    # ~2 min, H200

--checkpoints takes none, steps:N and minutes:M (M = 5 is the sweep's default; it saves nothing in a run
shorter than M minutes, so the table projects its cost from the per-save cost a steps:N row measured).
Every other flag is bench_trainable.py's. The table comes last.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _sibling(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # findable: pickled by value for Ray
    spec.loader.exec_module(module)
    return module


def parse_modes(text: str) -> list[tuple[str, float]]:
    """`none,steps:10,minutes:5` -> [("none", 0), ("steps", 10), ("minutes", 5)]."""
    modes = []
    for item in text.split(","):
        kind, _, value = item.strip().partition(":")
        try:
            number = float(value) if value else 0.0
        except ValueError:
            number = -1.0
        if kind not in ("none", "steps", "minutes") or (kind != "none" and not number > 0):
            raise ValueError(f"--checkpoints: {item!r} is not none, steps:N or minutes:M")
        modes.append((kind, number))
    return modes


class TimedCheckpoints:
    """A CheckpointIO that starts fresh, counts saves and times each write + registration (on the reporter's
    thread), and records its step's report arrival once the checkpoint is registered."""

    def __init__(self, inner, record):
        self.inner, self.record, self.saves, self.write_s = inner, record, [], 0.0

    def load(self):
        return None

    def report_with_checkpoint(self, metrics: dict, state: dict, report) -> None:
        t0 = time.perf_counter()
        self.inner.report_with_checkpoint(metrics, state, report)
        self.write_s += time.perf_counter() - t0
        self.saves.append(metrics["step"])
        self.record(metrics)


def _io_factory(report_kind: str, directory: Path, made: list):
    from trainable.checkpoint_io import DirectoryCheckpointIO, TuneCheckpointIO

    def make(record):
        inner = TuneCheckpointIO() if report_kind == "tune" else DirectoryCheckpointIO(directory)
        made.append(TimedCheckpoints(inner, record))
        return made[-1]
    return make


def bench_checkpoints(args: argparse.Namespace) -> str:
    """The table: one row per technique x vocabulary x checkpoint setting."""
    from sweep.plan import CHECKPOINT_MINUTES

    bt = _sibling("bench_trainable")
    rows = ["| technique | vocab | checkpoints | saves timed | tok/s wall | vs none | vs plain | GPU-time tok/s | "
            "loop waited ms/save | write+register ms/save | cost ms/save | at the default (every "
            f"{CHECKPOINT_MINUTES:g} min) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    first, last = args.warmup, args.warmup + args.steps - 1  # the timed window: reports first..last
    for vocab, data_dir in args.datasets:
        for spec in args.techniques.split(","):
            base = bt.trial_config(args, spec, data_dir)
            plain = bt.plain_loop(base, args.steps, args.warmup)["tok_s"] if args.plain else math.nan
            none_tok_s, per_save = math.nan, math.nan
            for kind, value in args.modes:
                cfg = type(base).from_dict({**base.to_dict(), "checkpoint_interval": int(value) if kind == "steps"
                                            else 0, "checkpoint_minutes": value if kind == "minutes" else 0.0})
                made: list[TimedCheckpoints] = []
                with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as ckpt:
                    factory = _io_factory(args.report, Path(ckpt), made) if kind != "none" else None
                    measured = bt.trainable_loop(cfg, args.steps, args.warmup, args.report, checkpoint_io=factory)
                saves = [s for s in (made[0].saves if made else []) if first < s <= last]
                all_saves = len(made[0].saves) if made else 0
                tok_s = measured["tok_s"]
                none_tok_s = tok_s if kind == "none" else none_tok_s
                if saves and math.isfinite(none_tok_s):
                    extra = args.steps * cfg.tokens_per_step * (1 / tok_s - 1 / none_tok_s)  # seconds, window
                    per_save = extra / len(saves)
                waited = measured["final"]["checkpoint_time_s"] * 1000 / all_saves if all_saves else math.nan
                write = made[0].write_s * 1000 / all_saves if all_saves else math.nan
                cost = per_save * 1000 if saves else math.nan
                label = "none" if kind == "none" else f"every {value:g} {'steps' if kind == 'steps' else 'min'}"
                rows.append(f"| {cfg.label} | {vocab} | {label} | {len(saves)} | {bt._num(tok_s, ',.0f')} | "
                            f"{bt._num(tok_s / none_tok_s, '.3f')} | {bt._num(tok_s / plain, '.3f')} | "
                            f"{bt._num(measured['steady_tok_s'], ',.0f')} | {bt._num(waited, '.1f')} | "
                            f"{bt._num(write, '.1f')} | {bt._num(cost, '.1f')} | "
                            f"{bt._num(per_save / (60 * CHECKPOINT_MINUTES), '.3%')} |")
                print(rows[-1], flush=True)
    return (bt.setting_line(args) + " tok/s wall: tokens of the timed steps / the time between their reports' "
            "arrivals; cost ms/save: the timed steps' extra wall time over no checkpoints, per save in them; at "
            "the default: that cost once every default interval (a 'none' or minutes row that saved nothing "
            "shows -).\n\n" + "\n".join(rows) + "\n")


def run_in_tune(module: str, function: str, args: argparse.Namespace, tmp: Path) -> str:
    """`module.function(args)` (a bench/ script's table) inside one real Tune trial; returns the table."""
    import ray
    import ray.cloudpickle
    from ray import tune

    from sweep.orchestrate import CHECKPOINTS_KEPT

    args.table_out = str(tmp / "table.md")
    gpus = 1 if args.device == "cuda" else 0
    ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # bench/ is not importable on workers
    try:
        tuner = tune.Tuner(tune.with_resources(_in_tune, {"cpu": 1, "gpu": gpus}),
                           param_space={"module": module, "function": function, "args": vars(args)},
                           run_config=tune.RunConfig(name=module, storage_path=str(tmp / "ray"), verbose=0,
                                                     checkpoint_config=tune.CheckpointConfig(
                                                         num_to_keep=CHECKPOINTS_KEPT)))
        result = tuner.fit()[0]
        if result.error is not None:
            raise RuntimeError(f"bench trial failed: {result.error}")
    finally:
        ray.shutdown()
    return Path(args.table_out).read_text()


def _in_tune(config: dict) -> None:
    args = argparse.Namespace(**config["args"])
    Path(args.table_out).write_text(getattr(_sibling(config["module"]), config["function"])(args))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    modes = "none,steps:10,minutes:5"
    if "--checkpoints" in argv:
        i = argv.index("--checkpoints")
        modes, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    bt = _sibling("bench_trainable")
    args = bt.parse_args(argv)
    try:
        args.modes = parse_modes(modes)
    except ValueError as exc:
        print(f"bench_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    if args.modes[0][0] != "none":
        args.modes.insert(0, ("none", 0.0))  # the reference every row is compared with
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        try:
            bt._prepare_datasets(args, Path(tmp))
            for spec in args.techniques.split(","):
                bt.trial_config(args, spec, args.datasets[0][1])  # every technique valid before any GPU work
            table = (run_in_tune("bench_checkpoint", "bench_checkpoints", args, Path(tmp)) if args.report == "tune"
                     else bench_checkpoints(args))
        except bt.ConfigError as exc:
            print(f"bench_checkpoint: error: {exc}", file=sys.stderr)
            return 2
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
