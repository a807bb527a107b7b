"""The report's comparison tables: trials side by side, versus the baseline, the best technique, failures."""
from __future__ import annotations

from typing import Any

import pandas as pd

from contract.io import first_line

from .load import SweepResults
from .selection import (
    PREDICTED_NOTE, baseline_label, comparison_batch_size, comparison_note, memory_savings, memory_source, ok_trials,
)
from .speed import MIN_SPEED_STEPS, SPEED_RULE_SKIP, WARMUP_STEPS, speed_verdict
from .text import CELL_LINE_LIMIT, Table, mfu, missing, num, params, pct, present, text_cell

STATUS_ORDER = {"ok": 0, "oom": 1, "nan": 2, "error": 3, "incomplete": 4}
PPL_TIE = 0.001  # val PPLs within 0.1% of the best are named beside it


def _compile_cell(trial: pd.Series) -> str:
    """Seconds spent compiling when the trial compiled, `off` when it did not, `-` when it never said."""
    compiled = str(trial.get("compile"))
    if compiled == "True":
        return num(trial.get("compile_time_s"), 1)
    return "off" if compiled == "False" else "-"


def sorted_trials(trials: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    keys = ["batch_size", "seq_len"] if "seq_len" in trials else ["batch_size"]
    return trials.assign(
        _base=trials["label"] != baseline, _status=trials["status"].map(STATUS_ORDER).fillna(9),
        _technique=trials["label"].astype(str),
    ).sort_values([*keys, "_base", "_technique", "_status"]).drop(columns=["_base", "_status", "_technique"])


def several(trials: pd.DataFrame, column: str) -> bool:
    return column in trials and trials[column].dropna().nunique() > 1


def spread_cell(trial: pd.Series) -> str:
    """Half the interquartile range of per-step tokens/s, relative to the median: +-3%."""
    median, low, high = trial.get("tokens_per_s"), trial.get("tokens_per_s_q25"), trial.get("tokens_per_s_q75")
    if any(missing(v) for v in (median, low, high)) or median <= 0:
        return "-"
    return f"±{50 * (high - low) / median:.0f}%"


def comparison_table(results: SweepResults, brief: bool = False) -> Table:
    """Training trials side by side; a max-batch search's probes are not compared here (see `probes_table`).
    `brief`: one short note instead of the report's full notes (what a command prints at the end)."""
    training = results.training()
    trials = sorted_trials(training.trials, baseline_label(training.trials))
    source = memory_source(trials)
    memory = source.column if source else "peak_mem_mib"
    with_seq, with_params = several(trials, "seq_len"), several(trials, "num_params")
    headers = ["technique", "batch size", *(["seq_len"] if with_seq else []), "status", "val PPL", "train time (s)",
               source.short if source else "peak mem (MiB)", "tokens/s (GPU)", "spread", "tokens/s (wall)", "MFU",
               "compile (s)", *(["params"] if with_params else []), "attention kernel"]
    rows = [[
        str(t["label"]), num(t["batch_size"], 0), *([num(t["seq_len"], 0, False)] if with_seq else []), str(t["status"]),
        num(t["val_ppl"], 2, False), num(t["train_time_s"], 1), num(t.get(memory), 0), num(t["tokens_per_s"], 0),
        spread_cell(t), num(t.get("wall_tokens_per_s"), 0), mfu(t["mfu"]), _compile_cell(t),
        *([params(t["num_params"])] if with_params else []), text_cell(t["attention_kernel"]),
    ] for _, t in trials.iterrows()]
    notes = [memory_note(source), speed_note(training.trials), THROUGHPUT_NOTE,
             "compile (s) = time of the steps during which torch.compile ran ('off': not compiled)."]
    if brief:
        notes = [("predicted peak: the memory model's, for a CUDA GPU (not measured). " if source and source.predicted
                  else "") + BRIEF_NOTE]
    if trials.empty and len(results.probes):
        notes = [f"No training trials: this experiment is a max-batch search ({len(results.probes)} probe trials of "
                 "a few steps each); see 'Max batch size that fits' and 'Probe trials'."]
    return Table("Comparison", headers, rows, notes)


BRIEF_NOTE = ("tokens/s (GPU): median over the steady steps of each step's GPU-time throughput, spread: half its "
              "interquartile range; tokens/s (wall): what your clock saw. Every note: comparison_report.txt.")
THROUGHPUT_NOTE = (
    "tokens/s (GPU) = median over the steady steps of each step's tokens / its GPU time (CUDA events; the step's "
    "host time on CPU); spread = half the interquartile range of those per-step figures, relative to the median; "
    "tokens/s (wall) = steady tokens / the wall time between their reports, what your clock saw (reporting, "
    "evaluation and checkpoints included). trials.csv's steady_tokens_per_s = total steady tokens / total steady "
    "GPU time, the trial's own figure: it differs from the median when step times vary (slow steps weigh in by "
    "their time).")


def memory_note(source) -> str:
    if source is None:
        return "peak mem: not measured (CPU trials) and no memory-model predictions in this experiment."
    if source.predicted:
        return ("predicted peak = the memory model's peak allocated memory for each trial's config on a CUDA GPU "
                "(not measured: these trials ran without a GPU).")
    return "peak mem = max over steps of mem_step_peak_mib (peak allocated GPU memory of a step)."


def speed_note(trials: pd.DataFrame) -> str:
    """How tokens/s and MFU were measured, naming the trials that fell back to the skip-first-steps rule."""
    flag = ("steady steps = those the trainable did not flag as warm-up (the first step of each process and every "
            "step torch.compile worked in)")
    skip = (f"the steps after the first {WARMUP_STEPS} (at most half the steps are skipped; these trials predate "
            "the warm-up flag)")
    rules = trials["speed_rule"].dropna() if "speed_rule" in trials else pd.Series(dtype=object)
    if len(rules) and (rules == SPEED_RULE_SKIP).all():
        return f"steady steps = {skip}."
    fallback = trials.loc[rules[rules == SPEED_RULE_SKIP].index, "name"]
    if fallback.empty:
        return f"{flag}."
    return f"{flag}; for {', '.join(map(str, fallback))}: {skip}."


def baseline_table(results: SweepResults) -> Table:
    ok = ok_trials(results)
    source, label = memory_source(ok), baseline_label(ok)
    savings = memory_savings(results, source)
    if savings.empty:
        reason = ("no completed baseline trial" if label is None else "no GPU memory measured and no predictions"
                  if source is None else "no other technique completed at a batch size the baseline ran")
        return Table("Versus baseline at the same batch size", [], [], [f"Not computed: {reason}."])
    savings = savings.sort_values(["batch_size", "seq_len", "label"])
    with_seq = savings["seq_len"].dropna().nunique() > 1
    rows = [[
        str(s["label"]), str(s["batch_size"]), *([num(s["seq_len"], 0, False)] if with_seq else []),
        num(s["peak_mem_mib"], 0), num(s["baseline_peak_mem_mib"], 0), pct(s["memory_saving_pct"]),
        num(s["tokens_per_s"], 0), pct(s["speed_change_pct"]), num(s["val_ppl"], 2, False),
        num(s["baseline_val_ppl"], 2, False),
    ] for _, s in savings.iterrows()]
    what = "predicted peak" if source.predicted else "peak mem"
    notes = ["memory saving = 1 - peak / baseline peak (positive: less memory); speed change = tokens/s / baseline - 1"
             " (medians; see the spread in 'Comparison')."]
    if source.predicted:
        notes.append(f"Peaks are {PREDICTED_NOTE}.")
    return Table(
        f"Versus baseline ({label}) at the same batch size",
        ["technique", "batch size", *(["seq_len"] if with_seq else []), f"{what} (MiB)", f"baseline {what} (MiB)",
         "memory saving", "tokens/s", "speed change", "val PPL", "baseline val PPL"],
        rows, notes,
    )


def _memory_pick(at: pd.DataFrame) -> list[str]:
    source = memory_source(at)
    values = at[source.column].dropna() if source else pd.Series(dtype=float)
    if values.empty:
        return ["memory (lowest peak)", "-", "not measured"]
    best = at.loc[values.idxmin()]
    return ["memory (lowest peak)", str(best["label"]),
            f"{num(best[source.column], 0)} MiB" + (" (predicted; not measured)" if source.predicted else "")]


def _speed_pick(at: pd.DataFrame) -> tuple[list[str], str]:
    winner, why = speed_verdict(at)
    if winner is None:
        return ["speed (highest tokens/s)", "-", why], ""
    return ["speed (highest tokens/s)", str(winner["label"]), f"{num(winner['tokens_per_s'], 0)} tokens/s"], why


def _ppl_pick(at: pd.DataFrame) -> list[str]:
    values = at["val_ppl"].dropna()
    if values.empty:
        return ["perplexity (lowest val PPL)", "-", "-"]
    best = at.loc[values.idxmin()]
    ties = at[(at["val_ppl"] <= best["val_ppl"] * (1 + PPL_TIE)) & (at.index != best.name)]
    tied = f" ({', '.join(sorted(map(str, ties['label'])))} within 0.1%)" if len(ties) else ""
    return ["perplexity (lowest val PPL)", str(best["label"]), f"{num(best['val_ppl'], 2)} PPL{tied}"]


def best_table(results: SweepResults) -> Table:
    batch = comparison_batch_size(results)
    if batch is None:
        return Table("Best technique", [], [], ["No completed trial."])
    ok = ok_trials(results)
    at = ok[ok["batch_size"] == batch]
    speed_row, speed_why = _speed_pick(at)
    rows = [_memory_pick(at), speed_row, _ppl_pick(at)]
    notes = [f"Compared at batch size {batch}{comparison_note(batch)}."]
    if speed_why:
        notes.append(f"Speed: {speed_why}.")
    notes.append(f"A speed winner needs at least {MIN_SPEED_STEPS} steady steps and an interquartile range of per-step "
                 "tokens/s that does not overlap the runner-up's.")
    fits = results.max_batch.dropna(subset=["max_batch_size"]) if "max_batch_size" in results.max_batch else None
    if fits is not None and not fits.empty:
        top = fits.loc[pd.to_numeric(fits["max_batch_size"]).idxmax()]
        rows.append(["largest batch that fits", str(top["label"]) + _window_suffix(top.get("window")),
                     f"{int(top['max_batch_size'])} sequences ({limit_cell(top.get('gpu_memory_gb'))})"])
    return Table("Best technique", ["goal", "technique", "value"], rows, notes)


def _window_suffix(window: Any) -> str:
    return f" (window {int(window)})" if present(window) and window > 0 else ""


def _message_cell(message: Any) -> str:
    """A message's first line, cut to fit a cell; `-` when there is none."""
    return ("" if missing(message) else first_line(message, limit=CELL_LINE_LIMIT)) or "-"


def limit_cell(limit_gb: Any) -> str:
    return f"{limit_gb:g} GB" if present(limit_gb) and limit_gb > 0 else "full GPU"


def failures_tables(results: SweepResults) -> list[Table]:
    """OOM, diverged, errored and unfinished training trials (a probe's OOM is an answer, not a failure)."""
    trials = results.training().trials.sort_values(["batch_size", "name"])
    ooms, nans = trials[trials["status"] == "oom"], trials[trials["status"] == "nan"]
    errors, incomplete = trials[trials["status"] == "error"], trials[trials["status"] == "incomplete"]
    tables = [
        Table("OOM trials", ["trial", "batch size", "phase", "memory at failure (MiB)", "message"],
              [[str(t["name"]), num(t["batch_size"], 0), text_cell(t["oom_phase"]), num(
                  t["oom_mem_peak_mib"] if pd.notna(t["oom_mem_peak_mib"]) else t["peak_mem_mib"], 0),
                _message_cell(t["oom_message"])] for _, t in ooms.iterrows()], [] if len(ooms) else ["None."]),
        Table("Errored trials", ["trial", "batch size", "error"],
              [[str(t["name"]), num(t["batch_size"], 0), text_cell(t["error"])] for _, t in errors.iterrows()],
              [] if len(errors) else ["None."]),
    ]
    if len(nans):
        tables.insert(1, Table(
            "Diverged trials (the loss went NaN or infinite)", ["trial", "batch size", "at step", "last finite loss"],
            [[str(t["name"]), num(t["batch_size"], 0), num(t["steps_reported"], 0), num(_last_finite(results, t), 3)]
             for _, t in nans.iterrows()],
            ["A diverged trial stops at the step whose loss was not finite; its speed and memory are not compared."]))
    if len(incomplete):
        tables.append(Table("Incomplete trials (interrupted or pending: no final report)",
                            ["trial", "batch size", "steps reported", "Tune status"],
                            [[str(t["name"]), num(t["batch_size"], 0), str(t["steps_reported"]), str(t["tune_status"])]
                             for _, t in incomplete.iterrows()]))
    return tables


def _last_finite(results: SweepResults, trial: pd.Series) -> float | None:
    steps = results.steps[results.steps["trial_id"] == trial["trial_id"]] if "loss" in results.steps else None
    if steps is None or steps.empty:
        return None
    losses = pd.to_numeric(steps.sort_values("step")["loss"], errors="coerce")
    finite = losses[losses.abs() < float("inf")].dropna()
    return float(finite.iloc[-1]) if len(finite) else None
