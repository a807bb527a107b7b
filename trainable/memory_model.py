"""Analytic model of the peak GPU memory of one training step (forward, backward, AdamW step).

Predicts what `torch.cuda.max_memory_allocated` reports for a step of `trainable.model.GPT`
(pre-LN blocks, biased Linears, GELU MLP, learned positions, tied embeddings, no dropout), and,
separately, the allocator's reserved memory and the CUDA context that nvidia-smi adds on top.

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
                                                               + s^2 (the bool mask)
    fused kernels (flash_attn / SDPA flash / flex / SDPA): no s^2 term, a logsumexp 4 a b s.
    A sliding window changes only the FLOPs of fused kernels; eager still materialises s x s.

so fp32 = 64 sbh + 4 a s^2 b (twice the 16-bit 32 sbh + 2 a s^2 b), bf16 autocast =
36 sbh + 6 a s^2 b: linear/matmul outputs are bf16 and save bf16 input casts, but layer_norm
runs in fp32 (autocast fp32 list) on the fp32 residual, and the eager kernel's explicit fp32
softmax keeps an fp32 and a bf16 copy of the probabilities. Under bf16 the Linears also save the
bf16 casts of their weights (2 bytes per matmul weight) from forward to backward. Full checkpointing keeps only each block's input (r T per layer) and recomputes one
block at a time in backward (+ one layer's activations and backward temporaries).

Loss head (standard, `losses.standard_cross_entropy`): logits -> .float() -> log_softmax (saved,
4E) -> nll. Backward of nll + log_softmax holds the saved 4E plus two more fp32 E buffers: 12E
bytes, the usual peak at the start of backward. Fused CE (`fused_ce.py`): one chunk of C tokens
(8 C V bytes: its fp32 logits and logsumexp's temporary of the same size) plus grad_hidden (c T)
and grad_weight (4 V h); its peak is in forward, next to the final LayerNorm's fp32 output (4 T).

Persistent: params 4P, grads 4P (set to None between steps), AdamW exp_avg + exp_avg_sq 8P, and
the foreach AdamW step's temporary sqrt(exp_avg_sq) 4P. The peak is a max over phases (steady
state, optimizer states resident): forward end, backward start (loss head), backward through the
layers, and the optimizer step (params + grads + states + temporary = 20P).

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

MIB = float(1 << 20)
FP32 = 4
RESIDUAL_BYTES = FP32
INDEX_BYTES = 8  # int64 token ids / targets kept by embedding and nll_loss backward


@dataclass(frozen=True)
class MemoryConstants:
    """The model's free constants; defaults are first-principles guesses until calibrated."""

    activation_scale: Mapping[str, float] = field(default_factory=dict)  # key "fp32/eager" etc.; missing = 1.0
    overhead_mib: float = 64.0  # inside max_memory_allocated: cuBLAS workspaces, allocator rounding
    context_mib: float = 550.0  # CUDA context + loaded kernels: outside the allocator, seen by nvidia-smi
    reserved_ratio: float = 1.08  # memory_reserved / max_memory_allocated (caching-allocator slack)
    # ... where a checkpointing mode changes it (see `reserved_ratio_for`); missing modes use reserved_ratio.
    reserved_ratio_by_checkpointing: Mapping[str, float] = field(default_factory=lambda: {"full": 1.29})
    optimizer_temporaries: float = 1.0  # foreach AdamW temporaries, in fp32 copies of all params

    def scale(self, key: str) -> float:
        return float(self.activation_scale.get(key, 1.0))

    def reserved_ratio_for(self, checkpointing: str) -> float:
        """Reserved over allocated peak at the memory edge, which is what decides the largest batch.

        Measured on the H200 at the largest fitting batch: 1.01 (TF32 eager), 1.07 (bf16 eager), 1.09
        (SDPA flash and flex). Full checkpointing leaves far more slack, 1.28-1.29 at every batch from 378
        to 1651 (1.27 at 128): each block's forward runs without autograd, so its whole activation set
        (under eager attention the b x a x s x s scores) is allocated and freed block after block, and
        again during the backward's recomputation. The caching allocator keeps those segments, sized
        for one block's temporaries, and cannot carve the larger loss-head buffers (b x s x V fp32) out
        of them, so they stay reserved next to the allocated peak. Selective checkpointing keeps the
        matmul outputs and recomputes only small elementwise temporaries: not measured, the default.
        """
        return float(self.reserved_ratio_by_checkpointing.get(checkpointing, self.reserved_ratio))


