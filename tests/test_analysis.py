"""analysis on real Ray Tune experiments of a small function trainable that reports on the contract: its Tune
config holds TrialConfig switches plus the sweep's GRID_KEY/KIND_KEY, and its reports carry exactly the keys of
`contract.keys` (`keys_of`), like `trainable.reports` builds them. Its trials end every way a trial can: ok,
oom (final OOM report), nan (the loss went NaN), error (an exception: Tune ERROR), incomplete (stopped before its
final report), and one is restarted from a checkpoint (its result.json re-reports steps). A second experiment is
a max-batch search (probe trials + max_batch.json) as `sweep.max_batch` writes it."""
from __future__ import annotations

import json
import math
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from contract.experiment import GRID_KEY, KIND_KEY, MAX_BATCH_RECORD_KEYS, PREDICTIONS_FILE, trial_name
from contract.keys import BREAKDOWN_KEYS, MEMORY_COMPONENTS, keys_of
from contract.techniques import DEFAULT_SWITCHES, TECHNIQUES, technique_family, technique_label

NUM_STEPS = 12
SEQ_LEN = 32
RESTART_AT, RESTART_FROM, RESTART_END = 6, 5, 8  # steps 1..6, killed, resumed from the step-4 checkpoint: 5..8
# (TrialConfig switches, how the trial ends); the name is derived from them as the sweep derives it.
CASES = [
    ({"technique": "baseline", "batch_size": 2}, "ok"), ({"technique": "baseline", "batch_size": 4}, "ok"),
    ({"technique": "baseline", "batch_size": 8}, "oom"),
    ({"technique": "gradcp", "batch_size": 2}, "ok"), ({"technique": "gradcp", "batch_size": 4}, "error"),
    ({"technique": "flash_compile", "batch_size": 2}, "ok"), ({"technique": "flash_compile", "batch_size": 4}, "ok"),
    ({"technique": "flash_compile", "batch_size": 8}, "incomplete"),
    ({"technique": "window", "window": 16, "batch_size": 4}, "ok"),
    ({"technique": "window", "window": 8, "batch_size": 4}, "legacy"),
    ({"technique": "bf16", "batch_size": 2}, "restarted"), ({"technique": "bf16", "batch_size": 4}, "nan"),
]
MEMORY_FACTOR = {"baseline": 100.0, "gradcp": 60.0, "bf16_flash_compile": 40.0, "bf16_window16": 50.0,
                 "bf16_window8": 45.0, "bf16": 80.0}
SPEED_FACTOR = {"baseline": 1.0, "gradcp": 0.7, "bf16_flash_compile": 2.5, "bf16_window16": 2.0,
                "bf16_window8": 1.5, "bf16": 1.8}
LOSS_OFFSET = {"baseline": 0.0, "gradcp": 0.0, "bf16_flash_compile": 0.01, "bf16_window16": 0.05,
               "bf16_window8": 0.06, "bf16": 0.02}  # gradcp's loss is the baseline's: identical curves
LEGACY_KEYS = ("warmup", "compiling", "mfu", "compile_time_s", "steady_tokens_per_s", "steady_mfu",
               "wall_tokens_per_s", *BREAKDOWN_KEYS)  # a trainable from before these keys reports none of them
FLOPS_PER_TOKEN, PEAK_FLOPS = 1.0e6, 1.0e10
# Where the memory goes at batch 4: baseline measured and predicted; flash measured, but its components miss 3%
# of the peak; window16 predicted only (as on CPU); window8 (legacy) reports nothing.
BREAKDOWN_SHARE = dict(zip(MEMORY_COMPONENTS, (0.1, 0.1, 0.2, 0.25, 0.1, 0.05, 0.05, 0.1, 0.0, 0.05)))


def config_of(switches: dict, kind: str = "train") -> dict:
    """A trial's Tune config as the sweep builds it: TrialConfig's switches resolved from the preset (the label
    is derived from them, never stored), plus the sweep's GRID_KEY and KIND_KEY."""
    config = {**DEFAULT_SWITCHES, "window": None, **TECHNIQUES[switches["technique"]], **switches, "seq_len": SEQ_LEN,
              "gpu_memory_gb": 1.0 if kind == "probe" else None}
    return {**config, GRID_KEY: trial_name(technique_label(config), config["batch_size"], kind), KIND_KEY: kind}


ENDINGS = {config_of(s)[GRID_KEY]: ending for s, ending in CASES}


def step_memory(label: str, batch_size: int, step: int) -> float:
    """Step peak grows for a few steps then settles, so the max is not simply the last step."""
    return MEMORY_FACTOR[label] * batch_size + (7 - abs(step - 4))


def step_speed(label: str, batch_size: int, step: int) -> float:
    """Step 1 is slow (warm-up); later steps vary, so the median is a real median."""
    base = 1000.0 * SPEED_FACTOR[label] * batch_size
    return base / 10 if step == 1 else base + 10 * ((step * 7) % 5)


def step_loss(label: str, batch_size: int, step: int) -> float:
    return 6.0 - 0.25 * step + 0.1 * batch_size + LOSS_OFFSET[label]


def is_warmup(label: str, step: int, first: int = 1) -> bool:
    return step == first or ("compile" in label and step <= 2)


