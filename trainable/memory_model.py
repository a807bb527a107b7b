"""Analytic model of the peak GPU memory of one training step (forward, backward, AdamW step).

Predicts what `torch.cuda.max_memory_allocated` reports for a step of `trainable.model.GPT`
(pre-LN blocks, biased Linears, GELU MLP, learned positions, tied or untied LM head, no dropout), where that
memory goes (`MemoryBreakdown.components_mib`, the components of `contract.keys.MEMORY_COMPONENTS`, for every
phase), and, separately, the allocator's reserved memory and the CUDA context that nvidia-smi adds on top.
The spec is `memory_spec.MemorySpec`; the terms, each split by component, are in `memory_terms.py`.

Notation: b batch, s seq_len, h d_model, a n_heads, f ff_dim, V vocab, L n_layers, P parameters,
T = b*s*h, E = b*s*V (logits), c = bytes of the compute dtype (4 fp32/tf32, 2 bf16 autocast),
r = 4 (the residual stream stays fp32 under autocast: fp32 embeddings + bf16 branch = fp32).

Activations per layer. Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198), eq. 1: s*b*h*(34 + 5*a*s/h) bytes for a 16-bit layer with
materialised attention and dropout. Without dropout (this model has none) their accounting gives
32 sbh + 2 a s^2 b. Re-deriving it for this model and PyTorch's saved tensors:

    LN inputs (residual)    2 r T          LN mean/rstd        4 * 4 b s (fp32)
    qkv / fc / proj inputs  3 c T          q, k, v             3 c T (copies for eager matmul,
    attention output        n_out c T        views of the qkv buffer for fused kernels)
    GELU input and output   2 c b s f      scores (eager)      4 a s^2 b (fp32 softmax output)
                                                               + 2 a s^2 b (its bf16 copy, bf16 only)
                                                               + s^2 (the bool ~mask; the cached mask, s^2 once)
    fused kernels (flash_attn / SDPA flash / flex / SDPA): no s^2 term, a logsumexp 4 a b s.
    A sliding window changes only the FLOPs of fused kernels; eager still materialises s x s.

so fp32 = 64 sbh + 4 a s^2 b (twice the 16-bit 32 sbh + 2 a s^2 b), bf16 autocast =
36 sbh + 6 a s^2 b: linear/matmul outputs are bf16 and save bf16 input casts, but layer_norm
runs in fp32 (autocast fp32 list) on the fp32 residual, and the eager kernel's explicit fp32
softmax keeps an fp32 and a bf16 copy of the probabilities. Under bf16 the Linears also save the
bf16 casts of their weights (2 bytes per matmul weight) from forward to backward. Full checkpointing keeps only
each block's input (r T per layer) and recomputes one block at a time in backward (+ one layer's activations and
backward temporaries). Backward through eager attention holds the fp32 gradient of the probabilities and the
softmax's fp32 input gradient next to what the layer keeps, less the bf16 probabilities already released under
bf16: 8 a s^2 b (fp32) or 6 a s^2 b (bf16), which is the step's peak at long sequences.

Loss head (standard, `losses.standard_cross_entropy`): logits -> .float() -> log_softmax (saved,
4E) -> nll. Backward of nll + log_softmax holds the saved 4E plus two more fp32 E buffers: 12E
bytes, the usual peak at the start of backward. With `loss_precision="compute"` (`losses.compute_dtype_
cross_entropy`) the log-probabilities and both gradients are in the compute dtype: 6E under bf16. Fused CE
(`fused_ce.py`): one chunk of C tokens (8 C V bytes: its fp32 logits and logsumexp's temporary of the same size)
plus grad_hidden (c T) and grad_weight (4 V h); its peak is in forward, next to the final LayerNorm's fp32
output (4 T).

Persistent: params 4P, grads 4P (set to None between steps), AdamW exp_avg + exp_avg_sq 8P, and
the foreach AdamW step's temporary sqrt(exp_avg_sq) 4P. An untied head adds V h to P (so 16 V h bytes of
params, grads and states; its bf16 copy and its gradient in backward are the tied head's). The peak is a max
over phases (steady state, optimizer states resident): forward end, backward start (loss head), backward
through the layers, and the optimizer step (params + grads + states + temporary = 20P).

Not modelled: torch.compile (the `compile` switch). Inductor fuses elementwise chains and lets its
partitioner recompute cheap ops instead of saving them, which depends on the graph it builds; a
compiled config is predicted as its eager step, an upper bound (measured on an H200: -42% at
bf16 + flash, batch 128). `sweep.predict` says so next to such rows.

Free constants (fit them on the GPU with `calibrate`) live in `MemoryConstants`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from contract.keys import MEMORY_COMPONENTS

from .memory_spec import (  # noqa: F401 - re-exported: the model's public names
    CHECKPOINTING_MODES, FP32, INDEX_BYTES, KERNEL_MEMORY, MIB, PRECISION_BYTES, RESIDUAL_BYTES, KernelMemory,
    MemorySpec,
)
from .memory_terms import (  # noqa: F401 - re-exported
    LOSS_HEADS, HeadMemory, LayerMemory, Parts, autocast_weight_copy_bytes, autocast_weight_copy_parts,
    embedding_saved_parts,
    layer_matmul_params, layer_memory, mask_cache_bytes, num_params, plus,
)


@dataclass(frozen=True)
class MemoryConstants:
    """The model's free constants; defaults are first-principles guesses until calibrated."""

    activation_scale: Mapping[str, float] = field(default_factory=dict)  # key "fp32/eager" etc.; missing = 1.0
    overhead_mib: float = 64.0  # inside max_memory_allocated: cuBLAS workspaces, allocator rounding
    context_mib: float = 550.0  # CUDA context + loaded kernels: outside the allocator, seen by nvidia-smi
    reserved_ratio: float = 1.08  # memory_reserved / max_memory_allocated (caching-allocator slack)
    # ... where a checkpointing mode changes it (see `reserved_ratio_for`); missing modes use reserved_ratio.
    reserved_ratio_by_checkpointing: Mapping[str, float] = field(default_factory=lambda: {"full": 1.289})
    # ... and where the kernel changes it, by "<fp32|bf16>/<kernel>" (missing: reserved_ratio); see below.
    reserved_ratio_by_kernel: Mapping[str, float] = field(default_factory=lambda: {
        "fp32/eager": 1.017, "bf16/eager": 1.086, "bf16/sdpa_flash": 1.046, "bf16/flash_attn": 1.046,
        "bf16/flex": 1.092})
    optimizer_temporaries: float = 1.0  # foreach AdamW temporaries, in fp32 copies of all params

    def scale(self, key: str) -> float:
        return float(self.activation_scale.get(key, 1.0))

    def reserved_ratio_for(self, checkpointing: str, kernel_key: str | None = None) -> float:
        """Reserved over allocated peak at the memory edge, which is what decides the largest batch.

        Fitted to the H200's max batches (docs/results/max_batch_h200.md, with the 32 GB cap and without) as
        the ratio the predicted max batch needs against the budget `sweep.predict` computes; each value is the
        middle of what the two measurements allow. TF32 eager 1.009-1.015 (cap) / 1.024-1.025 (whole GPU);
        bf16 eager 1.093-1.100 / 1.073-1.074; flex 1.085-1.089 / 1.098-1.099, all within 1.2% of the measured
        max batch. SDPA flash is the exception: 1.085-1.089 with the cap but 1.007-1.008 on the whole GPU,
        where from batch ~1190 the allocator releases its cached blocks and packs the peak with 0.3 GiB to
        spare, while flex, with the same allocated peak, keeps 21 GiB fragmented (its 1138 fails to allocate
        21.7 GiB with 11.9 GiB free): no one constant serves both, 1.046 misses each by ~3.9%. The
        max-batch search does not depend on it: its scout starts there and fresh probes prove the answer.
        Full checkpointing leaves far more slack, 1.28-1.30 at every batch from 378
        to 1651 (1.27 at 128): each block's forward runs without autograd, so its whole activation set
        (under eager attention the b x a x s x s scores) is allocated and freed block after block, and
        again during the backward's recomputation. The caching allocator keeps those segments, sized
        for one block's temporaries, and cannot carve the larger loss-head buffers (b x s x V fp32) out
        of them, so they stay reserved next to the allocated peak. Selective checkpointing keeps the
        matmul outputs and recomputes only small elementwise temporaries: not measured, the default.
        """
        if checkpointing in self.reserved_ratio_by_checkpointing:
            return float(self.reserved_ratio_by_checkpointing[checkpointing])
        return float(self.reserved_ratio_by_kernel.get(kernel_key or "", self.reserved_ratio))


