"""Where a sweep's wall time goes: runs a real sweep (`python -m sweep.run`) and prints each trial's start-up
timeline and the gap between one trial's end and the next one's first step on the same GPU (or CPU slot).

Every trial reports unix times of its start-up milestones once, in its final report (contract.keys:
process_start_time ... trial_end_time, process_trials_before); this script lines them up against the time the
command started and ended. Run it with Tune's actor reuse off, on, or both (the same sweep twice):

    python bench/bench_startup.py --reuse off,on -- --preset cpu --max-steps 20            # CPU smoke run
    python bench/bench_startup.py --reuse off,on -- --preset seed --data /tmp/pl10k --epochs 1
    python bench/bench_startup.py --reuse off,on -- --preset seed-report --data /tmp/syn50k --epochs 1

Everything after `--` goes to `python -m sweep.run` as it is (never --name, --storage-path, --reuse-actors or
--verbose: this script sets them). The summary table comes last:
  wall: command start to exit (the comparison table is its last output); before 1st: command start to the first
  trial's first step (validation, data check, Ray start, Tune, worker spawn, imports, CUDA, model);
  train: summed train_time_s (what the trials trained, evaluated and reported); ideal: train / slots + before 1st;
  gap: a trial's first step minus the end of the trial before it on its slot (Tune's scheduling, a worker start,
  imports, CUDA, data, model; with reuse, only the reset, data and model).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OWN_FLAGS = ("--name", "--storage-path", "--reuse-actors", "--no-reuse-actors", "--verbose")
PHASES = (  # (column, from, to): seconds between two milestones of one trial
    ("worker+imports", "worker_start_time", "imports_done_time"),  # a forked trial's: its worker's and server's
    ("to trial", "imports_done_time", "trial_start_time"),  # a forked trial: from the fork (process_start_time)
    ("data", "trial_start_time", "data_ready_time"),
    ("cuda", "data_ready_time", "cuda_ready_time"),
    ("model", "cuda_ready_time", "model_ready_time"),
    ("1st step", "first_step_start_time", "first_step_end_time"),
    ("training", "first_step_start_time", "trial_end_time"),
)
FRESH_ONLY = ("worker_start_time",)  # a reused process, a later fork of a warm server: started long before
EXTRA_KEYS = ("process_start_time", "server_start_time", "trial_process")


def phase_start(trial: dict, key: str) -> float:
    """A phase's start; a forked trial enters `run_trial` from its fork, not from its server's imports."""
    if key == "imports_done_time" and trial.get("trial_process") in ("fork", "spawn"):
        key = "process_start_time"
    return float(trial[key])


def first_of_its_process(trials: list[dict]) -> None:
    """trial["fresh"]: the first trial its worker process (and, forked, its server) ran: it paid their start."""
    seen = set()
    for t in sorted(trials, key=lambda t: t["trial_start_time"]):
        forked = t.get("trial_process") in ("fork", "spawn")
        own = ("server", t["server_start_time"]) if forked else ("process", t["process_id"])
        t["fresh"] = int(t["process_trials_before"] or 0) == 0 and own not in seen
        seen.add(own)


def run_sweep(mode: str, sweep_args: list[str], storage: Path) -> tuple[str, float, float]:
    """One sweep with reuse `mode`; (experiment path, command start, command end) as unix times."""
    from sweep.config import SweepConfig

    name = f"startup-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    reuse_default = SweepConfig().reuse_actors
    reuse = [] if (mode == "on") == reuse_default else (["--reuse-actors"] if mode == "on" else ["--no-reuse-actors"])
    cmd = [sys.executable, "-m", "sweep.run", *sweep_args, "--name", name, "--storage-path", str(storage),
           "--verbose", "0", *reuse]
    print(f"[reuse {mode}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"bench_startup: error: the sweep failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return str(storage / name), started, ended


def _gap(a: float, b: float) -> float:
    return b - a if math.isfinite(a) and math.isfinite(b) else math.nan


def assign_slots(trials: list[dict]) -> None:
    """trial["slot"]: its GPU (UUID); on CPU its process when reused, else the slot whose last trial ended
    latest before it started (trials on CPU share no device to name)."""
    ends: dict[str, float] = {}
    for t in sorted(trials, key=lambda t: t["trial_start_time"]):
        if t.get("gpu_uuid"):
            t["slot"] = str(t["gpu_uuid"])
        else:
            free = [s for s, end in ends.items() if end <= t["trial_start_time"]]
            t["slot"] = max(free, key=ends.get) if free else f"slot{len(ends)}"
        t["gap"] = _gap(ends[t["slot"]], t["first_step_start_time"]) if t["slot"] in ends else math.nan
        ends[t["slot"]] = t["trial_end_time"]


def load_trials(path: str) -> list[dict]:
    import analysis

    frame = analysis.load(path).training().trials
    keep = ["name", "status", "train_time_s", "process_trials_before", "process_id", "gpu_uuid", *EXTRA_KEYS,
            *{k for _, a, b in PHASES for k in (a, b)}]
    return [{k: row.get(k) for k in keep} for row in frame.to_dict("records")]


def _num(value: float, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def trial_table(trials: list[dict], started: float) -> str:
    rows = ["| trial | slot | process, reused | start (s) | " + " | ".join(c for c, _, _ in PHASES) + " | gap before |",
            "|---|---|---:|---:|" + "---:|" * (len(PHASES) + 1)]
    slots = {s: i for i, s in enumerate(dict.fromkeys(t["slot"] for t in trials))}
    for t in sorted(trials, key=lambda t: t["trial_start_time"]):
        reused = int(t["process_trials_before"] or 0)
        phases = [_num(_gap(phase_start(t, a), float(t[b]))) if t["fresh"] or a not in FRESH_ONLY else "-"
                  for _, a, b in PHASES]
        rows.append(f"| {t['name']} | {slots[t['slot']]} | {t.get('trial_process') or '-'} {reused} | "
                    f"{_num(t['trial_start_time'] - started, '.1f')} | {' | '.join(phases)} | {_num(t['gap'])} |")
    return "\n".join(rows)


def summary_row(mode: str, trials: list[dict], started: float, ended: float) -> str:
    gaps = [t["gap"] for t in trials if math.isfinite(t["gap"])]
    train = sum(float(t["train_time_s"] or 0.0) for t in trials)
    before = min(t["first_step_start_time"] for t in trials) - started
    tail = ended - max(t["trial_end_time"] for t in trials)
    slots = len({t["slot"] for t in trials})
    ideal = train / slots + before
    return (f"| {mode} | {len(trials)} | {slots} | {ended - started:.1f} | {before:.1f} | {train:.1f} | {tail:.1f} | "
            f"{_num(statistics.median(gaps) if gaps else math.nan)} | {_num(max(gaps) if gaps else math.nan)} | "
            f"{(ended - started) / ideal:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, sweep_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reuse", default="off,on", help="comma list of off, on (default off,on: the sweep twice)")
    p.add_argument("--storage", default="results/bench_startup", help="where the sweeps' results go")
    p.add_argument("--out", help="also write the tables to this markdown file")
    args = p.parse_args(own)
    modes = args.reuse.split(",")
    if set(modes) - {"on", "off"} or not modes:
        p.error(f"--reuse takes off, on or off,on; got {args.reuse!r}")
    if clash := [a for a in sweep_args if a.split("=")[0] in OWN_FLAGS]:
        p.error(f"{clash[0]} is set by this script; leave it out of the sweep's arguments")
    storage = Path(args.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    sections, summary = [], []
    for mode in modes:
        path, started, ended = run_sweep(mode, sweep_args, storage)
        trials = load_trials(path)
        assign_slots(trials)
        first_of_its_process(trials)
        sections.append(f"### reuse {mode}: {path}\n\n{trial_table(trials, started)}")
        summary.append(summary_row(mode, trials, started, ended))
    header = ("| reuse | trials | slots | wall (s) | before 1st (s) | train (s) | after last (s) | gap median (s) | "
              "gap max (s) | wall / ideal |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    text = ("\n\n".join(sections) + f"\n\nsweep: python -m sweep.run {' '.join(sweep_args)}\n\n" + header + "\n"
            + "\n".join(summary) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