def breakdown(label: str, batch_size: int) -> dict:
    """The final report's where-the-memory-goes keys (NaN where the trial did not measure or predict)."""
    peak = step_memory(label, batch_size, 4)
    measured = label in ("baseline", "bf16_flash_compile") and batch_size == 4
    predicted = label in ("baseline", "bf16_flash_compile", "bf16_window16") and batch_size == 4
    scale = 0.97 if label == "bf16_flash_compile" else 1.0  # flash's attribution misses 3% of its peak
    keys = {k: math.nan for k in BREAKDOWN_KEYS} | {"breakdown_phase": "backward" if measured else None}
    for component, part in BREAKDOWN_SHARE.items():
        keys[f"measured_{component}_mib"] = part * peak * scale if measured else math.nan
        keys[f"predicted_{component}_mib"] = part * peak * 1.02 if predicted else math.nan
    if measured:
        keys |= {"breakdown_peak_mib": peak, "measured_slack_mib": 30.0}
    if predicted:
        keys["predicted_slack_mib"] = 25.0
    return keys


def fake_trial(config: dict) -> None:
    """Reports exactly the contract's keys, in the order and at the times `trainable.trial` does."""
    from ray import tune

    name, bs = config[GRID_KEY], config["batch_size"]
    ending = ENDINGS.get(name, "ok") if config[KIND_KEY] == "train" else PROBE_ENDINGS[name]
    label, nan = technique_label(config), math.nan
    facts = {"label": label, "family": technique_family(config),
             "attention_kernel": {"flash": "sdpa_flash", "window": "flex"}.get(config["attention"], "eager"),
             "dtype": "bfloat16" if label.startswith("bf16") else "float32", "tf32": not label.startswith("bf16"),
             "device": "cuda", "gpu_name": "Fake GPU", "gpu_total_mib": 2048.0, "num_params": 123456,
             "model_flops_per_token": FLOPS_PER_TOKEN, "peak_flops": PEAK_FLOPS, "torch_version": "2.x",
             "cuda_version": "13.0"}
    assert set(facts) == set(keys_of("fact"))
    dropped = LEGACY_KEYS if ending == "legacy" else ()
    last_steps = NUM_STEPS if config[KIND_KEY] == "train" else 3
    attempts = [(1, RESTART_AT), (RESTART_FROM, RESTART_END)] if ending == "restarted" else [(1, last_steps)]

    def report(metrics: dict) -> None:
        tune.report({k: v for k, v in metrics.items() if k not in dropped})

    for first, end in attempts:
        for step in range(first, end + 1):
            if ending == "oom" and step == 3:
                report({**{k: nan for k in keys_of("step", "eval", "final")}, **facts, "step": step,
                        "mem_step_peak_mib": 1000.0, "oom": True, "compiling": False, "warmup": False,
                        "final": True, "status": "oom", "train_time_s": 0.5, "oom_phase": "backward",
                        "oom_message": "CUDA out of memory. Tried to allocate 2 GiB", "oom_mem_peak_mib": 1000.0})
                return
            if ending == "error" and step == 3:
                raise ValueError("synthetic failure at step 3")
            speed, memory = step_speed(label, bs, step), step_memory(label, bs, step)
            killed = ending == "restarted" and first == 1 and step >= RESTART_FROM  # the attempt that was lost
            loss = math.nan if ending == "nan" and step == 5 else step_loss(label, bs, step) + (0.5 if killed else 0)
            metrics = {
                "step": step, "loss": loss, "lr": 1e-3, "tokens_seen": step * bs * SEQ_LEN,
                "step_time_s": bs * SEQ_LEN / speed, "tokens_per_s": speed,
                "mfu": speed * FLOPS_PER_TOKEN / PEAK_FLOPS, "mem_fwd_peak_mib": memory - 10,
                "mem_bwd_peak_mib": memory, "mem_opt_peak_mib": memory - 20, "mem_step_peak_mib": memory,
                "mem_allocated_mib": 20.0, "mem_reserved_mib": memory + 30, "oom": False,
                "compiling": "compile" in label and step <= 2, "warmup": is_warmup(label, step, first),
                "compile_time_s": 0.5 * min(step, 2) if "compile" in label else 0.0, **facts,
            }
            assert set(metrics) == set(keys_of("step", "fact"))
            if step == 4 or step == end:
                metrics |= {"val_loss": 4.0, "val_ppl": math.exp(4.0)}
            if ending == "nan" and step == 5:
                report({**metrics, **_totals(label, bs), "final": True, "status": "nan"})
                return
            if step == end and (first, end) == attempts[-1]:
                val_loss = 3.0 + 0.01 * bs + (0.2 if "window" in label else 0.0)
                final = {**metrics, **_totals(label, bs), "final": True, "status": "ok",
                         "val_loss": val_loss, "val_ppl": math.exp(val_loss)}
                assert set(final) == set(keys_of("step", "fact", "eval", "final"))
                report(final)
                return
            report(metrics)


def _totals(label: str, bs: int) -> dict:
    """The final report's totals: every `final` key (times and counts the test does not check are 1.0)."""
    totals = {k: 1.0 for k in keys_of("final") if k not in ("final", "status")}
    return totals | {"train_time_s": 1.25 * bs, "steady_tokens_per_s": 777.0 * bs, "steady_mfu": 0.25,
                     "wall_tokens_per_s": 700.0 * bs, "compile_time_s": 1.0 if "compile" in label else 0.0,
                     "gpu_uuid": "GPU-fake"} | breakdown(label, bs)


def stop_interrupted(trial_id: str, result: dict) -> bool:
    return ENDINGS.get(result["config"][GRID_KEY]) == "incomplete" and result.get("step", 0) >= 3


