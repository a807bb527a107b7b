"""What an experiment directory holds beyond Tune's own files, and how its trials are named.

An experiment is a Ray Tune experiment directory `STORAGE/NAME/` written by `sweep`:

* one directory per trial (Tune's `params.json`, `result.json` with one JSON line per report, `error.txt`
  when it failed, `checkpoint_*`), named `trial_name(...)`;
* `experiment_state-*.json`: Tune's state (each trial's id, status, directory and config);
* `GRID_FILE`: the validated grid, so `--resume` rebuilds the exact param space after the driver died;
* `MAX_BATCH_FILE`: the records of a max-batch search (`MAX_BATCH_RECORD_KEYS`);
* `PREDICTIONS_FILE`: the memory model's predicted peaks for the trials, and for the seed grid on named GPUs
  (`{"budget": ..., "vocab_size": ..., "trials": [record], "seed_grid": [record + "gpu"]}`, each record's keys
  `PREDICTION_RECORD_KEYS`).

The sweep adds two keys to each trial's Tune config, stripped before the config reaches the trial (a trial
knows nothing of the grid it is in): `GRID_KEY`, the trial's name, and `KIND_KEY`, `train` or `probe` (a
short run of the max-batch search). Names are for people and directories: nothing parses them back.
"""
from __future__ import annotations

GRID_FILE = "sweep_grid.json"
MAX_BATCH_FILE = "max_batch.json"
PREDICTIONS_FILE = "predictions.json"
GRID_KEY = "trial_name"
KIND_KEY = "trial_kind"
TRIAL_KINDS = ("train", "probe")
SWEEP_KEYS = (GRID_KEY, KIND_KEY)  # in a trial's Tune config, not in its TrialConfig

# One record per searched technique in MAX_BATCH_FILE.
MAX_BATCH_RECORD_KEYS = (
    "label", "technique", "window", "max_batch_size", "peak_mem_mib", "probes", "rounds", "wall_time_s",
    "gpu_memory_gb", "status", "error", "hit_upper_bound", "granularity", "parallelism", "probe_steps",
    "start", "max_bound", "device", "seq_len", "outcomes", "seeded", "predicted_max_batch", "predicted_budget_mib",
    "unseeded_probes", "unseeded_rounds",
)

# One record per predicted point in PREDICTIONS_FILE (sweep.predict.prediction_rows_for); `seed_grid` records add
# `gpu`. The *_mib terms after `upper_bound` are the predicted peak's breakdown.
PREDICTION_RECORD_KEYS = (
    "trial", "label", "technique", "batch_size", "window", "seq_len", "vocab_size", "kernel", "predicted_peak_mib",
    "predicted_reserved_mib", "fits", "predicted_max_batch", "budget_mib", "error", "upper_bound", "phase",
    "params_mib", "grads_mib", "optimizer_states_mib", "activations_mib", "embedding_mib", "loss_head_mib",
    "autocast_copies_mib", "transient_mib", "overhead_mib",
)


def trial_name(label: str, batch_size: int, kind: str = "train", *, seq_len: int | None = None) -> str:
    """`bf16_flash_bs64`; `bf16_flash_s1024_bs64` with the seq_len (a grid of several); a max-batch probe is
    `probe_bf16_flash_bs37`."""
    if kind not in TRIAL_KINDS:
        raise ValueError(f"unknown trial kind {kind!r}; choose from {', '.join(TRIAL_KINDS)}")
    seq_part = "" if seq_len is None else f"_s{seq_len}"
    return f"{'probe_' if kind == 'probe' else ''}{label}{seq_part}_bs{batch_size}"
