"""The comparison report (text and Markdown) and everything `write_report` puts in an output directory."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .load import SPEED_RULE_SKIP, WARMUP_STEPS, SweepResults
from .plots import (
    PREFERRED_COMPARISON_BATCH, SEARCH_PLOTS, TRAINING_PLOTS, SkipPlot, baseline_label, comparison_batch_size,
    memory_savings, ok_trials, plot_technique_comparison,
)

STATUS_ORDER = {"ok": 0, "oom": 1, "error": 2, "incomplete": 3}


@dataclass
class Table:
    """A titled table with notes; rendered as aligned text or as Markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def _num(value: Any, digits: int = 1, thousands: bool = True) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:+.1f}%"


def _params(value: Any) -> str:
    return "-" if value is None or pd.isna(value) else f"{value / 1e6:.2f}M"


def _mfu(value: Any) -> str:
    return "-" if value is None or pd.isna(value) else f"{100 * value:.1f}%"


def _compile_cell(trial: pd.Series) -> str:
    """Seconds spent compiling when the trial compiled, `off` when it did not, `-` when it never said."""
    compiled = trial.get("compile")
    if compiled is True or compiled == "True":
        return _num(trial.get("compile_time_s"), 1)
    return "off" if compiled is False or compiled == "False" else "-"