# A max-batch search as sweep.max_batch writes it: probe trials (KIND_KEY probe) and their records;
# bf16_window16's search was interrupted (probes ran, no record).
PROBES = [({"technique": "baseline", "batch_size": 4}, "ok"), ({"technique": "baseline", "batch_size": 8}, "oom"),
          ({"technique": "flash", "batch_size": 8}, "ok"),
          ({"technique": "window", "window": 16, "batch_size": 4}, "ok")]
PROBE_ENDINGS = {config_of(s, "probe")[GRID_KEY]: ending for s, ending in PROBES}


def search_record(label: str, technique: str, **values) -> dict:
    record = {key: None for key in MAX_BATCH_RECORD_KEYS}
    record |= {"label": label, "technique": technique, "gpu_memory_gb": 1.0, "status": "ok", "seq_len": SEQ_LEN,
               "parallelism": 2, "seeded": True, "predicted_budget_mib": 1024.0, "hit_upper_bound": False}
    return record | values


SEARCH_RECORDS = [
    search_record("baseline", "baseline", max_batch_size=4, peak_mem_mib=412.0, probes=2, rounds=1, wall_time_s=5.5,
                  outcomes={"4": "fits", "8": "oom"}, predicted_max_batch=5, unseeded_probes=7, unseeded_rounds=4),
    search_record("bf16_flash", "flash", max_batch_size=8, peak_mem_mib=333.0, probes=1, rounds=1, wall_time_s=2.5,
                  hit_upper_bound=True, outcomes={"8": "fits"}, predicted_max_batch=9, unseeded_probes=5,
                  unseeded_rounds=3),
]
# What the sweep writes to PREDICTIONS_FILE (sweep.predict.prediction_rows_for), for two of the trials.
PREDICTIONS = {"budget": "2048 MiB = a 2 GiB GPU", "vocab_size": 512, "trials": [
    {"trial": "baseline_bs4", "label": "baseline", "technique": "baseline", "batch_size": 4, "seq_len": SEQ_LEN,
     "kernel": "eager", "predicted_peak_mib": 420.0, "predicted_reserved_mib": 450.0, "fits": True,
     "upper_bound": False, "phase": "backward"},
    {"trial": "bf16_flash_compile_bs4", "label": "bf16_flash_compile", "technique": "flash_compile", "batch_size": 4,
     "seq_len": SEQ_LEN, "kernel": "sdpa_flash", "predicted_peak_mib": 200.0, "upper_bound": True}],
    "seed_grid": [{"trial": "baseline_bs32", "label": "baseline", "gpu": "h200", "predicted_peak_mib": 900.0}]}


def run_fake_experiment(storage: Path, name: str, cases: list, kind: str = "train", stop=None) -> Path:
    from ray import cloudpickle, tune

    # Ray's workers cannot import this test module: ship the trainable (and its helpers) by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    table = {c[GRID_KEY]: c for c in (config_of(switches, kind) for switches, _ in cases)}
    space = {GRID_KEY: tune.grid_search(list(table)), KIND_KEY: kind}  # as sweep.tuning.param_space builds it
    space |= {key: tune.sample_from(lambda config, key=key: table[config[GRID_KEY]][key])
              for key in next(iter(table.values())) if key not in space}
    tuner = tune.Tuner(
        fake_trial,
        param_space=space,
        tune_config=tune.TuneConfig(
            reuse_actors=True,  # one worker process per CPU, not per trial: keeps the test fast
            trial_name_creator=lambda t: t.config[GRID_KEY],
            trial_dirname_creator=lambda t: f"{t.config[GRID_KEY]}_{t.trial_id}",
        ),
        run_config=tune.RunConfig(storage_path=str(storage), name=name, verbose=0, stop=stop),
    )
    tuner.fit()
    return storage / name


@pytest.fixture(scope="module")
def experiment(ray_local, tmp_path_factory) -> Path:
    """A grid sweep: no max-batch search, no predictions file."""
    return run_fake_experiment(tmp_path_factory.mktemp("tune"), "fake_sweep", CASES, stop=stop_interrupted)


@pytest.fixture(scope="module")
def experiment_full(experiment, tmp_path_factory) -> Path:
    """The same sweep with a max-batch search's records and the memory model's predictions beside it."""
    path = tmp_path_factory.mktemp("full") / "fake_full"
    shutil.copytree(experiment, path)
    (path / "max_batch.json").write_text(json.dumps(SEARCH_RECORDS))
    (path / PREDICTIONS_FILE).write_text(json.dumps(PREDICTIONS))
    return path


@pytest.fixture(scope="module")
def search_experiment(ray_local, tmp_path_factory) -> Path:
    path = run_fake_experiment(tmp_path_factory.mktemp("search"), "fake_search", PROBES, kind="probe")
    (path / "max_batch.json").write_text(json.dumps(SEARCH_RECORDS))
    return path


@pytest.fixture(scope="module")
def results(experiment):
    from analysis import load

    return load(experiment)


@pytest.fixture(scope="module")
def full(experiment_full):
    from analysis import load

    return load(experiment_full)


def by_name(results) -> pd.DataFrame:
    return results.trials.set_index("name")


def labelled(switches: dict) -> str:
    return config_of(switches)[GRID_KEY]