DEFAULT_CONSTANTS = MemoryConstants()


# -- the step ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted memory of one training step, in MiB. `peak_mib` predicts max_memory_allocated."""

    params_mib: float
    grads_mib: float
    optimizer_states_mib: float
    activations_mib: float  # all blocks, kept forward -> backward (scaled by the calibrated multiplier)
    activations_per_layer_mib: float  # one block without checkpointing (unscaled)
    embedding_mib: float
    loss_head_mib: float  # final LN + head kept forward -> backward
    autocast_copies_mib: float  # bf16 weight copies held forward -> backward
    transient_mib: float  # temporaries at the peak phase
    overhead_mib: float
    phases_mib: dict[str, float]
    peak_mib: float
    phase: str
    reserved_mib: float  # predicted torch.cuda.memory_reserved at the peak
    context_mib: float  # CUDA context outside the allocator (nvidia-smi shows reserved + context)
    components_mib: dict[str, float]  # the peak by MEMORY_COMPONENTS (overhead in `other`); sums to peak_mib
    phase_components_mib: dict[str, dict[str, float]]  # the same for every phase; each sums to phases_mib

    @property
    def saved_for_backward_mib(self) -> float:
        """Everything autograd keeps from forward to backward (what saved-tensor hooks can see)."""
        return self.activations_mib + self.embedding_mib + self.loss_head_mib + self.autocast_copies_mib

    @property
    def slack_mib(self) -> float:
        """Predicted allocator slack at the peak: reserved minus allocated."""
        return self.reserved_mib - self.peak_mib


