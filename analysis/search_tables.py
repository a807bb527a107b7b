"""The report's max-batch search tables: the answer per technique and memory limit, and the probes behind it."""
from __future__ import annotations

from typing import Any

import pandas as pd

from contract.io import first_line

from .compare import limit_cell
from .load import SweepResults
from .text import CELL_LINE_LIMIT, Table, mfu, num, present, text_cell


def _window_cell(window: Any) -> str:
    return num(window, 0) if present(window) and window > 0 else "-"


def _probe_count(probes: Any) -> Any:
    """`probes` is a count (newer records) or the list of probes run (older ones)."""
    return len(probes) if isinstance(probes, list) else probes


def _probes_rounds(probes: Any, rounds: Any) -> str:
    if not present(probes):
        return "-"
    return f"{int(probes)}/{int(rounds)}" if present(rounds) else f"{int(probes)}/-"


def max_batch_table(results: SweepResults) -> Table | None:
    """The search's answer per technique and GPU memory limit, with what the prediction-seeded search cost."""
    frame = results.max_batch
    if frame.empty:
        return None
    if "max_batch_size" in frame:
        frame = frame.sort_values("max_batch_size", ascending=False, na_position="last")
    records = frame.to_dict("records")
    rows = [[
        str(r.get("label", "-")), _window_cell(r.get("window")), limit_cell(r.get("gpu_memory_gb")),
        (">=" if r.get("hit_upper_bound") is True else "") + num(r.get("max_batch_size"), 0),
        num(r.get("peak_mem_mib"), 0), num(r.get("predicted_max_batch"), 0),
        _probes_rounds(_probe_count(r.get("probes")), r.get("rounds")),
        _probes_rounds(r.get("unseeded_probes"), r.get("unseeded_rounds")),
        num(r.get("parallelism"), 0), num(r.get("wall_time_s"), 1), str(r.get("status", "-")),
        first_line(r.get("error"), limit=CELL_LINE_LIMIT) if present(r.get("error")) else "",
    ] for r in records]
    notes = ["probes/rounds: probe trials and rounds of parallel probes the search ran (seeded with the predicted "
             "max batch when one is shown); unseeded: what the search from a small batch would have cost, "
             "replayed on the same outcomes. '>=': the search hit its upper bound."]
    notes += _search_cost_notes(records) + _unfinished_search_notes(results, records)
    return Table("Max batch size that fits",
                 ["technique", "window", "GPU limit", "max batch", "peak mem at max (MiB)", "predicted",
                  "probes/rounds", "unseeded probes/rounds", "parallelism", "wall time (s)", "status", "error"],
                 rows, notes)


def _search_cost_notes(records: list[dict]) -> list[str]:
    seeded = [r for r in records if r.get("seeded") is True and present(r.get("unseeded_probes"))
              and present(_probe_count(r.get("probes")))]
    if not seeded:
        return []
    probes = sum(int(_probe_count(r["probes"])) for r in seeded)
    rounds = sum(int(r["rounds"]) for r in seeded if present(r.get("rounds")))
    unseeded_probes = sum(int(r["unseeded_probes"]) for r in seeded)
    unseeded_rounds = sum(int(r["unseeded_rounds"]) for r in seeded if present(r.get("unseeded_rounds")))
    return [f"Seeded by the memory model: {probes} probes in {rounds} rounds; the unseeded search would have run "
            f"{unseeded_probes} probes in {unseeded_rounds} rounds."]


def _unfinished_search_notes(results: SweepResults, records: list[dict]) -> list[str]:
    """Searches whose probes ran but which left no record (interrupted), per technique and memory limit."""
    probes = results.probes
    if probes.empty:
        return []
    done = {(str(r.get("label")), limit_cell(r.get("gpu_memory_gb"))) for r in records}
    limits = pd.to_numeric(probes["gpu_memory_gb"], errors="coerce")
    ran = probes.assign(_key=[(str(t), limit_cell(g)) for t, g in zip(probes["label"], limits)])
    notes = []
    for key, group in ran.groupby("_key", sort=True):
        if key not in done:
            notes.append(f"{key[0]} ({key[1]}): search not finished ({len(group)} probes ran, no record; "
                         "interrupted?)")
    return notes


PROBE_OUTCOME = {"ok": "fits", "oom": "oom", "nan": "nan", "error": "error", "incomplete": "incomplete"}


def probes_table(results: SweepResults) -> Table | None:
    """Every probe trial of a max-batch search: the evidence behind each max batch."""
    probes = results.probes
    if probes.empty:
        return None
    probes = probes.assign(_technique=probes["label"].astype(str)).sort_values(["_technique", "batch_size"])
    rows = [[
        str(t["name"]), str(t["label"]), num(t["batch_size"], 0), PROBE_OUTCOME.get(t["status"], t["status"]),
        str(t["steps_reported"]), num(t["peak_mem_mib"], 0), num(t["tokens_per_s"], 0), mfu(t["mfu"]),
        text_cell(t["oom_phase"]),
    ] for _, t in probes.iterrows()]
    return Table("Probe trials (max-batch search)",
                 ["trial", "technique", "batch size", "outcome", "steps", "peak mem (MiB)", "tokens/s", "MFU",
                  "OOM phase"], rows,
                 ["A probe runs a few training steps at one batch size in a fresh process; tokens/s of so few "
                  "steps is indicative only."])
