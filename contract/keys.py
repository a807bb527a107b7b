"""Every key a trial reports, when it reports it, and what it means.

A trial reports through Tune (`tune.report`) once per step. The trial's *configuration* is not repeated
in its reports: Tune keeps it beside them (`params.json`, `config/...`), and `analysis` reads it from there.
Reports carry what the trial measured and what it resolved at run time (the kernel that ran, the GPU).

`when` says which reports carry a key:
* `step`: every report of a training step (and the final one);
* `fact`: every report; what the trial resolved once (the label, the kernel, the GPU);
* `eval`: reports of steps that evaluated (every `eval_interval` steps, and the last);
* `final`: the last report of a trial (its status and totals);
* `oom`: the last report of a trial that ran out of memory;
* `scout`: the one report of a max-batch search's scout probe (sweep/probe.py);
* `probe`: every report of a max-batch search's probe (sweep/probe.py).
Memory keys are NaN on CPU ("not measured"), never 0.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    name: str
    when: str  # step | fact | eval | final | oom | scout | probe
    meaning: str


_KEYS = (
    # -- every step --
    Key("step", "step", "optimizer steps taken, counted from 1 across restarts"),
    Key("loss", "step", "mean training loss of the step (nats/token)"),
    Key("lr", "step", "learning rate the step used"),
    Key("tokens_seen", "step", "training tokens consumed up to and including this step"),
    Key("step_time_s", "step", "GPU time of the step: CUDA events around forward, backward and optimizer "
                               "(host wall time on CPU); excludes reporting, evaluation and checkpoints"),
    Key("tokens_per_s", "step", "tokens of the step / step_time_s: GPU-time throughput"),
    Key("mfu", "step", "model FLOPs utilisation of the step: tokens_per_s x model_flops_per_token / peak_flops"),
    Key("mem_fwd_peak_mib", "step", "peak allocated memory during the forward pass"),
    Key("mem_bwd_peak_mib", "step", "peak allocated memory during the backward pass"),
    Key("mem_opt_peak_mib", "step", "peak allocated memory during clipping and the optimizer step"),
    Key("mem_step_peak_mib", "step", "peak allocated memory of the whole step (max of the three phases)"),
    Key("mem_allocated_mib", "step", "memory allocated by tensors when the step was queued"),
    Key("mem_reserved_mib", "step", "memory the caching allocator holds (what nvidia-smi shows, less the context)"),
    Key("oom", "step", "True only in the final report of a trial that ran out of memory"),
    Key("compiling", "step", "torch.compile worked during this step"),
    Key("warmup", "step", "left out of the steady figures: the first step of a process, and compiling steps"),
    Key("compile_time_s", "step", "summed step time of the steps during which torch.compile ran"),
    # -- facts the trial resolved (every report) --
    Key("label", "fact", "the technique's label, derived from the switches (bf16_window16)"),
    Key("family", "fact", "the label without its attention part (bf16_window16 -> bf16)"),
    Key("attention_kernel", "fact", "the attention kernel that ran: flash_attn, sdpa_flash, flex, sdpa, eager"),
    Key("dtype", "fact", "the compute dtype of matmuls: float32 or bfloat16"),
    Key("tf32", "fact", "TF32 tensor cores were allowed for fp32 matmuls"),
    Key("device", "fact", "where the trial ran: cuda or cpu"),
    Key("gpu_name", "fact", "torch.cuda.get_device_name (None on CPU)"),
    Key("gpu_total_mib", "fact", "the GPU's total memory (NaN on CPU)"),
    Key("num_params", "fact", "trainable parameters, the tied embedding counted once"),
    Key("model_flops_per_token", "fact", "training FLOPs per token the model needs (trainable.flops)"),
    Key("peak_flops", "fact", "the GPU's peak dense bf16 FLOP/s used for MFU (NaN when unknown)"),
    Key("torch_version", "fact", "torch.__version__"),
    Key("cuda_version", "fact", "torch.version.cuda (None on a CPU build)"),
    # -- evaluation --
    Key("val_loss", "eval", "mean token loss over the fixed validation rows"),
    Key("val_ppl", "eval", "exp(val_loss)"),
    # -- the last report --
    Key("final", "final", "True in the last report of a trial"),
    Key("status", "final", "ok, oom (ran out of memory: a result), or nan (the loss went NaN or infinite)"),
    Key("train_time_s", "final", "wall time of training (steps, evaluation, reporting, checkpoints; no set-up), "
                                 "summed over restarts"),
    Key("steady_tokens_per_s", "final", "GPU-time throughput over the steps not flagged warmup"),
    Key("steady_mfu", "final", "MFU of steady_tokens_per_s"),
    Key("wall_tokens_per_s", "final", "wall-clock throughput over the steps not flagged warmup: their tokens / the "
                                      "time from the end of each one's previous step to its own end on the GPU's "
                                      "clock, so every wait for the host (reporting, evaluation, checkpoints) counts"),
    Key("report_time_s", "final", "wall time spent handing reports (and checkpoints) to Tune"),
    Key("checkpoint_time_s", "final", "wall time the training loop waited for checkpoints (snapshots to host)"),
    Key("setup_time_s", "final", "wall time from entering the trial to its first step: data, model, compile set-up"),
    # where a trial's start goes: unix times (time.time(), s) of its start-up milestones, for timelines across
    # trials of a node (bench/bench_startup.py); a trial reused in a process (Tune's reuse_actors) imported nothing
    Key("worker_start_time", "final", "unix time the Tune worker that ran the trial started (Tune's `pid`)"),
    Key("server_start_time", "final", "unix time that worker's fork server started (NaN: trained in the worker)"),
    Key("process_start_time", "final", "unix time the process that trained started (a reused one: long before)"),
    Key("imports_done_time", "final", "unix time torch and the training code were imported in that process (a "
                                      "fork: in its server, before the fork)"),
    Key("trial_start_time", "final", "unix time the trial was entered (run_trial)"),
    Key("data_ready_time", "final", "unix time the dataset was opened and checked, the device and kernel resolved"),
    Key("cuda_ready_time", "final", "unix time the CUDA context was ready (NaN on CPU)"),
    Key("model_ready_time", "final", "unix time the model, optimizer (and a resumed state) were on the device"),
    Key("first_step_start_time", "final", "unix time the trial's first step was queued"),
    Key("first_step_end_time", "final", "unix time the trial's first step had finished on the device"),
    Key("trial_end_time", "final", "unix time the final report was made"),
    Key("trial_process", "final", "how the process that trained started: fork (of its Tune worker's warm server), "
                                  "spawn (a new interpreter: that server had initialised the CUDA driver) or worker "
                                  "(the Tune worker itself, or the calling process)"),
    Key("process_trials_before", "final", "trials this process ran before this one (0: a fresh process; more: "
                                          "reused, its state reset to a fresh process's first)"),
    Key("process_id", "final", "the OS pid of the process that trained (Tune's `pid` is its worker's; a max-batch "
                               "probe trains in a child of it)"),
    Key("gpu_uuid", "final", "the UUID of the GPU the trial ran on (None on CPU): trials on one GPU share it"),
    # -- the last report of an OOM trial --
    Key("oom_phase", "oom", "where memory ran out: setup, forward, backward, optimizer or eval"),
    Key("oom_message", "oom", "the first line of the allocator's error"),
    Key("oom_mem_peak_mib", "oom", "peak allocated memory of the failing phase, up to the failure"),
    # -- the one report of a max-batch scout (a probe that searches in one process; the search confirms its
    #    answer with fresh-process probes): its best sub-probe's final report plus these --
    Key("scout_max_batch", "scout", "the largest batch the scout found to fit in its process (0: none; None: "
                                    "the scout stopped on an error)"),
    Key("scout_outcomes", "scout", "the scout's sub-probes in order: [batch size, fits|oom|error, peak MiB]"),
    Key("scout_error", "scout", "why the scout stopped early (None when it found an answer)"),
)

# Where the memory goes: the peak step's allocated memory split into components, measured by the trial (an
# allocator snapshot at its peak, each live block attributed by what allocated it) and predicted by the memory
# model for the same config. Reported once, in the final report; the components sum to the peak.
MEMORY_COMPONENTS: dict[str, str] = {
    "params": "the model's parameters (fp32 master weights)",
    "grads": "parameter gradients",
    "optimizer": "AdamW's exp_avg and exp_avg_sq",
    "act_attention": "saved by, and backward temporaries of, attention: q, k, v, probabilities or logsumexp, output",
    "act_mlp": "saved by, and backward temporaries of, the MLPs: their inputs, the GELU input and output",
    "act_norm": "saved by, and backward temporaries of, the LayerNorms: inputs, mean, rstd",
    "act_residual": "the residual stream and embedding outputs kept for backward",
    "logits_loss": "the LM head and loss: logits, log-probabilities, their gradients, the head weight's bf16 copy",
    "weight_copies": "bf16 copies of the blocks' weights that autocast keeps for backward",
    "other": "everything else live at the peak: workspaces, temporaries not attributed above",
}
_BREAKDOWN = tuple(
    Key(f"{side}_{name}_mib", "final", f"{'measured' if side == 'measured' else 'predicted'} at the peak: {meaning}")
    for side in ("measured", "predicted") for name, meaning in MEMORY_COMPONENTS.items()
) + (
    Key("measured_slack_mib", "final", "allocator slack at the peak: reserved minus allocated"),
    Key("predicted_slack_mib", "final", "the memory model's reserved minus its allocated peak"),
    Key("breakdown_peak_mib", "final", "the allocated peak the measured components sum to"),
    Key("breakdown_phase", "final", "the phase of the step the peak fell in: forward, backward or optimizer"),
)
_KEYS = _KEYS + _BREAKDOWN
BREAKDOWN_KEYS = tuple(k.name for k in _BREAKDOWN)

REPORT_KEYS: dict[str, Key] = {k.name: k for k in _KEYS}
# Final statuses a trial reports, then the ones analysis derives: error (an exception), incomplete (no final report).
TRIAL_STATUSES = ("ok", "oom", "nan")
STATUSES = (*TRIAL_STATUSES, "error", "incomplete")
MEMORY_KEYS = tuple(k for k in REPORT_KEYS if k.startswith("mem_") or k == "oom_mem_peak_mib")


def keys_of(*when: str) -> tuple[str, ...]:
    """The report keys reported at these times, in contract order."""
    return tuple(k.name for k in _KEYS if k.when in when)