DEFAULT_CONSTANTS = MemoryConstants()


@dataclass(frozen=True)
class KernelMemory:
    """What an attention kernel keeps for backward beyond q, k, v."""

    materialises_scores: bool  # keeps the (b, a, s, s) probabilities
    output_copies: int  # 1: output feeds the projection as a view; 2: the projection saves a contiguous copy
    saves_logsumexp: bool


KERNEL_MEMORY: dict[str, KernelMemory] = {
    "eager": KernelMemory(materialises_scores=True, output_copies=1, saves_logsumexp=False),
    "sdpa": KernelMemory(materialises_scores=False, output_copies=1, saves_logsumexp=True),
    "sdpa_flash": KernelMemory(materialises_scores=False, output_copies=1, saves_logsumexp=True),
    "flash_attn": KernelMemory(materialises_scores=False, output_copies=1, saves_logsumexp=True),
    # Measured on an H200 (torch 2.11, docs/results/memory_model_h200.md): flex's output feeds the projection
    # without a copy, its window peaks equal SDPA flash's to the MiB.
    "flex": KernelMemory(materialises_scores=False, output_copies=1, saves_logsumexp=True),
}
PRECISION_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2}


@dataclass(frozen=True)
class MemorySpec:
    """The shape of one training step, everything the memory model needs (validated on creation)."""

    n_layers: int
    d_model: int
    n_heads: int
    ff_dim: int
    seq_len: int
    vocab_size: int
    batch_size: int
    precision: str = "tf32"
    kernel: str = "eager"
    window: int | None = None
    checkpointing: str = "none"
    loss: str = "standard"
    device: str = "cuda"
    chunk_size: int = 8192  # fused CE tokens per chunk

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "ff_dim", "seq_len", "vocab_size", "batch_size", "chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISION_BYTES)}")
        if self.kernel not in KERNEL_MEMORY:
            raise ValueError(f"unknown attention kernel {self.kernel!r}; choose from {', '.join(KERNEL_MEMORY)}")
        if self.checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(f"unknown checkpointing {self.checkpointing!r}; choose from {', '.join(CHECKPOINTING_MODES)}")
        if self.loss not in LOSS_HEADS:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSS_HEADS)}")

    @property
    def compute_bytes(self) -> int:
        return PRECISION_BYTES[self.precision]

    @property
    def autocast(self) -> bool:
        return self.precision == "bf16"

    @property
    def activation_key(self) -> str:
        """Which calibrated activation multiplier applies: precision family / kernel / checkpointing."""
        family = "bf16" if self.autocast else "fp32"
        return f"{family}/{self.kernel}/{self.checkpointing}"

    @property
    def kernel_memory(self) -> KernelMemory:
        return KERNEL_MEMORY[self.kernel]

    def with_batch_size(self, batch_size: int) -> "MemorySpec":
        return dataclasses.replace(self, batch_size=batch_size)


CHECKPOINTING_MODES = ("none", "full")


# -- parameters --------------------------------------------------------------------------------


def layer_matmul_params(spec: MemorySpec) -> int:
    """Weights of the four Linears of one block: their bf16 casts are saved for backward.

    (The biases' casts live only in autocast's cache, which is cleared when forward ends.)
    """
    h, f = spec.d_model, spec.ff_dim
    return 4 * h * h + 2 * h * f


def num_params(spec: MemorySpec) -> int:
    """Parameter count of trainable.model.GPT (tied embedding counted once)."""
    h, f = spec.d_model, spec.ff_dim
    per_layer = layer_matmul_params(spec) + (3 * h + h + f + h) + 2 * 2 * h  # + biases, two LayerNorms
    return spec.vocab_size * h + spec.seq_len * h + spec.n_layers * per_layer + 2 * h


def autocast_weight_copy_bytes(spec: MemorySpec, *, blocks: bool) -> float:
    """bf16 copies of matmul weights saved for backward (autocast casts them once per forward).

    The fused loss casts the head weight itself (a forward temporary, see `fused_head`).
    """
    if not spec.autocast:
        return 0.0
    block_params = spec.n_layers * layer_matmul_params(spec) if blocks else 0
    head_params = spec.vocab_size * spec.d_model if spec.loss == "standard" else 0
    return 2.0 * (block_params + head_params)


# -- activations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerMemory:
    saved: float  # bytes kept from forward to backward by one block (no checkpointing)
    backward_temporaries: float  # largest extra bytes while that block runs backward