def _sorted_trials(trials: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    return trials.assign(
        _base=trials["label"] != baseline, _status=trials["status"].map(STATUS_ORDER).fillna(9),
        _technique=trials["label"].astype(str),
    ).sort_values(["batch_size", "_base", "_technique", "_status"]).drop(columns=["_base", "_status", "_technique"])


def comparison_table(results: SweepResults) -> Table:
    """Training trials side by side; a max-batch search's probes are not compared here (see `probes_table`)."""
    training = results.training()
    trials = _sorted_trials(training.trials, baseline_label(training.trials))
    rows = [[
        str(t["label"]), _num(t["batch_size"], 0), str(t["status"]), _num(t["val_ppl"], 2, False),
        _num(t["train_time_s"], 1), _num(t["peak_mem_mib"], 0), _num(t["tokens_per_s"], 0), _mfu(t["mfu"]),
        _compile_cell(t), _params(t["num_params"]),
        str(t["attention_kernel"]) if pd.notna(t["attention_kernel"]) else "-",
    ] for _, t in trials.iterrows()]
    notes = ["peak mem = max over steps of mem_step_peak_mib; " + speed_note(training.trials)
             + "; compile (s) = time of the steps during which torch.compile ran ('off': not compiled)."]
    if trials.empty and len(results.probes):
        notes = [f"No training trials: this experiment is a max-batch search ({len(results.probes)} probe trials of "
                 "a few steps each); see 'Max batch size that fits' and 'Probe trials'."]
    return Table(
        "Comparison",
        ["technique", "batch size", "status", "val PPL", "train time (s)", "peak mem (MiB)", "tokens/s", "MFU",
         "compile (s)", "params", "attention kernel"],
        rows, notes,
    )


def speed_note(trials: pd.DataFrame) -> str:
    """How tokens/s and MFU were measured, naming the trials that fell back to the skip-first-steps rule."""
    flag = ("tokens/s and MFU = median over the steps the trainable did not flag as warm-up (the first step of "
            "each process and every step torch.compile worked in)")
    skip = (f"tokens/s = median over steps after the first {WARMUP_STEPS} (at most half the steps are skipped; "
            "these trials predate the warm-up flag)")
    rules = trials["speed_rule"].dropna() if "speed_rule" in trials else pd.Series(dtype=object)
    if (rules == SPEED_RULE_SKIP).all():
        return skip
    fallback = trials.loc[rules[rules == SPEED_RULE_SKIP].index, "name"]
    if fallback.empty:
        return flag
    return f"{flag}; {skip}: {', '.join(map(str, fallback))}"


def memory_table(results: SweepResults) -> Table:
    trials = results.training().trials
    trials = _sorted_trials(trials, baseline_label(trials))
    trials = trials[trials["status"].isin(["ok", "oom"])]
    if trials["peak_mem_mib"].isna().all():
        return Table("Memory details (MiB)", [], [], ["No GPU memory measured (CPU trials, or no completed trial)."])
    rows = [[
        str(t["label"]), _num(t["batch_size"], 0), str(t["status"]), _num(t["fwd_peak_mean_mib"], 0),
        _num(t["fwd_peak_max_mib"], 0), _num(t["bwd_peak_mean_mib"], 0), _num(t["bwd_peak_max_mib"], 0),
        _num(t["opt_peak_max_mib"], 0), _num(t["peak_mem_mib"], 0), _num(t["reserved_mib"], 0),
    ] for _, t in trials.iterrows()]
    return Table(
        "Memory details (MiB)",
        ["technique", "batch size", "status", "fwd peak mean", "fwd peak max", "bwd peak mean", "bwd peak max",
         "optimizer peak max", "step peak max", "reserved max"],
        rows,
        ["fwd/bwd/optimizer peak: peak allocated during that phase of a step (mean and max over steps; an OOM "
         "trial's max includes the memory at failure); reserved: max of mem_reserved_mib (the caching allocator's "
         "footprint, what nvidia-smi sees). '-': not measured (CPU trials)."],
    )


def baseline_table(results: SweepResults) -> Table:
    savings = memory_savings(results)
    label = baseline_label(ok_trials(results))
    if savings.empty:
        reason = "no completed baseline trial" if label is None else "no technique completed at a baseline batch size"
        return Table("Versus baseline at the same batch size", [], [], [f"Not computed: {reason}."])
    savings = savings.sort_values(["batch_size", "label"])
    rows = [[
        str(s["label"]), str(s["batch_size"]), _num(s["peak_mem_mib"], 0), _num(s["baseline_peak_mem_mib"], 0),
        _pct(s["memory_saving_pct"]), _num(s["tokens_per_s"], 0), _pct(s["speed_change_pct"]),
        _num(s["val_ppl"], 2, False), _num(s["baseline_val_ppl"], 2, False),
    ] for _, s in savings.iterrows()]
    return Table(
        f"Versus baseline ({label}) at the same batch size",
        ["technique", "batch size", "peak mem (MiB)", "baseline peak (MiB)", "memory saving", "tokens/s",
         "speed change", "val PPL", "baseline val PPL"],
        rows,
        ["memory saving = 1 - peak / baseline peak (positive: less memory); speed change = tokens/s / baseline - 1."],
    )


def best_table(results: SweepResults) -> Table:
    batch = comparison_batch_size(results)
    if batch is None:
        return Table("Best technique", [], [], ["No completed trial."])
    at = ok_trials(results)[ok_trials(results)["batch_size"] == batch]
    picks = (("memory (lowest peak)", "peak_mem_mib", "idxmin", "MiB", 0),
             ("speed (highest tokens/s)", "tokens_per_s", "idxmax", "tokens/s", 0),
             ("perplexity (lowest val PPL)", "val_ppl", "idxmin", "PPL", 2))
    rows = []
    for goal, column, pick, unit, digits in picks:
        values = at[column].dropna()
        if values.empty:
            rows.append([goal, "-", "-"])
            continue
        best = at.loc[getattr(values, pick)()]
        rows.append([goal, str(best["label"]), f"{_num(best[column], digits)} {unit}"])
    notes = [f"Compared at batch size {batch}" + (
        "." if batch == PREFERRED_COMPARISON_BATCH
        else f" (the largest batch size with completed trials; none at {PREFERRED_COMPARISON_BATCH}).")]
    if not results.max_batch.empty and "max_batch_size" in results.max_batch:
        fits = results.max_batch.dropna(subset=["max_batch_size"])
        if not fits.empty:
            top = fits.loc[fits["max_batch_size"].idxmax()]
            rows.append(["largest batch that fits", str(top["label"]) + _window_suffix(top.get("window")),
                         f"{int(top['max_batch_size'])} sequences ({_limit_cell(top.get('gpu_memory_gb'))})"])
    return Table("Best technique", ["goal", "technique", "value"], rows, notes)


def _window_suffix(window: Any) -> str:
    return f" (window {int(window)})" if window is not None and pd.notna(window) and window > 0 else ""


def max_batch_table(results: SweepResults) -> Table | None:
    """The search's answer per technique and GPU memory limit, with what the prediction-seeded search cost."""
    frame = results.max_batch
    if frame.empty:
        return None
    if "max_batch_size" in frame:
        frame = frame.sort_values("max_batch_size", ascending=False, na_position="last")
    records = frame.to_dict("records")
    rows = [[
        str(r.get("label", "-")), _window_cell(r.get("window")), _limit_cell(r.get("gpu_memory_gb")),
        (">=" if r.get("hit_upper_bound") is True else "") + _num(r.get("max_batch_size"), 0),
        _num(r.get("peak_mem_mib"), 0), _num(r.get("predicted_max_batch"), 0),
        _probes_rounds(_probe_count(r.get("probes")), r.get("rounds")),
        _probes_rounds(r.get("unseeded_probes"), r.get("unseeded_rounds")),
        _num(r.get("parallelism"), 0), _num(r.get("wall_time_s"), 1), str(r.get("status", "-")),
        _first_line(r.get("error")) if _present(r.get("error")) else "",
    ] for r in records]
    notes = ["probes/rounds: probe trials and rounds of parallel probes the search ran (seeded with the predicted "
             "max batch when one is shown); unseeded: what the search from a small batch would have cost, "
             "replayed on the same outcomes. '>=': the search hit its upper bound."]
    notes += _search_cost_notes(records) + _unfinished_search_notes(results, records)
    return Table("Max batch size that fits",
                 ["technique", "window", "GPU limit", "max batch", "peak mem at max (MiB)", "predicted",
                  "probes/rounds", "unseeded probes/rounds", "parallelism", "wall time (s)", "status", "error"],
                 rows, notes)


def _present(value: Any) -> bool:
    return value is not None and not _isna(value) and value != ""


def _window_cell(window: Any) -> str:
    return _num(window, 0) if _present(window) and window > 0 else "-"


def _limit_cell(limit_gb: Any) -> str:
    return f"{limit_gb:g} GB" if _present(limit_gb) and limit_gb > 0 else "full GPU"


def _probe_count(probes: Any) -> Any:
    """`probes` is a count (newer records) or the list of probes run (older ones)."""
    return len(probes) if isinstance(probes, list) else probes


def _probes_rounds(probes: Any, rounds: Any) -> str:
    if not _present(probes):
        return "-"
    return f"{int(probes)}/{int(rounds)}" if _present(rounds) else f"{int(probes)}/-"


def _search_cost_notes(records: list[dict]) -> list[str]:
    seeded = [r for r in records if r.get("seeded") is True and _present(r.get("unseeded_probes"))
              and _present(_probe_count(r.get("probes")))]
    if not seeded:
        return []
    probes = sum(int(_probe_count(r["probes"])) for r in seeded)
    rounds = sum(int(r["rounds"]) for r in seeded if _present(r.get("rounds")))
    unseeded_probes = sum(int(r["unseeded_probes"]) for r in seeded)
    unseeded_rounds = sum(int(r["unseeded_rounds"]) for r in seeded if _present(r.get("unseeded_rounds")))
    return [f"Seeded by the memory model: {probes} probes in {rounds} rounds; the unseeded search would have run "
            f"{unseeded_probes} probes in {unseeded_rounds} rounds."]


def _unfinished_search_notes(results: SweepResults, records: list[dict]) -> list[str]:
    """Searches whose probes ran but which left no record (interrupted), per technique and memory limit."""
    probes = results.probes
    if probes.empty:
        return []
    done = {(str(r.get("label")), _limit_cell(r.get("gpu_memory_gb"))) for r in records}
    limits = pd.to_numeric(probes["gpu_memory_gb"], errors="coerce")
    ran = probes.assign(_key=[(str(t), _limit_cell(g)) for t, g in zip(probes["label"], limits)])
    notes = []
    for key, group in ran.groupby("_key", sort=True):
        if key not in done:
            notes.append(f"{key[0]} ({key[1]}): search not finished ({len(group)} probes ran, no record; "
                         "interrupted?)")
    return notes


PROBE_OUTCOME = {"ok": "fits", "oom": "oom", "error": "error", "incomplete": "incomplete"}


def probes_table(results: SweepResults) -> Table | None:
    """Every probe trial of a max-batch search: the evidence behind each max batch."""
    probes = results.probes
    if probes.empty:
        return None
    probes = probes.assign(_technique=probes["label"].astype(str)).sort_values(["_technique", "batch_size"])
    rows = [[
        str(t["name"]), str(t["label"]), _num(t["batch_size"], 0), PROBE_OUTCOME.get(t["status"], t["status"]),
        str(t["steps_reported"]), _num(t["peak_mem_mib"], 0), _num(t["tokens_per_s"], 0), _mfu(t["mfu"]),
        str(t["oom_phase"]) if _present(t["oom_phase"]) else "-",
    ] for _, t in probes.iterrows()]
    return Table("Probe trials (max-batch search)",
                 ["trial", "technique", "batch size", "outcome", "steps", "peak mem (MiB)", "tokens/s", "MFU",
                  "OOM phase"], rows,
                 ["A probe runs a few training steps at one batch size in a fresh process; tokens/s of so few "
                  "steps is indicative only."])


def _first_line(value: Any, limit: int = 120) -> str:
    if value is None or _isna(value) or not str(value).strip():
        return "-"
    line = str(value).strip().splitlines()[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _isna(value: Any) -> bool:
    return isinstance(value, float) and pd.isna(value)


def failures_tables(results: SweepResults) -> list[Table]:
    """OOM, errored and unfinished training trials (a probe's OOM is an answer, not a failure)."""
    trials = results.training().trials.sort_values(["batch_size", "name"])
    ooms = trials[trials["status"] == "oom"]
    errors = trials[trials["status"] == "error"]
    incomplete = trials[trials["status"] == "incomplete"]
    tables = [
        Table("OOM trials", ["trial", "batch size", "phase", "memory at failure (MiB)", "message"],
              [[str(t["name"]), _num(t["batch_size"], 0), str(t["oom_phase"] or "-"), _num(
                  t["oom_mem_peak_mib"] if pd.notna(t["oom_mem_peak_mib"]) else t["peak_mem_mib"], 0),
                _first_line(t["oom_message"])] for _, t in ooms.iterrows()], [] if len(ooms) else ["None."]),
        Table("Errored trials", ["trial", "batch size", "error"],
              [[str(t["name"]), _num(t["batch_size"], 0), str(t["error"] or "-")] for _, t in errors.iterrows()],
              [] if len(errors) else ["None."]),
    ]
    if len(incomplete):
        tables.append(Table("Incomplete trials (interrupted or pending: no final report)",
                            ["trial", "batch size", "steps reported", "Tune status"],
                            [[str(t["name"]), _num(t["batch_size"], 0), str(t["steps_reported"]), str(t["tune_status"])]
                             for _, t in incomplete.iterrows()]))
    return tables


def report_tables(results: SweepResults) -> list[Table]:
    training = results.training()
    search_only = training.trials.empty and len(results.probes) > 0
    tables = [comparison_table(results)]
    if not search_only:
        tables += [memory_table(training), baseline_table(training), best_table(training)]
    tables += [t for t in (max_batch_table(results), probes_table(results)) if t is not None]
    return tables + ([] if search_only else failures_tables(results))


def summary_lines(results: SweepResults) -> list[str]:
    trials = results.trials
    counts = trials["status"].value_counts()
    status = ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if s in counts)
    gpus = sorted(str(g) for g in trials["gpu_name"].dropna().unique())
    lines = [f"Experiment: {results.path}", f"Trials: {len(trials)} ({status or 'none'})"]
    if len(results.probes):
        lines.append(f"Max-batch search: {len(results.probes)} of these trials are its probes")
    if gpus:
        lines.append(f"GPU: {', '.join(gpus)}")
    limits = trials["gpu_memory_gb"].dropna()
    if len(limits) and limits.max() > 0:
        lines.append(f"GPU memory limit: {limits.max():g} GB")
    return lines


def _widths(table: Table) -> list[int]:
    return [max([len(h)] + [len(r[i]) for r in table.rows]) for i, h in enumerate(table.headers)]


def render_text(table: Table) -> str:
    out = [table.title, "=" * len(table.title)]
    if table.rows:
        widths = _widths(table)
        out.append("  ".join(h.ljust(w) for h, w in zip(table.headers, widths)).rstrip())
        out.append("  ".join("-" * w for w in widths))
        out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table.rows]
    out += table.notes
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(table: Table) -> str:
    out = [f"## {table.title}", ""]
    if table.rows:
        out.append("| " + " | ".join(table.headers) + " |")
        out.append("|" + "|".join("---" for _ in table.headers) + "|")
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
        out.append("")
    out += [f"{note}  " for note in table.notes]
    return "\n".join(out).rstrip()