def _phase_parts(spec: MemorySpec, constants: MemoryConstants) -> tuple[dict[str, Parts], dict[str, Parts], dict]:
    """Bytes per phase by component, the transient bytes of each phase, and the static terms."""
    p = num_params(spec)
    params, grads, states = Parts(params=FP32 * p), Parts(grads=FP32 * p), Parts(optimizer=2 * FP32 * p)
    layer = layer_memory(spec)
    head = LOSS_HEADS[spec.loss](spec)
    scale = constants.scale(spec.activation_key)
    checkpointed = spec.checkpointing == "full"
    tokens_hidden = spec.tokens * spec.d_model
    per_layer_kept = Parts(act_residual=RESIDUAL_BYTES * tokens_hidden) if checkpointed else layer.saved_parts
    activations = (scale * spec.n_layers) * per_layer_kept
    embedding = embedding_saved_parts(spec)
    batch = Parts(other=2 * INDEX_BYTES * spec.tokens + mask_cache_bytes(spec))  # inputs, targets, cached mask
    copies_fwd = autocast_weight_copy_parts(spec, blocks=True)
    copies_bwd = autocast_weight_copy_parts(spec, blocks=not checkpointed)
    resident = params + states + batch
    kept = activations + embedding + head.saved_parts
    # A recomputed block saves its activations again, except its first LayerNorm's input: that is the block's
    # input, which checkpointing kept (counted in `activations`), the same tensor rather than a copy.
    block_input = Parts(act_residual=RESIDUAL_BYTES * tokens_hidden)
    recompute = scale * (layer.saved_parts - block_input) if checkpointed else Parts()
    transients = {
        "forward": head.forward_parts,
        "backward_start": head.backward_parts,
        "backward_layers": plus((Parts(grads=FP32 * spec.vocab_size * spec.d_model),  # the head weight's grad
                                 Parts(act_residual=2 * FP32 * tokens_hidden),  # the residual stream's gradient
                                 recompute, scale * layer.backward_parts)),
        "optimizer_step": Parts(optimizer=constants.optimizer_temporaries * FP32 * p),
    }
    phases = {
        "forward": resident + copies_fwd + kept + transients["forward"],
        "backward_start": resident + copies_bwd + kept + transients["backward_start"],
        "backward_layers": resident + copies_bwd + kept - head.saved_parts + transients["backward_layers"],
        "optimizer_step": params + grads + states + batch + transients["optimizer_step"],
    }
    static = dict(params=params.total, grads=grads.total, states=states.total, activations=activations.total,
                  layer=layer.saved, embedding=embedding.total, head=head.saved, copies=copies_bwd.total)
    return phases, transients, static