def layer_memory(spec: MemorySpec) -> LayerMemory:
    """One transformer block's saved activations and backward temporaries (see module docstring)."""
    b, s, h, a, f = spec.batch_size, spec.seq_len, spec.d_model, spec.n_heads, spec.ff_dim
    c, r, km = spec.compute_bytes, RESIDUAL_BYTES, spec.kernel_memory
    tokens, t = b * s, b * s * h
    saved = 2 * r * t + 2 * 2 * FP32 * tokens  # two LayerNorm inputs (residual) + mean/rstd
    saved += 3 * c * t  # inputs of qkv, fc and the attention projection's cast/view chain
    saved += 3 * c * t  # q, k, v
    saved += (km.output_copies - 1) * c * t  # an extra contiguous copy of the attention output
    saved += 2 * c * tokens * f  # GELU input and output (fc output, mlp-proj input)
    scores = a * s * s * b
    if km.materialises_scores:
        saved += FP32 * scores + (c * scores if c != FP32 else 0) + s * s  # fp32 probs, bf16 copy, mask
    if km.saves_logsumexp:
        saved += FP32 * a * tokens
    mlp_temporaries = 2 * c * tokens * f
    attn_temporaries = 2 * FP32 * scores if km.materialises_scores else 3 * c * t + FP32 * t
    return LayerMemory(saved=float(saved), backward_temporaries=float(max(mlp_temporaries, attn_temporaries)))


def embedding_saved_bytes(spec: MemorySpec) -> float:
    """Token ids kept by the two embedding lookups."""
    return float(INDEX_BYTES * (spec.batch_size * spec.seq_len + spec.seq_len))


# -- loss heads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadMemory:
    saved: float  # bytes kept from forward to backward (final LN, head input, log-probs / stored grads)
    forward_temporaries: float  # extra bytes at the head's forward peak
    backward_temporaries: float  # extra bytes at the head's backward peak


def _final_norm_bytes(spec: MemorySpec) -> float:
    tokens = spec.batch_size * spec.seq_len
    return RESIDUAL_BYTES * tokens * spec.d_model + 2 * FP32 * tokens


def standard_head(spec: MemorySpec) -> HeadMemory:
    """F.linear -> .float() -> cross_entropy: an fp32 log-softmax saved, 12E bytes in backward."""
    tokens = spec.batch_size * spec.seq_len
    logits, c = tokens * spec.vocab_size, spec.compute_bytes
    saved = _final_norm_bytes(spec) + c * tokens * spec.d_model + FP32 * logits + INDEX_BYTES * tokens
    # logits (+ their fp32 copy), and the final LayerNorm's fp32 output the head reads
    forward_extra = c * logits + (FP32 * logits if c != FP32 else 0) + RESIDUAL_BYTES * tokens * spec.d_model
    backward_extra = 2 * FP32 * logits  # grad of log-probs, grad of logits
    return HeadMemory(saved=float(saved), forward_temporaries=float(forward_extra),
                      backward_temporaries=float(backward_extra))


def fused_head(spec: MemorySpec) -> HeadMemory:
    """fused_linear_cross_entropy: one chunk of logits; grads stored in forward, scaled in backward."""
    tokens = spec.batch_size * spec.seq_len
    c, h, v = spec.compute_bytes, spec.d_model, spec.vocab_size
    chunk_logits = min(spec.chunk_size, tokens) * v
    grad_hidden, grad_weight = c * tokens * h, FP32 * v * h
    saved = _final_norm_bytes(spec) + grad_hidden + grad_weight
    weight_copy = c * v * h if c != FP32 else 0
    # The chunk's fp32 logits and logsumexp's exp(logits - max) temporary of the same size (under bf16 the bf16
    # matmul output, 2 CV, is freed by then); the final LayerNorm's fp32 output stays alive while chunks run.
    chunk = 2 * FP32 * chunk_logits
    forward_extra = weight_copy + chunk + c * v * h + c * min(spec.chunk_size, tokens) * h + RESIDUAL_BYTES * tokens * h
    backward_extra = grad_weight + grad_hidden + (FP32 * tokens * h if c != FP32 else 0)
    return HeadMemory(saved=float(saved), forward_temporaries=float(forward_extra),
                      backward_temporaries=float(backward_extra))