@pytest.mark.slow
def test_one_row_per_trial_with_statuses(results):
    trials = by_name(results)
    assert len(results.trials) == len(CASES) and results.trials["trial_id"].is_unique
    expected = {labelled(s): {"legacy": "ok", "restarted": "ok"}.get(e, e) for s, e in CASES}
    assert trials["status"].to_dict() == expected
    assert (trials["kind"] == "train").all()
    assert trials.loc["bf16_window16_bs4", "technique"] == "window"  # the preset; the label is derived
    assert trials.loc["bf16_window16_bs4", "label"] == "bf16_window16"
    assert trials.loc["bf16_window16_bs4", "family"] == "bf16"
    assert trials.loc["baseline_bs8", "oom_phase"] == "backward"
    assert trials.loc["baseline_bs8", "oom_mem_peak_mib"] == 1000.0
    assert trials.loc["baseline_bs8", "oom_message"].startswith("CUDA out of memory")
    assert trials.loc["gradcp_bs4", "error"] == "ValueError: synthetic failure at step 3"
    assert trials.loc["gradcp_bs4", "tune_status"] == "ERROR" and trials.loc["gradcp_bs4", "label"] == "gradcp"
    assert pd.isna(trials.loc["baseline_bs4", "error"])
    assert trials.loc["bf16_flash_compile_bs8", "tune_status"] == "TERMINATED"
    assert trials.loc["bf16_bs4", "steps_reported"] == 5 and pd.isna(trials.loc["bf16_bs4", "final_loss"])
    assert GRID_KEY not in results.trials and KIND_KEY not in results.trials


@pytest.mark.slow
def test_numbers_match_what_trials_reported(results):
    trials = by_name(results)
    for switches, ending in CASES:
        name = labelled(switches)
        row, label, bs = trials.loc[name], trials.loc[name, "label"], switches["batch_size"]
        last = {"oom": 2, "error": 2, "incomplete": 3, "nan": 5, "restarted": RESTART_END}.get(ending, NUM_STEPS)
        memory = [step_memory(label, bs, s) for s in range(1, last + 1)]
        assert row["peak_mem_mib"] == pytest.approx(max(memory + ([1000.0] if ending == "oom" else [])))
        assert row["steps_reported"] == last
        assert row["fwd_peak_mean_mib"] == pytest.approx(sum(memory) / len(memory) - 10)
        assert row["bwd_peak_max_mib"] == pytest.approx(max(memory))
        assert row["reserved_mib"] == pytest.approx(max(memory) + 30)
        assert row["batch_size"] == bs and row["seq_len"] == SEQ_LEN and row["num_params"] == 123456
        assert row["gpu_name"] == "Fake GPU"
        if ending not in ("ok", "legacy"):
            continue
        if ending == "legacy":  # no warm-up flag: the first 3 steps are skipped
            rule, measured = "skip_first_3", range(4, NUM_STEPS + 1)
            for column in ("mfu", "steady_tokens_per_s", "wall_tokens_per_s", "compile_time_s"):
                assert pd.isna(row[column]), column
        else:
            rule, measured = "warmup_flag", [s for s in range(1, NUM_STEPS + 1) if not is_warmup(label, s)]
            median = pd.Series([step_speed(label, bs, s) for s in measured]).median()
            assert row["mfu"] == pytest.approx(median * FLOPS_PER_TOKEN / PEAK_FLOPS)
            # the trial's own figures, beside analysis's median: each column one meaning
            assert row["steady_tokens_per_s"] == 777.0 * bs and row["wall_tokens_per_s"] == 700.0 * bs
            assert row["steady_mfu"] == 0.25 and row["compile_time_s"] == (1.0 if "compile" in label else 0.0)
        speeds = pd.Series([step_speed(label, bs, s) for s in measured])
        assert row["tokens_per_s"] == pytest.approx(speeds.median())
        assert row["tokens_per_s_q25"] == pytest.approx(speeds.quantile(0.25))
        assert row["tokens_per_s_q75"] == pytest.approx(speeds.quantile(0.75))
        assert row["speed_rule"] == rule and row["speed_steps"] == len(measured)
        assert row["speed_warmup_steps"] == NUM_STEPS - len(measured)
        assert row["val_loss"] == pytest.approx(3.0 + 0.01 * bs + (0.2 if "window" in label else 0.0))
        assert row["train_time_s"] == pytest.approx(1.25 * bs)
        assert row["final_loss"] == pytest.approx(step_loss(label, bs, NUM_STEPS))
    assert trials.loc["bf16_window8_bs4", "window"] == 8
    assert trials.loc["bf16_flash_compile_bs4", "attention_kernel"] == "sdpa_flash"
    assert trials.loc["bf16_flash_compile_bs4", "compile"] == True  # noqa: E712
    assert trials.loc["baseline_bs4", "loss"] == "standard" and trials.loc["gradcp_bs2", "checkpointing"] == "full"


@pytest.mark.slow
def test_a_restarted_trial_shows_each_step_once_from_its_latest_attempt(results):
    """result.json holds steps 1..6, then 5..8 again (a worker killed after step 6 resumed from a checkpoint)."""
    trial = by_name(results).loc["bf16_bs2"]
    steps = results.steps[results.steps["name"] == "bf16_bs2"]
    assert steps["step"].tolist() == list(range(1, RESTART_END + 1))
    assert steps["loss"].tolist() == pytest.approx([step_loss("bf16", 2, s) for s in range(1, RESTART_END + 1)])
    assert trial["steps_reported"] == RESTART_END and trial["status"] == "ok"
    assert trial["speed_warmup_steps"] == 2  # the first step of each process: 1 and 5


