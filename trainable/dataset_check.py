"""Does a prepared dataset fit a set of trial configurations? One check, used by the trial and by the sweep.

Torch-free, so the sweep's driver runs it over a whole grid before Ray starts (hashing the shards once),
and a trial runs it again on its own node (sizes only) before any GPU work.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError


def open_checked(data_dir: str, verify: str = "size"):
    """The dataset at `data_dir` (`data_prep.open_dataset`); ConfigError with one line when it is not usable."""
    from data_prep import DataPrepError, open_dataset

    if not Path(data_dir).is_dir():
        raise ConfigError(f"data_dir {data_dir} does not exist: prepare one with `python -m data_prep prepare`")
    try:
        return open_dataset(data_dir, verify=verify)
    except DataPrepError as exc:
        raise ConfigError(f"data_dir {data_dir}: {exc}") from None


def check_fits(dataset, configs: Iterable, where: str) -> None:
    """Every config (a TrialConfig or its dict) fits the dataset: vocabulary, row length, training rows.

    `where` begins the message (`data_dir DIR`, `--data DIR`): the one check, worded for its caller."""
    configs = [c if isinstance(c, dict) else c.to_dict() for c in configs]
    rows = dataset.split("train").num_rows
    for cfg in configs:
        vocab = cfg.get("vocab_size")
        if vocab is not None and vocab != dataset.vocab_size:
            raise ConfigError(f"{where}: vocab_size {vocab} does not match the dataset's {dataset.vocab_size}; "
                              "leave vocab_size unset to use the dataset's")
    longest = max(cfg["seq_len"] for cfg in configs)
    if longest > dataset.seq_len:
        raise ConfigError(f"{where}: seq_len {longest} is longer than the dataset's rows ({dataset.seq_len} tokens):"
                          f" prepare it with --seq-len {longest} or use --seq-len {dataset.seq_len} or less")
    largest = max(cfg["batch_size"] for cfg in configs)
    if largest > rows:
        raise ConfigError(f"{where}: batch size {largest} is larger than the train split ({rows} rows)")
