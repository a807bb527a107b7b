"""How long an exact `--find-max-batch` takes, and where the time goes: runs `python -m sweep.run --find-max-batch`
for the techniques given and prints, per technique, the answer, what the scout (the search inside one fresh
process) said, the fresh-process outcomes that prove the answer, the probes and rounds, and the wall time from
the command's start to its end; then each probe's own timeline (fork to first step, training, and the gap to the
previous probe on its GPU: Tune's scheduling and the worker's reset).

    python bench/bench_max_batch.py --expect bf16_flash=1240 -- --techniques flash --data /tmp/pl10k        # H200
    python bench/bench_max_batch.py --expect baseline=681 -- --techniques baseline --data /tmp/pl10k
    python bench/bench_max_batch.py -- --device cpu --techniques baseline --max 3 --start 1 --data DIR ...   # CPU

Everything after `--` goes to `python -m sweep.run --find-max-batch` (not --name, --storage-path, --verbose).
`--expect LABEL=N` checks the answer against a known exact one (docs/results/max_batch_h200.md: the seed model
at vocab 10,000, seq_len 512 on one H200: bf16_flash 1240, baseline 681). The tables come last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OWN_FLAGS = ("--name", "--storage-path", "--verbose", "--find-max-batch")


def run_search(sweep_args: list[str], storage: Path) -> tuple[str, dict[str, float]]:
    """Run the search; (experiment path, unix times of the command's start, its driver's search line, its end)."""
    name = f"max-batch-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "sweep.run", "--find-max-batch", *sweep_args, "--name", name, "--storage-path",
           str(storage), "--verbose", "1"]  # 1: the driver's lines say when Ray is up, when Tune gets the search
    print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
    times = {"command_start": time.time()}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:  # timed as it comes: the driver says when it hands the search to Tune
        output.append(line)
        if line.startswith("Ray dashboard: "):
            times.setdefault("ray_line", time.time())
        if line.startswith("max-batch search over"):
            times.setdefault("search_line", time.time())
    proc.wait()
    times["command_end"] = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"bench_max_batch: error: the search failed (exit {proc.returncode}):\n{''.join(output)[-3000:]}")
    return str(storage / name), times


def command_timeline(path: str, times: dict[str, float]) -> str:
    """Where the command's wall time went, milestone to milestone (the first probe's worker, server and fork)."""
    import analysis

    probes = analysis.load(path).probes.sort_values("process_start_time").to_dict("records")
    first, last = probes[0], max(probes, key=lambda p: p["trial_end_time"])
    steps = [("command start", times["command_start"]),
             ("Ray is up (validation, data check, Ray start)", times.get("ray_line", math.nan)),
             ("driver hands the search to Tune (resource checks, memory-model seed)", times.get("search_line", math.nan)),
             ("first Tune worker started", first.get("worker_start_time", math.nan)),
             ("its fork server started", first.get("server_start_time", math.nan)),
             ("the server's imports done", first.get("imports_done_time", math.nan)),
             ("the scout forked", first["process_start_time"]),
             ("the last probe ended", last["trial_end_time"]),
             ("command end", times["command_end"])]
    rows = ["| milestone | since start (s) | since previous (s) |", "|---|---:|---:|"]
    for i, (what, t) in enumerate(steps):
        before = steps[i - 1][1] if i else t
        rows.append(f"| {what} | {_num(t - times['command_start'], '.2f')} | {_num(t - before, '.2f')} |")
    return "\n".join(rows)


def _num(value, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def probe_rows(path: str) -> tuple[list[str], dict[str, dict]]:
    """One row per probe trial (in start order) and, per technique label, what its scout said."""
    import analysis

    probes = analysis.load(path).probes.sort_values("process_start_time")
    rows, scouts, last_end = [], {}, math.nan
    for p in probes.to_dict("records"):
        name = str(p["name"])
        result = [json.loads(line) for line in (Path(path) / name / "result.json").read_text().splitlines()]
        final = result[-1] if result else {}
        scout = "scout_max_batch" in final
        if scout:
            scouts[str(final.get("label"))] = final
        outcome = (f"scout: {final.get('scout_max_batch')} ({len(final.get('scout_outcomes') or [])} in-process)"
                   if scout else str(p["status"]))
        start, end = p["process_start_time"], p["trial_end_time"]
        rows.append(f"| {name} | {int(p['batch_size'])} | {outcome} | {final.get('trial_process') or '-'} | "
                    f"{_num(p['first_step_start_time'] - start, '.2f')}"
                    f" | {_num(end - start, '.2f')} | {_num(start - last_end, '.2f')} |")
        last_end = end if math.isfinite(end) else last_end
    return rows, scouts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, sweep_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--expect", action="append", default=[], metavar="LABEL=N", help="a known exact answer")
    p.add_argument("--storage", default="results/bench_max_batch")
    p.add_argument("--out", help="also write the tables to this markdown file")
    args = p.parse_args(own)
    try:
        expected = {k: int(v) for k, v in (e.split("=", 1) for e in args.expect)}
    except ValueError:
        p.error("--expect takes LABEL=N, e.g. bf16_flash=1240")
    if clash := [a for a in sweep_args if a.split("=")[0] in OWN_FLAGS]:
        p.error(f"{clash[0]} is set by this script; leave it out of the search's arguments")
    storage = Path(args.storage).resolve()
    path, times = run_search(sweep_args, storage)
    wall = times["command_end"] - times["command_start"]
    records = json.loads((Path(path) / "max_batch.json").read_text())
    rows, scouts = probe_rows(path)
    summary = ["| technique | max batch | exact? | scout said | fresh outcomes | probes / rounds | search (s) | "
               "command wall (s) |", "|---|---:|---|---:|---|---|---:|---:|"]
    for r in records:
        want = expected.get(r["label"])
        exact = "-" if want is None else ("yes" if want == r["max_batch_size"] else f"NO (expected {want})")
        scout = scouts.get(r["label"], {})
        outcomes = ", ".join(f"{bs} {kind}" for bs, kind in r["outcomes"].items())
        summary.append(f"| {r['label']} | {r['max_batch_size']} | {exact} | {scout.get('scout_max_batch', '-')} | "
                       f"{outcomes} | {r['probes']} / {r['rounds']} | {r['wall_time_s']:.1f} | {wall:.1f} |")
    per_probe = ["| probe | batch | outcome | process | start to 1st step (s) | start to end (s) | gap after previous (s) |",
                 "|---|---:|---|---|---:|---:|---:|"] + rows
    trained = [float(row.split(" | ")[5]) for row in rows if row.split(" | ")[5] != "-"]
    median = _num(statistics.median(trained) if trained else None, ".2f")
    text = ("\n".join(per_probe) + f"\n\nmedian probe, start to end: {median} s"
            f"\n\nwhere the command's time went:\n\n{command_timeline(path, times)}"
            f"\n\nsearch: python -m sweep.run --find-max-batch {' '.join(sweep_args)}  ->  {path}\n\n"
            + "\n".join(summary) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0 if all(expected.get(r["label"], r["max_batch_size"]) == r["max_batch_size"] for r in records) else 1


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