@pytest.mark.slow
def test_steps_is_long_format_history(results):
    steps = results.steps
    assert {"trial_id", "name", "step", "loss", "mem_step_peak_mib", "tokens_per_s", "oom", "val_ppl"} <= set(steps)
    assert not any(c.startswith("config/") for c in steps.columns)
    per_trial = steps[steps["name"] == "baseline_bs4"]
    assert per_trial["step"].tolist() == list(range(1, NUM_STEPS + 1))
    assert per_trial["mem_step_peak_mib"].max() == by_name(results).loc["baseline_bs4", "peak_mem_mib"]
    assert set(steps["trial_id"]) == set(results.trials["trial_id"])


@pytest.mark.slow
def test_a_grid_sweep_has_empty_search_and_prediction_frames_that_keep_their_columns(results):
    from analysis import PREDICTION_COLUMNS

    assert results.max_batch.empty and list(results.max_batch.columns[:len(MAX_BATCH_RECORD_KEYS)]) == list(
        MAX_BATCH_RECORD_KEYS)
    assert results.predictions.empty and list(results.predictions.columns) == list(PREDICTION_COLUMNS)
    assert results.probes.empty and list(results.probes.columns) == list(results.trials.columns)
    for frame in (results.max_batch, results.predictions, results.probes):
        assert frame["label"].tolist() == [] and frame["technique"].tolist() == []
    assert results.trials["predicted_peak_mib"].isna().all()


@pytest.mark.slow
def test_predictions_are_joined_by_trial_name(full):
    trials = by_name(full)
    assert trials.loc["baseline_bs4", "predicted_peak_mib"] == 420.0
    assert trials.loc["bf16_flash_compile_bs4", "predicted_upper_bound"] == True  # noqa: E712
    assert trials["predicted_peak_mib"].notna().sum() == 2
    assert set(full.predictions["scope"]) == {"trial", "seed_grid"}
    assert (full.predictions["budget_source"] == PREDICTIONS["budget"]).all()
    from analysis.memory_tables import memory_table

    table = memory_table(full.training())
    cells = {(r[0], r[1]): dict(zip(table.headers, r)) for r in table.rows}
    measured = trials.loc["baseline_bs4", "peak_mem_mib"]
    assert cells[("baseline", "4")]["predicted peak"] == "420"
    assert cells[("baseline", "4")]["model error"] == f"{100 * (420.0 / measured - 1):+.1f}%"


@pytest.mark.slow
def test_loads_through_a_storage_uri(experiment_full, full):
    """A URI goes through pyarrow's filesystem, as remote storage (s3://, gs://) does."""
    from analysis import load

    remote = load(f"file://{experiment_full}")
    assert remote.trials["status"].tolist() == full.trials["status"].tolist()
    assert len(remote.steps) == len(full.steps) and len(remote.max_batch) == 2 and len(remote.predictions) == 3


@pytest.mark.slow
def test_loads_a_relative_path(experiment, results, monkeypatch):
    """`python -m analysis results/NAME` from the working directory, as the sweep prints it."""
    from analysis import load

    monkeypatch.chdir(experiment.parent)
    relative = load(experiment.name)
    assert relative.trials["status"].tolist() == results.trials["status"].tolist()
    assert relative.path == str(experiment.resolve())


@pytest.mark.slow
def test_write_report_writes_every_file(full, tmp_path):
    import os

    from analysis import format_table, write_report
    from analysis.report import comparison_table

    old = os.umask(0o022)
    try:
        written = write_report(full, tmp_path)
    finally:
        os.umask(old)
    expected = {
        "comparison_report.txt", "comparison_report.md", "trials.csv", "steps.parquet", "max_batch.csv",
        "predictions.csv", "1_memory_vs_batch_size.png", "2_speed_vs_batch_size.png", "3_memory_speed_tradeoff.png",
        "4_technique_comparison_bs4.png", "5_window_size_comparison.png", "6_memory_savings_vs_baseline.png",
        "7_loss_curves.png", "8_max_batch.png", "9_memory_breakdown.png",
    }
    assert set(written) == expected
    for name, path in written.items():
        assert path == tmp_path / name and path.stat().st_size > 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, name  # shared reports: not a temp file's 0600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert pd.read_csv(tmp_path / "trials.csv")["name"].tolist() == full.trials["name"].tolist()
    assert len(pd.read_parquet(tmp_path / "steps.parquet")) == len(full.steps)

    text = (tmp_path / "comparison_report.txt").read_text()
    for needle in ("baseline_bs8", "backward", "CUDA out of memory", "Incomplete trials", "bf16_flash_compile_bs8",
                   "gradcp_bs4", "ValueError: synthetic failure at step 3", "Versus baseline (baseline)",
                   "Diverged trials (the loss went NaN or infinite)", "Max batch size that fits",
                   "Compared at batch size 4", "MFU", "compile (s)", "tokens/s (GPU)", "tokens/s (wall)",
                   "Where the memory goes (MiB)", "it differs from the median when step times vary",
                   # the legacy trial is named as the one that fell back to the skip-first-steps rule
                   "for bf16_window8_bs4: the steps after the first 3",
                   "10_seq_len.png skipped: the experiment has a single seq_len"):
        assert needle in text, needle
    assert "Seed grid predicted" not in text  # measured memory: the predicted seed grid is for GPU-less sweeps
    diverged = text[text.index("Diverged trials"):]
    assert f"bf16_bs4  4           5        {step_loss('bf16', 4, 4):.3f}" in diverged
    table = comparison_table(full)
    cells = {(r[0], r[1]): dict(zip(table.headers, r)) for r in table.rows}
    flash, base = cells[("bf16_flash_compile", "4")], cells[("baseline", "4")]
    assert flash["compile (s)"] == "1.0" and base["compile (s)"] == "off"
    assert cells[("bf16_window8", "4")]["MFU"] == "-" and cells[("bf16_window8", "4")]["tokens/s (wall)"] == "-"
    row = by_name(full).loc["bf16_flash_compile_bs4"]
    assert flash["MFU"] == f"{100 * row['mfu']:.1f}%" and flash["tokens/s (wall)"] == f"{700 * 4:,.0f}"
    assert flash["tokens/s (GPU)"] == f"{row['tokens_per_s']:,.0f}"
    assert flash["spread"] == f"±{50 * (row['tokens_per_s_q75'] - row['tokens_per_s_q25']) / row['tokens_per_s']:.0f}%"
    # bf16_flash_compile at bs4 uses 40/100 of the baseline's memory per sequence: a 60% saving (+/- the offsets).
    saving = 100 * (1 - row["peak_mem_mib"] / by_name(full).loc["baseline_bs4", "peak_mem_mib"])
    assert f"{saving:+.1f}%" in text
    assert "| bf16_flash_compile | 4 |" in (tmp_path / "comparison_report.md").read_text()
    printed = format_table(full)  # what the sweep prints: the table and one short note
    assert printed.count("\n") == len(CASES) + 4  # title, rule, header, dashes, one line per trial, the note
    assert printed.splitlines()[-1].startswith("tokens/s (GPU): median over the steady steps")


