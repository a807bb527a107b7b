"""Plain helpers the CPU trial tests share (a module, not conftest fixtures, so tests import them by name):
`tiny` builds the tiny CPU TrialConfig every one of them starts from, `run` runs it collecting its reports."""
from __future__ import annotations

from trainable import TrialConfig, run_trial

# test_trial.py's tiny trial; other files pass where theirs differs as keywords.
TINY = dict(device="cpu", n_layers=2, d_model=32, n_heads=4, ff_dim=64, seq_len=64, batch_size=4, max_steps=6,
            warmup_steps=2, eval_interval=3, eval_batches=2, eval_batch_size=4, lr=3e-3, seed=0)


def tiny(data, **overrides) -> TrialConfig:
    """The tiny CPU trial on the prepared dataset `data`, with `overrides` (any TrialConfig field)."""
    return TrialConfig.from_dict({"data_dir": str(data), **TINY, **overrides})


def run(cfg: TrialConfig, **kw) -> tuple[list[dict], dict]:
    """Run the trial in this process: (every report, the final one). `kw` goes to run_trial."""
    reports: list[dict] = []
    final = run_trial(cfg, reports.append, **kw)
    return reports, final


def losses(reports: list[dict]) -> list[float]:
    return [r["loss"] for r in reports]


def uninterrupted_losses(trial_dir) -> list[float]:
    """The losses of a Tune trial's own config (its params.json: grid overrides included, the sweep's keys
    dropped) run in this process with one thread, as in a 1-CPU Ray worker, and without a kill."""
    import json
    from pathlib import Path

    import torch

    from contract.experiment import SWEEP_KEYS

    params = json.loads((Path(trial_dir) / "params.json").read_text())
    cfg = TrialConfig.from_dict({k: v for k, v in params.items() if k not in SWEEP_KEYS})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reports, _ = run(cfg)
    finally:
        torch.set_num_threads(threads)
    return losses(reports)