def _phases(spec: MemorySpec, constants: MemoryConstants) -> tuple[dict[str, float], dict[str, float], dict]:
    """Bytes per phase, plus the transient bytes of each phase and the static terms."""
    phases, transients, static = _phase_parts(spec, constants)
    return ({k: v.total for k, v in phases.items()}, {k: v.total for k, v in transients.items()}, static)


def _components_mib(parts: Parts, overhead_mib: float) -> dict[str, float]:
    out = {c: parts.get(c, 0.0) / MIB for c in MEMORY_COMPONENTS}
    out["other"] += overhead_mib
    return out


def predict_peak_memory(cfg: Any = None, *, constants: MemoryConstants = DEFAULT_CONSTANTS,
                        **overrides: Any) -> MemoryBreakdown:
    """Peak allocated memory of a steady-state training step for `cfg` (TrialConfig, MemorySpec, dict or kwargs)."""
    spec = to_spec(cfg, **overrides)
    parts, transient_parts, static = _phase_parts(spec, constants)
    phases = {name: value.total for name, value in parts.items()}
    phase = max(phases, key=phases.get)
    overhead = constants.overhead_mib
    peak = phases[phase] / MIB + overhead
    by_phase = {name: _components_mib(value, overhead) for name, value in parts.items()}
    return MemoryBreakdown(
        params_mib=static["params"] / MIB,
        grads_mib=static["grads"] / MIB,
        optimizer_states_mib=static["states"] / MIB,
        activations_mib=static["activations"] / MIB,
        activations_per_layer_mib=static["layer"] / MIB,
        embedding_mib=static["embedding"] / MIB,
        loss_head_mib=static["head"] / MIB,
        autocast_copies_mib=static["copies"] / MIB,
        transient_mib=transient_parts[phase].total / MIB,
        overhead_mib=overhead,
        phases_mib={name: value / MIB + overhead for name, value in phases.items()},
        peak_mib=peak,
        phase=phase,
        reserved_mib=peak * constants.reserved_ratio_for(spec.checkpointing,
                                                         f"{'bf16' if spec.autocast else 'fp32'}/{spec.kernel}"),
        context_mib=constants.context_mib,
        components_mib=by_phase[phase],
        phase_components_mib=by_phase,
    )