@pytest.mark.slow
def test_where_the_memory_goes(full, tmp_path):
    """The final report's component keys land in `trials`, in the report's table and in plot 9."""
    from analysis.memory_tables import breakdown_table
    from analysis.plots import plot_memory_breakdown

    trials = by_name(full)
    for key in BREAKDOWN_KEYS:
        assert key in full.trials, key
    peak = step_memory("baseline", 4, 4)
    assert trials.loc["baseline_bs4", "measured_optimizer_mib"] == pytest.approx(0.2 * peak)
    assert trials.loc["baseline_bs4", "breakdown_phase"] == "backward"
    assert pd.isna(trials.loc["bf16_window16_bs4", "measured_params_mib"])
    table = breakdown_table(full.training())
    assert table.headers == ["component", "baseline", "bf16_flash_compile", "bf16_window16"]  # window8 has none
    rows = {r[0]: r[1:] for r in table.rows}
    assert list(rows)[:len(MEMORY_COMPONENTS)] == list(MEMORY_COMPONENTS)
    assert rows["optimizer"][0] == f"{0.2 * peak:,.0f} / {0.2 * peak * 1.02:,.0f} (20%)"
    assert rows["optimizer"][2].startswith("- / ")  # predicted only, its share of the predicted peak
    assert rows["largest"] == ["act_attention"] * 3
    assert rows["components sum to peak"][0] == "ok (+0.0%)"
    assert rows["components sum to peak"][1] == "OFF (-3.0%)" and rows["components sum to peak"][2] == "-"
    assert rows["peak phase"] == ["backward", "backward", "-"]
    name, fig = plot_memory_breakdown(full.training())
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert name == "9_memory_breakdown.png"
    assert ticks == ["baseline", "bf16_flash_compile", "bf16_window16\n(predicted)"]
    stacked = sum(p.get_height() for p in fig.axes[0].patches if abs(p.get_x() + p.get_width() / 2) < 1e-9)
    assert stacked == pytest.approx(peak)  # the measured baseline's bar is its measured peak
    assert any(p.get_hatch() == "//" for p in fig.axes[0].patches)
    fig.savefig(tmp_path / name)


@pytest.mark.slow
def test_best_technique_names_a_speed_winner_only_beyond_noise(full):
    from analysis import SweepResults
    from analysis.compare import best_table

    rows = {r[0]: r for r in best_table(full.training()).rows}
    assert rows["speed (highest tokens/s)"][1] == "bf16_flash_compile"  # 10 steady steps, IQRs far apart
    trials = full.trials.copy()
    window = trials["name"] == "bf16_window16_bs4"
    flash = trials.loc[trials["name"] == "bf16_flash_compile_bs4"].iloc[0]
    trials.loc[window, ["tokens_per_s", "tokens_per_s_q25", "tokens_per_s_q75"]] = [
        flash["tokens_per_s"] - 1, flash["tokens_per_s_q25"] - 5, flash["tokens_per_s_q75"] - 5]
    noisy = best_table(SweepResults(full.path, trials, full.steps).training())
    speed = {r[0]: r for r in noisy.rows}["speed (highest tokens/s)"]
    assert speed[1] == "-" and speed[2].startswith(
        "within noise: bf16_flash_compile and bf16_window16 are not distinguishable (10 and 11 steady steps")
    trials.loc[window, "speed_steps"] = 4
    few = {r[0]: r for r in best_table(SweepResults(full.path, trials, full.steps).training()).rows}
    assert few["speed (highest tokens/s)"][2].startswith("no speed winner: too few steady steps to rank "
                                                         "(bf16_window16 4; at least 10 each needed")


