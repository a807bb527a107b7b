"""The reports a trial makes, key for key as `contract.keys` defines them: per step, final, after an OOM.

Kept apart from the loop so the loop reads as training and this reads as the contract.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from contract.keys import keys_of
from contract.techniques import technique_family, technique_label

from .breakdown import not_measured
from .flops import mfu, model_flops_per_token, peak_bf16_flops
from .measure import gpu_facts
from .setup import Run, model_config

NAN = math.nan
STEP_MEMORY_KEYS = ("mem_fwd_peak_mib", "mem_bwd_peak_mib", "mem_opt_peak_mib")


@dataclass
class Position:
    """Where training stands and what it has measured so far; saved in checkpoints, summed over restarts.
    (epoch, batch) is the NEXT batch to train on."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    compile_time_s: float = 0.0  # summed step time of the steps during which torch.compile ran
    steady_tokens: int = 0  # tokens and GPU time of the steps that are not warm-up
    steady_time_s: float = 0.0
    steady_wall_s: float = 0.0  # wall time of the steady steps: end of the previous step to their end, GPU clock
    steady_wall_tokens: int = 0
    checkpoint_time_s: float = 0.0  # time the loop waited to take snapshots


def run_facts(run: Run, num_params: int) -> dict[str, Any]:
    """What the trial resolved on this machine, in every report (`fact` keys)."""
    cfg = run.cfg
    gpu = gpu_facts(run.device)
    flops = model_flops_per_token(model_config(cfg, run.data.vocab_size), cfg.window)
    return {
        "label": technique_label(cfg),
        "family": technique_family(cfg),
        "attention_kernel": run.kernel.name,
        "dtype": str(run.precision.compute_dtype).removeprefix("torch."),
        "tf32": run.precision.tf32_active(run.device.type),
        "device": run.device.type,
        **gpu,
        "num_params": num_params,
        "model_flops_per_token": flops,
        "peak_flops": peak_bf16_flops(gpu["gpu_name"], cfg.peak_flops),
        "torch_version": str(torch.__version__),  # a plain str: a TorchVersion would unpickle torch in the driver
        "cuda_version": torch.version.cuda,
    }


def step_report(step: int, loss: float, lr: float, seconds: float, tokens: int, mem: dict[str, float],
                compiling: bool, warmup: bool, pos: Position, facts: dict[str, Any]) -> dict[str, Any]:
    tokens_per_s = tokens / seconds if seconds > 0 else math.inf
    return {
        "step": step, "loss": loss, "lr": lr, "tokens_seen": step * tokens, "step_time_s": seconds,
        "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, facts["model_flops_per_token"], facts["peak_flops"]),
        **mem, "oom": False, "compiling": compiling, "warmup": warmup, "compile_time_s": pos.compile_time_s,
        **facts,
    }


def totals(pos: Position, facts: dict[str, Any], report_time_s: float, setup_time_s: float) -> dict[str, Any]:
    """The final report's totals (`final` keys except `final` and `status`)."""
    steady = pos.steady_tokens / pos.steady_time_s if pos.steady_time_s > 0 else NAN
    wall = pos.steady_wall_tokens / pos.steady_wall_s if pos.steady_wall_s > 0 else NAN
    return {"train_time_s": pos.train_time_s, "steady_tokens_per_s": steady,
            "steady_mfu": mfu(steady, facts["model_flops_per_token"], facts["peak_flops"]),
            "wall_tokens_per_s": wall, "compile_time_s": pos.compile_time_s, "report_time_s": report_time_s,
            "checkpoint_time_s": pos.checkpoint_time_s, "setup_time_s": setup_time_s,
            # where the memory goes: NaN here; the trial's BreakdownProbe (breakdown_probe.py) fills them in
            **not_measured()}


def oom_report(step: int, phase: str, message: str, pos: Position, facts: dict[str, Any],
               step_mem: dict[str, float], memory_now: dict[str, float], report_time_s: float,
               setup_time_s: float) -> dict[str, Any]:
    """The final report of a trial that ran out of memory: status oom, where, and the memory at failure."""
    mem = {k: step_mem.get(k, NAN) for k in STEP_MEMORY_KEYS}
    peak = memory_now.get("oom_mem_peak_mib", NAN)
    if phase in ("forward", "backward"):
        mem[f"mem_{'fwd' if phase == 'forward' else 'bwd'}_peak_mib"] = peak
    known = [v for v in (*mem.values(), peak) if not math.isnan(v)]
    report: dict[str, Any] = {key: NAN for key in keys_of("step", "eval")}
    report.update({
        "step": step, "tokens_seen": pos.tokens_seen, **mem, "mem_step_peak_mib": max(known) if known else NAN,
        "mem_allocated_mib": memory_now.get("mem_allocated_mib", NAN),
        "mem_reserved_mib": memory_now.get("mem_reserved_mib", NAN),
        "oom": True, "compiling": False, "warmup": False, **facts,
        **totals(pos, facts, report_time_s, setup_time_s), "final": True, "status": "oom",
        "oom_phase": phase, "oom_message": message, "oom_mem_peak_mib": peak,
    })
    return report
