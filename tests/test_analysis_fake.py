"""The fake experiments the analysis tests read (no tests here): real Ray Tune experiments of a small function
trainable that reports on the contract. Its Tune config holds TrialConfig switches plus the sweep's GRID_KEY and
KIND_KEY, and its reports carry exactly the keys of `contract.keys` (`keys_of`), like `trainable.reports` builds
them. Its trials end every way a trial can: ok, oom (final OOM report), nan (the loss went NaN), error (an
exception: Tune ERROR), incomplete (stopped before its final report), and one is restarted from a checkpoint (its
result.json re-reports steps). A second experiment is a max-batch search (probe trials + max_batch.json) as
`sweep.max_batch` writes it. Each is built once per session (`built_once`); the fixtures that build and load them
(`experiment`, `experiment_full`, `search_experiment`, `results`, `full`) are in tests/conftest.py."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from contract.experiment import GRID_KEY, KIND_KEY, MAX_BATCH_RECORD_KEYS, trial_name
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


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(root)` the experiment `root/name` once per session, however many test modules ask for it."""
    root = tmp_path_factory.getbasetemp() / "analysis_experiments"
    done = root / f"{name}.done"
    if not done.exists():
        root.mkdir(exist_ok=True)
        build(root)
        done.touch()
    return root / name


def by_name(results) -> pd.DataFrame:
    return results.trials.set_index("name")


def labelled(switches: dict) -> str:
    return config_of(switches)[GRID_KEY]


# Installed before `analysis` is imported: any import of the pipeline (or torch) fails loudly.
BLOCK_PIPELINE = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'trainable', 'sweep', 'data_prep'):\n"
    "            raise ImportError(f'analysis must not import {name}')\n"
    "sys.meta_path.insert(0, Block())\n"
)