@pytest.mark.slow
def test_loss_curves_name_identical_curves(results):
    """gradcp recomputes activations: its loss curve is the baseline's, and the legend says so."""
    from analysis.plots import plot_loss_curves

    _, fig = plot_loss_curves(results.training())
    legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes
               if ax.get_legend() is not None}
    assert "baseline = gradcp (identical curves)" in legends["batch size 2"]
    assert "bf16_flash_compile" in legends["batch size 2"]  # 0.01 nats apart: not identical
    assert "bf16 (nan)" in legends["batch size 4"] and "gradcp (error)" in legends["batch size 4"]
    assert "identical" in fig._suptitle.get_text()


@pytest.mark.slow
def test_tradeoff_labels_coinciding_points_once(results):
    from analysis import SweepResults
    from analysis.plots import plot_tradeoff

    trials = results.trials.copy()
    same = trials["name"].isin(["bf16_window16_bs4", "bf16_window8_bs4"])
    trials.loc[same, ["peak_mem_mib", "tokens_per_s"]] = [321.0, 7000.0]
    _, fig = plot_tradeoff(SweepResults(results.path, trials, results.steps))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "bs4: bf16_window16, bf16_window8" in texts
    assert not any(t == "bs4bs4" or t.count("bs4") > 1 for t in texts)


@pytest.mark.slow
def test_plots_degrade_without_windows_or_baseline(results, tmp_path):
    from analysis import SweepResults, write_report

    trials = results.trials[(results.trials["label"] != "baseline") & results.trials["window"].isna()]
    subset = SweepResults(path=results.path, trials=trials, steps=results.steps[results.steps["trial_id"].isin(
        trials["trial_id"])])
    written = write_report(subset, tmp_path)
    assert "5_window_size_comparison.png" not in written and "6_memory_savings_vs_baseline.png" not in written
    assert "max_batch.csv" not in written and "predictions.csv" not in written
    text = (tmp_path / "comparison_report.txt").read_text()
    assert "5_window_size_comparison.png skipped" in text
    assert "6_memory_savings_vs_baseline.png skipped: no completed baseline trial" in text


@pytest.mark.slow
def test_cpu_trials_show_predicted_memory_and_say_so(results):
    """Trials that measured no GPU memory: plots 1, 3, 6 and the memory tables use the predicted CUDA peaks,
    labelled as predictions; without predictions, plot 6 gives the true reason."""
    from analysis import SweepResults, format_report
    from analysis.load import MEMORY_AGGREGATES
    from analysis.plots import SkipPlot, plot_memory_savings, plot_memory_vs_batch, plot_tradeoff

    ok = results.trials["status"] == "ok"
    cpu = results.trials[ok].assign(device="cpu", gpu_name=None, gpu_total_mib=float("nan"),
                                    **{c: float("nan") for c in MEMORY_AGGREGATES})
    cpu["predicted_peak_mib"] = 100.0 + cpu["batch_size"] * cpu["label"].map(MEMORY_FACTOR)
    predicted = SweepResults(results.path, cpu, results.steps)
    text = format_report(predicted)
    for needle in ("Device: CPU (GPU memory not measured; the memory figures below are the memory model's",
                   "Memory details (MiB), predicted for a CUDA GPU", "predicted peak (MiB)",
                   "memory (lowest peak)         bf16_flash_compile  260 MiB (predicted; not measured)"):
        assert needle in text, needle
    for plot in (plot_memory_vs_batch, plot_tradeoff, plot_memory_savings):
        _, fig = plot(predicted)
        titles = " ".join(t.get_text() for ax in fig.axes for t in (ax.title,)) + fig.axes[0].get_ylabel()
        assert "predicted" in titles, plot.__name__
    _, fig = plot_memory_vs_batch(predicted)
    assert "predicted by the memory model for a CUDA GPU; not measured" in fig.axes[0].get_title()
    bare = SweepResults(results.path, cpu.assign(predicted_peak_mib=float("nan")), results.steps)
    for plot in (plot_memory_vs_batch, plot_memory_savings):
        with pytest.raises(SkipPlot, match="no GPU memory was measured \\(CPU trials\\) and the experiment has no "
                                           "memory-model predictions"):
            plot(bare)


@pytest.mark.slow
def test_cli_runs_in_an_interpreter_that_cannot_import_the_pipeline(experiment_full, tmp_path):
    """A fresh interpreter in which importing torch, trainable, sweep or data_prep raises loads the experiment and
    writes the report: analysis reads plain files only."""
    code = BLOCK_PIPELINE + (
        "from analysis.__main__ import main; rc = main([sys.argv[1], '--out', sys.argv[2]]); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, str(experiment_full), str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "comparison_report.md").is_file() and (tmp_path / "8_max_batch.png").is_file()
    assert "bf16_flash_compile" in run.stdout


# Installed before `analysis` is imported: any import of the pipeline (or torch) fails loudly.
BLOCK_PIPELINE = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'trainable', 'sweep', 'data_prep'):\n"
    "            raise ImportError(f'analysis must not import {name}')\n"
    "sys.meta_path.insert(0, Block())\n"
)