def format_table(results: SweepResults) -> str:
    """The comparison table as aligned text (what the sweep prints at the end of a run)."""
    return render_text(comparison_table(results))


def format_max_batch_table(results: SweepResults) -> str:
    """The max-batch table as aligned text ('' when the experiment ran no search)."""
    table = max_batch_table(results)
    return render_text(table) if table is not None else ""


def format_report(results: SweepResults, plot_notes: list[str] = (), markdown: bool = False) -> str:
    render = render_markdown if markdown else render_text
    header = summary_lines(results)
    parts = (["# Sweep comparison report", ""] + [f"{line}  " for line in header]) if markdown else header
    blocks = ["\n".join(parts)] + [render(t) for t in report_tables(results)]
    if plot_notes:
        blocks.append(render(Table("Plots", [], [], list(plot_notes))))
    return "\n\n".join(blocks) + "\n"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary sibling and rename, so no reader ever sees a half-written file."""
    # Not mkstemp: its 0600 mode would survive the rename and hide reports from the rest of a team.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (e.g. window None/int, bool/NaN) become strings Arrow can store."""
    import pyarrow as pa

    frame = frame.copy()
    for column in frame.columns[frame.dtypes == object]:
        try:
            pa.array(frame[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            frame[column] = frame[column].map(lambda v: None if v is None or _isna(v) else str(v))
    return frame


def draw_plots(results: SweepResults, out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Every plot the data supports (plots 1-7 over the training trials only); the reasons for the others."""
    import matplotlib.pyplot as plt

    written, notes = {}, []
    training = results.training()
    plots = [(plot, training) for plot in TRAINING_PLOTS] + [(plot, results) for plot in SEARCH_PLOTS]
    if training.trials.empty and len(results.probes):
        notes.append("Plots 1-7 skipped: no training trials (a max-batch search; its probes are not compared).")
        plots = plots[len(TRAINING_PLOTS):]
    for plot, source in plots:
        try:
            name, fig = plot(source)
        except SkipPlot as skip:
            notes.append(str(skip))
            continue
        try:
            written[name] = _atomic_write(out_dir / name, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight"))
        finally:
            plt.close(fig)
        if plot is plot_technique_comparison:
            batch = comparison_batch_size(source)
            notes.append(f"{name}: techniques compared at batch size {batch}"
                         + ("" if batch == PREFERRED_COMPARISON_BATCH else
                            f" (largest batch size with completed trials; no bs{PREFERRED_COMPARISON_BATCH})"))
    return written, notes


def write_report(results: SweepResults, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Reports, plots and tables into `out_dir`; returns {file name: path} of everything written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, plot_notes = draw_plots(results, out)
    for name, markdown in (("comparison_report.txt", False), ("comparison_report.md", True)):
        text = format_report(results, plot_notes, markdown=markdown)
        written[name] = _atomic_write(out / name, lambda p, t=text: p.write_text(t, encoding="utf-8"))
    written["trials.csv"] = _atomic_write(out / "trials.csv", lambda p: results.trials.to_csv(p, index=False))
    steps = _parquet_safe(results.steps)
    written["steps.parquet"] = _atomic_write(out / "steps.parquet", lambda p: steps.to_parquet(p, index=False))
    if not results.max_batch.empty:
        written["max_batch.csv"] = _atomic_write(
            out / "max_batch.csv", lambda p: results.max_batch.to_csv(p, index=False))
    return dict(sorted(written.items()))