LOSS_HEADS: dict[str, Callable[[MemorySpec], HeadMemory]] = {
    "standard": standard_head,
    "fused_ce": fused_head,
}


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

    @property
    def saved_for_backward_mib(self) -> float:
        """Everything autograd keeps from forward to backward (what saved-tensor hooks can see)."""
        return self.activations_mib + self.embedding_mib + self.loss_head_mib + self.autocast_copies_mib


def _phases(spec: MemorySpec, constants: MemoryConstants) -> tuple[dict[str, float], dict[str, float], dict]:
    """Bytes per phase, plus the transient bytes of each phase and the static terms."""
    p = num_params(spec)
    params, grads, states = FP32 * p, FP32 * p, 2 * FP32 * p
    layer = layer_memory(spec)
    head = LOSS_HEADS[spec.loss](spec)
    scale = constants.scale(spec.activation_key)
    checkpointed = spec.checkpointing == "full"
    tokens_hidden = spec.batch_size * spec.seq_len * spec.d_model
    per_layer_kept = RESIDUAL_BYTES * tokens_hidden if checkpointed else layer.saved
    activations = scale * spec.n_layers * per_layer_kept
    embedding = embedding_saved_bytes(spec)
    batch = 2 * INDEX_BYTES * spec.batch_size * spec.seq_len  # inputs and targets on the device
    copies_fwd = autocast_weight_copy_bytes(spec, blocks=True)
    copies_bwd = autocast_weight_copy_bytes(spec, blocks=not checkpointed)
    resident = params + states + batch
    kept = activations + embedding + head.saved
    recompute = scale * layer.saved if checkpointed else 0.0
    residual_grads = 2 * FP32 * tokens_hidden
    head_weight_grad = FP32 * spec.vocab_size * spec.d_model
    transients = {
        "forward": head.forward_temporaries,
        "backward_start": head.backward_temporaries,
        "backward_layers": head_weight_grad + residual_grads + recompute + scale * layer.backward_temporaries,
        "optimizer_step": constants.optimizer_temporaries * FP32 * p,
    }
    phases = {
        "forward": resident + copies_fwd + kept + transients["forward"],
        "backward_start": resident + copies_bwd + kept + transients["backward_start"],
        "backward_layers": resident + copies_bwd + kept - head.saved + transients["backward_layers"],
        "optimizer_step": params + grads + states + batch + transients["optimizer_step"],
    }
    static = dict(params=params, grads=grads, states=states, activations=activations, layer=layer.saved,
                  embedding=embedding, head=head.saved, copies=copies_bwd)
    return phases, transients, static


def predict_peak_memory(cfg: Any = None, *, constants: MemoryConstants = DEFAULT_CONSTANTS,
                        **overrides: Any) -> MemoryBreakdown:
    """Peak allocated memory of a steady-state training step for `cfg` (TrialConfig, MemorySpec, dict or kwargs)."""
    spec = to_spec(cfg, **overrides)
    phases, transients, static = _phases(spec, constants)
    phase = max(phases, key=phases.get)
    overhead = constants.overhead_mib
    peak = phases[phase] / MIB + overhead
    return MemoryBreakdown(
        params_mib=static["params"] / MIB,
        grads_mib=static["grads"] / MIB,
        optimizer_states_mib=static["states"] / MIB,
        activations_mib=static["activations"] / MIB,
        activations_per_layer_mib=static["layer"] / MIB,
        embedding_mib=static["embedding"] / MIB,
        loss_head_mib=static["head"] / MIB,
        autocast_copies_mib=static["copies"] / MIB,
        transient_mib=transients[phase] / MIB,
        overhead_mib=overhead,
        phases_mib={name: value / MIB + overhead for name, value in phases.items()},
        peak_mib=peak,
        phase=phase,
        reserved_mib=peak * constants.reserved_ratio_for(spec.checkpointing),
        context_mib=constants.context_mib,
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


# -- calibration -------------------------------------------------------------------------------


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
    for name in ("checkpointing", "loss", "precision"):
        if values.get(name) is None:
            values.pop(name, None)
    return MemorySpec(**{k: v for k, v in values.items() if k in _SPEC_FIELDS})


__all__ = [
    "MemoryConstants", "DEFAULT_CONSTANTS", "MemorySpec", "MemoryBreakdown", "KernelMemory", "KERNEL_MEMORY",
    "LOSS_HEADS", "predict_peak_memory", "predict_max_batch_size", "calibrate", "to_spec", "num_params",
    "layer_memory",
]