@pytest.mark.parametrize("make_path", [lambda tmp: tmp, lambda tmp: tmp / "missing"])
def test_not_an_experiment_is_one_line_exit_2(make_path, tmp_path, capsys):
    from analysis.__main__ import main

    assert main([str(make_path(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "analysis").exists()


@pytest.mark.slow
def test_max_batch_search_experiment(search_experiment, tmp_path):
    """Probe trials are listed (kind probe) but not compared as training runs; the report has the search's
    section with the prediction and the seeded vs unseeded cost, and plot 8 is the only plot."""
    from analysis import load
    from analysis.__main__ import main
    from analysis.search_tables import max_batch_table

    results = load(search_experiment)
    trials = by_name(results)
    assert sorted(trials.index) == sorted(PROBE_ENDINGS)
    assert (trials["kind"] == "probe").all() and len(results.probes) == len(PROBES)
    assert results.training().trials.empty
    assert main([str(search_experiment), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["8_max_batch.png"]
    text = (tmp_path / "comparison_report.txt").read_text()
    for needle in ("this experiment is a max-batch search (4 probe trials", "Max batch size that fits",
                   "Probe trials (max-batch search)", "probe_baseline_bs8", "Plots 1-7, 9 and 10 skipped",
                   "bf16_window16 (1 GB): search not finished (1 probes ran",
                   "Seeded by the memory model: 3 probes in 2 rounds; the unseeded search would have run 12 probes "
                   "in 7 rounds"):
        assert needle in text, needle
    assert "OOM trials" not in text  # a probe's OOM is the search's answer, not a failure
    rows = {r[0]: r for r in max_batch_table(results).rows}
    # technique, window, GPU limit, max batch, peak, predicted, probes/rounds, unseeded, parallelism, ...
    assert rows["baseline"][2:9] == ["1 GB", "4", "412", "5", "2/1", "7/4", "2"]
    assert rows["bf16_flash"][3] == ">=8"  # the search hit its upper bound
    assert "| baseline | - | 1 GB | 4 |" in (tmp_path / "comparison_report.md").read_text()


@pytest.mark.slow
def test_combined_experiments(experiment_full, search_experiment):
    from analysis import load, load_many

    both = load_many([experiment_full, search_experiment])
    assert len(both.trials) == len(CASES) + len(PROBES)
    assert set(both.trials["experiment"]) == {"fake_full", "fake_search"}
    assert len(both.max_batch) == 2 * len(SEARCH_RECORDS)
    assert set(both.predictions["experiment"]) == {"fake_full"}
    assert len(both.training().trials) == len(CASES)
    assert len(both.steps) == len(load(experiment_full).steps) + len(load(search_experiment).steps)
    assert by_name(both).loc["baseline_bs4", "predicted_peak_mib"] == 420.0


def test_plot_max_batch_shows_every_technique_of_combined_records():
    """Records from several experiments (each a part of the techniques, some under a 32 GB limit, some not):
    every technique with a record gets its bars, and one record per technique and limit is drawn."""
    from analysis import SweepResults, combine
    from analysis.plots import plot_max_batch

    def part(trial_id: str, records: list[dict]) -> SweepResults:
        return SweepResults(path=trial_id, trials=pd.DataFrame({"gpu_name": ["H200"], "kind": ["train"],
                                                                "trial_id": [trial_id]}),
                            steps=pd.DataFrame(), max_batch=pd.DataFrame(records))

    first = part("a", [{"label": "baseline", "max_batch_size": 156, "gpu_memory_gb": 32.0, "predicted_max_batch": 146},
                  {"label": "bf16_flash", "max_batch_size": 260, "gpu_memory_gb": 32.0},
                  {"label": "bf16_flash", "max_batch_size": 1240, "gpu_memory_gb": None, "predicted_max_batch": 1157}])
    second = part("b", [{"label": "bf16_window16", "window": 16, "max_batch_size": 1137, "gpu_memory_gb": None},
                   {"label": "bf16_flash", "max_batch_size": 260, "gpu_memory_gb": 32.0},
                   {"label": "gradcp", "max_batch_size": None, "gpu_memory_gb": None, "status": "error"}])
    name, fig = plot_max_batch(combine([first, second]))
    ax = fig.axes[0]
    assert name == "8_max_batch.png"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bf16_flash", "bf16_window16", "baseline", "gradcp"]
    assert sorted(p.get_height() for p in ax.patches) == [0.0, 156, 260, 1137, 1240]
    labels = ax.get_legend_handles_labels()[1]
    assert {"32 GB limit", "full GPU", "predicted by the memory model (when the search ran)"} <= set(labels)
    assert "error" in [t.get_text() for t in ax.texts]


@pytest.mark.slow
@pytest.mark.parametrize("limit_gb, total_mib, line", [(1.0, 1e6, True), (None, 1e6, False), (None, 1500.0, True)])
def test_memory_plot_draws_the_limit_only_when_it_matters(results, limit_gb, total_mib, line):
    """An emulated limit is always drawn; the GPU's total only when the data reaches half of it (else the
    curves would be squashed), and then the title names it."""
    from analysis import SweepResults
    from analysis.plots import plot_memory_vs_batch

    trials = results.trials.assign(gpu_memory_gb=limit_gb, gpu_total_mib=total_mib)
    _, fig = plot_memory_vs_batch(SweepResults(path=results.path, trials=trials, steps=results.steps))
    ax = fig.axes[0]
    limit_lines = [ln for ln in ax.get_lines() if "memory" in str(ln.get_label())]
    assert bool(limit_lines) == line
    assert ("MiB total" in ax.get_title()) == (not line)
    assert ax.get_ylim()[1] < 2 * trials["peak_mem_mib"].max() or line