def predict_max_batch_size(cfg: Any = None, budget_mib: float = 0.0, *,
                           constants: MemoryConstants = DEFAULT_CONSTANTS, limit: int = 1 << 20,
                           footprint: Callable[[MemoryBreakdown], float] = lambda b: b.peak_mib,
                           **overrides: Any) -> int:
    """Largest batch size whose predicted `footprint` (default: the peak) fits `budget_mib`; 0 if none does.

    The footprint grows with the batch size, so galloping + bisection is exact.
    """
    spec = to_spec(cfg, **overrides)

    def fits(b: int) -> bool:
        return footprint(predict_peak_memory(spec.with_batch_size(b), constants=constants)) <= budget_mib

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # invariant: fits(low), not fits(high) (or high beyond limit)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def calibrate(measurements: Iterable[tuple[Any, float]], *, constants: MemoryConstants = DEFAULT_CONSTANTS,
              iterations: int = 5) -> MemoryConstants:
    """Fit `overhead_mib` and one activation multiplier per activation key by least squares.

    `measurements`: (config, measured max_memory_allocated in MiB) pairs. A measurement whose
    predicted peak phase involves activations contributes `measured = rest + scale_key * act + overhead`;
    an optimizer-step peak contributes to the overhead only. The peak phase depends on the constants,
    so the fit is repeated a few times (a fixed point in practice after two).
    """
    import numpy as np

    rows = [(to_spec(cfg), float(mib)) for cfg, mib in measurements]
    if not rows:
        raise ValueError("calibrate needs at least one (config, peak_mib) measurement")
    keys = sorted({spec.activation_key for spec, _ in rows})
    for _ in range(iterations):
        design, target = [], []
        for spec, measured in rows:
            unit = dataclasses.replace(constants, activation_scale={**constants.activation_scale,
                                                                    spec.activation_key: 1.0})
            zero = dataclasses.replace(constants, activation_scale={**constants.activation_scale,
                                                                    spec.activation_key: 0.0})
            phase = predict_peak_memory(spec, constants=constants).phase
            with_act = _phases(spec, unit)[0][phase] / MIB
            without = _phases(spec, zero)[0][phase] / MIB
            x = [1.0] + [0.0] * len(keys)
            x[1 + keys.index(spec.activation_key)] = with_act - without
            design.append(x)
            target.append(measured - without)
        a, y = np.asarray(design), np.asarray(target)
        active = np.abs(a).sum(axis=0) > 0
        solution = np.zeros(a.shape[1])
        solution[active] = np.linalg.lstsq(a[:, active], y, rcond=None)[0]
        scales = dict(constants.activation_scale)
        for i, key in enumerate(keys):
            if active[1 + i]:
                scales[key] = float(solution[1 + i])
        constants = dataclasses.replace(constants, overhead_mib=float(solution[0]), activation_scale=scales)
    return constants


# -- config adapters ---------------------------------------------------------------------------


def resolve_kernel(attention: str, precision: str, device: str, requested: str = "auto") -> str:
    """The kernel `trainable.attention.select_kernel` would run for these switches on `device`."""
    if requested and requested != "auto":
        return requested
    from .kernels import select_kernel_name

    return select_kernel_name(attention, precision, device, requested="auto")


_SPEC_FIELDS = {f.name for f in dataclasses.fields(MemorySpec)}


def to_spec(cfg: Any = None, **overrides: Any) -> MemorySpec:
    """A MemorySpec from a MemorySpec, a TrialConfig(-like object), a dict, and/or keyword args.

    TrialConfig's `attention` + `kernel` ("auto") are resolved to the kernel that would run on
    `device` (default cuda); `attention_kernel` (a run fact) is accepted as the kernel too.
    """
    if isinstance(cfg, MemorySpec) and not overrides:
        return cfg
    if cfg is None:
        values: dict[str, Any] = {}
    elif isinstance(cfg, Mapping):
        values = dict(cfg)
    elif dataclasses.is_dataclass(cfg):
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    else:
        values = dict(vars(cfg))
    values.update(overrides)
    device = values.get("device") or "cuda"
    values["device"] = "cuda" if device == "auto" else device
    requested = values.pop("attention_kernel", None) or values.get("kernel") or "auto"
    attention = values.pop("attention", None) or "standard"
    if requested == "auto" or requested not in KERNEL_MEMORY:
        requested = resolve_kernel(attention, values.get("precision") or "tf32", values["device"], "auto")
    values["kernel"] = requested
    if values.get("vocab_size") is None:
        raise ValueError("vocab_size is required (TrialConfig leaves it to the dataset: pass vocab_size=...)")
    for name in ("checkpointing", "loss", "precision", "loss_precision", "tie_embeddings"):
        if values.get(name) is None:
            values.pop(name, None)
    return MemorySpec(**{k: v for k, v in values.items() if k in _SPEC_FIELDS})


__all__ = [
    "MemoryConstants", "DEFAULT_CONSTANTS", "MemorySpec", "MemoryBreakdown", "KernelMemory", "KERNEL_MEMORY",
    "LOSS_HEADS", "predict_peak_memory", "predict_max_batch_size", "calibrate", "to_spec", "num_params",
    "layer_memory", "Parts",
]
