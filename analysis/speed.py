"""Which steps a trial's speed is measured over, the three throughputs, and when two speeds are within noise.

Three throughput columns, one meaning each (all over the *steady* steps: not flagged `warmup`):

* `tokens_per_s`: the median over the steady steps of each step's GPU-time throughput (tokens of the step /
  its GPU time). Robust to a few slow steps; what the tables and plots compare.
* `steady_tokens_per_s`: total steady tokens / total steady GPU time, the trial's own figure (final report).
  It weights each step by its time, so it sits below the median when some steps are slow: the two differ
  whenever step times vary.
* `wall_tokens_per_s`: steady tokens / the wall time between their reports, the trial's own figure: what the
  user's clock saw, reporting, evaluation and checkpoints included.

A trial's speed spread is the interquartile range of its steady steps' tokens/s (`tokens_per_s_q25`,
`tokens_per_s_q75`); two trials whose ranges overlap are not distinguishable, and a speed is only ranked
when it rests on at least MIN_SPEED_STEPS steady steps.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

# A trial's first steps include CUDA context set-up, kernel autotuning, allocator growth and torch.compile work.
# The trainable flags those steps (`warmup`); reports without the flag fall back to skipping the first
# WARMUP_STEPS steps (never more than half).
WARMUP_STEPS = 3
SPEED_RULE_FLAG = "warmup_flag"
SPEED_RULE_SKIP = f"skip_first_{WARMUP_STEPS}"
MIN_SPEED_STEPS = 10  # steady steps a speed must rest on before it is ranked against another

SPEED_COLUMNS = ("step_time_median_s", "tokens_per_s", "tokens_per_s_q25", "tokens_per_s_q75", "mfu",
                 "speed_rule", "speed_warmup_steps", "speed_steps")


def step_rows(history: pd.DataFrame) -> pd.DataFrame:
    """One row per completed training step, the latest attempt of each (an OOM's final report names the step
    that failed, not a completed one, and is left out)."""
    if history.empty or "step" not in history:
        return pd.DataFrame()
    rows = history[history["step"].notna()]
    if "oom" in rows:
        rows = rows[~rows["oom"].eq(True)]
    return rows.drop_duplicates(subset="step", keep="last").sort_values("step", kind="stable")


def each_step_once(history: pd.DataFrame) -> pd.DataFrame:
    """The history with each step once: the latest report of it (a restart re-reports steps after its checkpoint)."""
    if history.empty or "step" not in history:
        return history
    return history.drop_duplicates(subset="step", keep="last").sort_values("step", kind="stable")


def warmup_steps(num_steps: int) -> int:
    """How many leading steps the fallback speed rule skips."""
    return min(WARMUP_STEPS, num_steps // 2)


def speed_rows(steps: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The steady steps speed is measured over, and the rule that chose them (None: no step to measure)."""
    if steps.empty:
        return steps, None
    if "warmup" in steps and steps["warmup"].notna().any():
        return steps[steps["warmup"].eq(False)], SPEED_RULE_FLAG  # NaN (flag missing on a step) is not False
    return steps.iloc[warmup_steps(len(steps)):], SPEED_RULE_SKIP


def _numbers(rows: pd.DataFrame, key: str) -> pd.Series:
    if rows.empty or key not in rows:
        return pd.Series(dtype=float)
    return pd.to_numeric(rows[key], errors="coerce").dropna()


def _or_none(value: float) -> float | None:
    return None if pd.isna(value) else float(value)


def speed_stats(steps: pd.DataFrame) -> dict[str, Any]:
    """A trial's speed columns (SPEED_COLUMNS) from its completed steps."""
    speed, rule = speed_rows(steps)
    tokens = _numbers(speed, "tokens_per_s")
    return {
        "step_time_median_s": _or_none(_numbers(speed, "step_time_s").median()),
        "tokens_per_s": _or_none(tokens.median()),
        "tokens_per_s_q25": _or_none(tokens.quantile(0.25)) if len(tokens) else None,
        "tokens_per_s_q75": _or_none(tokens.quantile(0.75)) if len(tokens) else None,
        "mfu": _or_none(_numbers(speed, "mfu").median()),
        "speed_rule": rule, "speed_warmup_steps": int(len(steps) - len(speed)), "speed_steps": int(len(tokens)),
    }


def speed_verdict(trials: pd.DataFrame, min_steps: int = MIN_SPEED_STEPS) -> tuple[pd.Series | None, str]:
    """The fastest of `trials` (completed, at one batch size) and what may be said of it.

    Returns (winner or None, note): no winner when the fastest or the runner-up rests on fewer than `min_steps`
    steady steps, or when their interquartile ranges of per-step tokens/s overlap (within noise)."""
    ranked = trials.dropna(subset=["tokens_per_s"]).sort_values("tokens_per_s", ascending=False)
    if ranked.empty:
        return None, "no trial measured tokens/s"
    best, top = ranked.iloc[0], ranked.head(2)
    too_few = top[top["speed_steps"].fillna(0) < min_steps]
    if len(too_few):
        return None, _too_few(too_few, min_steps)
    if len(ranked) == 1:
        return best, "the only trial that measured tokens/s"
    second = ranked.iloc[1]
    if _overlap(best, second):
        return None, (f"within noise: {best['label']} and {second['label']} are not distinguishable "
                      f"({_steps_each(best, second)}; their per-step tokens/s interquartile ranges overlap)")
    return best, (f"ahead of {second['label']} beyond noise (interquartile ranges of per-step tokens/s do not "
                  f"overlap; {_steps_each(best, second)})")


def _too_few(rows: pd.DataFrame, min_steps: int) -> str:
    named = ", ".join(f"{r['label']} {_count(r['speed_steps'])}" for _, r in rows.iterrows())
    return (f"no speed winner: too few steady steps to rank ({named}; at least {min_steps} each needed, "
            "e.g. a longer --max-steps)")


def _count(value) -> int:
    return 0 if pd.isna(value) else int(value)


def _overlap(a: pd.Series, b: pd.Series) -> bool:
    low_a, high_a = a["tokens_per_s_q25"], a["tokens_per_s_q75"]
    low_b, high_b = b["tokens_per_s_q25"], b["tokens_per_s_q75"]
    if any(pd.isna(v) for v in (low_a, high_a, low_b, high_b)):
        return True  # no spread known: nothing says they differ
    return low_a <= high_b and low_b <= high_a


def _steps_each(a: pd.Series, b: pd.Series) -> str:
    n_a, n_b = int(a["speed_steps"]), int(b["speed_steps"])
    return f"{n_a} steady steps each" if n_a == n_b else f"{n_a} and {n_b} steady steps"
