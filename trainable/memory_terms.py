"""The memory model's terms, each split into where the memory goes (`contract.keys.MEMORY_COMPONENTS`).

Every term is a `Parts` (component -> bytes) and every total is the sum of its parts, so the predicted
breakdown of a step cannot disagree with its predicted peak. A tensor is counted under the component of the code
that allocates it, which is how the trial's measured breakdown (`trainable.breakdown`) attributes a live block:

* the residual stream (every LayerNorm input, the embedding sum) is `act_residual`, wherever it is saved;
* a LayerNorm's mean and rstd are `act_norm`, and so is its output when the next Linear saves it as it is
  (fp32 runs); under bf16 the Linear saves its own bf16 cast of it, made inside attention or the MLP;
* what attention or the MLP allocate (their Linears' outputs and casts, q/k/v, scores, logsumexp, GELU) is
  `act_attention` / `act_mlp`; the loss's logits, log-probabilities and stored gradients are `logits_loss`;
* in backward, temporaries belong to the module whose backward allocates them; the gradient flowing down the
  residual stream is `act_residual`, a weight gradient is `grads`;
* autocast's bf16 copies of the blocks' weights kept for backward are `weight_copies`; the LM head's copy is
  made by the loss and is `logits_loss` (the LM head and loss); the batch and positions' token ids, cached
  masks and workspaces are `other`.

Formulas: see `trainable/memory_model.py`'s docstring.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Callable

from contract.keys import MEMORY_COMPONENTS

from .memory_spec import FP32, INDEX_BYTES, RESIDUAL_BYTES, MemorySpec


class Parts(dict):
    """Bytes by memory component; + adds, - subtracts, * scales, `total` sums."""

    def __init__(self, values: Mapping[str, float] | None = None, **kw: float):
        super().__init__()
        for key, value in {**(values or {}), **kw}.items():
            self.add(key, value)

    def add(self, component: str, value: float) -> "Parts":
        if component not in MEMORY_COMPONENTS:
            raise KeyError(f"unknown memory component {component!r}")
        if value:
            self[component] = self.get(component, 0.0) + float(value)
        return self

    def __add__(self, other: Mapping[str, float]) -> "Parts":
        out = Parts(self)
        for key, value in other.items():
            out.add(key, value)
        return out

    def __sub__(self, other: Mapping[str, float]) -> "Parts":
        return self + {k: -v for k, v in other.items()}

    def __mul__(self, factor: float) -> "Parts":
        return Parts({k: factor * v for k, v in self.items()})

    __rmul__ = __mul__

    @property
    def total(self) -> float:
        return float(sum(self.values()))


def plus(parts: Iterable[Mapping[str, float]]) -> Parts:
    out = Parts()
    for p in parts:
        out = out + p
    return out


# -- parameters --------------------------------------------------------------------------------


def layer_matmul_params(spec: MemorySpec) -> int:
    """Weights of the four Linears of one block: their bf16 casts are saved for backward.

    (The biases' casts live only in autocast's cache, which is cleared when forward ends.)
    """
    h, f = spec.d_model, spec.ff_dim
    return 4 * h * h + 2 * h * f


def num_params(spec: MemorySpec) -> int:
    """Parameter count of trainable.model.GPT (a tied embedding counted once; an untied head adds V x d)."""
    h, f = spec.d_model, spec.ff_dim
    per_layer = layer_matmul_params(spec) + (3 * h + h + f + h) + 2 * 2 * h  # + biases, two LayerNorms
    head = 0 if spec.tie_embeddings else spec.vocab_size * h
    return spec.vocab_size * h + head + spec.seq_len * h + spec.n_layers * per_layer + 2 * h


def autocast_weight_copy_bytes(spec: MemorySpec, *, blocks: bool) -> float:
    """bf16 copies of matmul weights saved for backward (autocast casts them once per forward).

    The fused loss casts the head weight itself (a forward temporary, see `fused_head`).
    """
    if not spec.autocast:
        return 0.0
    block_params = spec.n_layers * layer_matmul_params(spec) if blocks else 0
    head_params = spec.vocab_size * spec.d_model if spec.loss == "standard" else 0
    return 2.0 * (block_params + head_params)


def autocast_weight_copy_parts(spec: MemorySpec, *, blocks: bool) -> Parts:
    """`autocast_weight_copy_bytes` by component: the blocks' copies, and the head's (made by the loss)."""
    block_params = spec.n_layers * layer_matmul_params(spec) if blocks else 0
    head = autocast_weight_copy_bytes(spec, blocks=False)
    return Parts(weight_copies=2.0 * block_params if spec.autocast else 0.0, logits_loss=head)


# -- activations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerMemory:
    saved_parts: Parts  # kept from forward to backward by one block (no checkpointing)
    backward_parts: Parts  # largest extra bytes while that block runs backward

    @property
    def saved(self) -> float:
        return self.saved_parts.total

    @property
    def backward_temporaries(self) -> float:
        return self.backward_parts.total


def _norm_output_owner(spec: MemorySpec, consumer: str) -> str:
    """Who allocates what a Linear saves of a LayerNorm's output: the LayerNorm itself under fp32, the
    consumer's autocast cast under bf16."""
    return consumer if spec.autocast else "act_norm"


def eager_backward_bytes(spec: MemorySpec) -> float:
    """Eager attention's backward peak over what the layer keeps, three fp32 score-sized buffers alive at once
    (12 a s^2 b): the gradient of the probabilities (its fp32 cast under bf16), the softmax's input gradient,
    and masked_fill's backward, which writes a new tensor rather than masking in place; under bf16 less the
    bf16 probabilities the first bmm's backward has released by then (2 a s^2 b). Measured on an H200 at
    seq_len 512-8192 (docs/results/seq_len_h200.md), where this term decides the peak from s = 2048 on."""
    scores = spec.n_heads * spec.seq_len ** 2 * spec.batch_size
    c = spec.compute_bytes
    return float((3 * FP32 - (c if c != FP32 else 0)) * scores)


def layer_memory(spec: MemorySpec) -> LayerMemory:
    """One transformer block's saved activations and backward temporaries (see memory_model's docstring)."""
    b, s, h, a, f = spec.batch_size, spec.seq_len, spec.d_model, spec.n_heads, spec.ff_dim
    c, r, km = spec.compute_bytes, RESIDUAL_BYTES, spec.kernel_memory
    tokens, t = b * s, b * s * h
    saved = Parts(act_residual=2 * r * t, act_norm=2 * 2 * FP32 * tokens)  # two LN inputs (residual) + mean/rstd
    saved.add(_norm_output_owner(spec, "act_attention"), c * t)  # qkv's input
    saved.add(_norm_output_owner(spec, "act_mlp"), c * t)  # fc's input
    saved.add("act_attention", c * t)  # the projection's input: the attention output reshaped
    saved.add("act_attention", 3 * c * t)  # q, k, v
    saved.add("act_attention", (km.output_copies - 1) * c * t)  # an extra contiguous copy of the output
    saved.add("act_mlp", 2 * c * tokens * f)  # GELU input and output (fc output, mlp-proj input)
    scores = a * s * s * b
    if km.materialises_scores:
        saved.add("act_attention", FP32 * scores + (c * scores if c != FP32 else 0) + s * s)  # probs, bf16, ~mask
    if km.saves_logsumexp:
        saved.add("act_attention", FP32 * a * tokens)
    mlp_temporaries = 2 * c * tokens * f
    # fused kernels' backward: dq, dk, dv, the fp32 dq accumulator and the fp32 rowsum of dO * O (a b s)
    attn_temporaries = eager_backward_bytes(spec) if km.materialises_scores else 3 * c * t + FP32 * t + FP32 * a * tokens
    if mlp_temporaries >= attn_temporaries:
        backward = Parts(act_mlp=mlp_temporaries)
    else:  # a block's backward runs its MLP and LN2 first: what they saved is freed before attention's backward
        mlp_half = Parts(act_mlp=2 * c * tokens * f, act_residual=r * t, act_norm=2 * FP32 * tokens)
        mlp_half.add(_norm_output_owner(spec, "act_mlp"), c * t)
        backward = Parts(act_attention=attn_temporaries) - mlp_half
    return LayerMemory(saved_parts=saved, backward_parts=backward)


def embedding_saved_parts(spec: MemorySpec) -> Parts:
    """Token ids kept by the two embedding lookups: the batch's (a view of its block) and the positions."""
    return Parts(other=INDEX_BYTES * spec.tokens, act_residual=INDEX_BYTES * spec.seq_len)


def mask_cache_bytes(spec: MemorySpec) -> float:
    """Eager attention's cached (s, s) bool causal mask, built once and kept (the per-layer `~mask` is saved)."""
    return float(spec.seq_len ** 2) if spec.kernel_memory.materialises_scores else 0.0


# -- loss heads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadMemory:
    saved_parts: Parts  # kept from forward to backward (final LN, head input, log-probs / stored grads)
    forward_parts: Parts  # extra bytes at the head's forward peak
    backward_parts: Parts  # extra bytes at the head's backward peak

    @property
    def saved(self) -> float:
        return self.saved_parts.total

    @property
    def forward_temporaries(self) -> float:
        return self.forward_parts.total

    @property
    def backward_temporaries(self) -> float:
        return self.backward_parts.total


def _final_norm_parts(spec: MemorySpec) -> Parts:
    return Parts(act_residual=RESIDUAL_BYTES * spec.tokens * spec.d_model, act_norm=2 * FP32 * spec.tokens)


def standard_head(spec: MemorySpec) -> HeadMemory:
    """F.linear -> cross_entropy on log-probabilities of `loss_bytes` each (fp32 upcast by default: 12E bytes at
    the start of backward; in the compute dtype under bf16: 6E)."""
    tokens, t = spec.tokens, spec.tokens * spec.d_model
    logits, c, lp = tokens * spec.vocab_size, spec.compute_bytes, spec.loss_bytes
    saved = _final_norm_parts(spec) + Parts({_norm_output_owner(spec, "logits_loss"): c * t})  # the head's input
    saved.add("logits_loss", lp * logits + INDEX_BYTES * tokens)  # log-probs, targets
    # the logits (and their fp32 copy when upcast), and the final LayerNorm's fp32 output the head reads
    forward = Parts(logits_loss=c * logits + (lp * logits if lp != c else 0), act_norm=RESIDUAL_BYTES * t)
    backward = Parts(logits_loss=2 * lp * logits)  # grad of log-probs, grad of logits
    return HeadMemory(saved_parts=saved, forward_parts=forward, backward_parts=backward)


def fused_head(spec: MemorySpec) -> HeadMemory:
    """fused_linear_cross_entropy: one chunk of logits; grads stored in forward, scaled in backward."""
    tokens = spec.tokens
    c, h, v = spec.compute_bytes, spec.d_model, spec.vocab_size
    chunk = min(spec.chunk_size, tokens)
    grad_hidden, grad_weight = c * tokens * h, FP32 * v * h
    saved = _final_norm_parts(spec) + Parts(logits_loss=grad_hidden + grad_weight)
    weight_copy = c * v * h if c != FP32 else 0
    # The chunk's fp32 logits and logsumexp's exp(logits - max) temporary of the same size (under bf16 the bf16
    # matmul output, 2 CV, is freed by then); the final LayerNorm's fp32 output stays alive while chunks run.
    forward = Parts(logits_loss=weight_copy + 2 * FP32 * chunk * v + c * v * h + c * chunk * h,
                    act_norm=RESIDUAL_BYTES * tokens * h)
    # backward scales the stored gradients: the weight's becomes its .grad, the hidden's flows on (cast to fp32)
    backward = Parts(grads=grad_weight, logits_loss=grad_hidden + (FP32 * tokens * h if c != FP32 else 0))
    return HeadMemory(saved_parts=saved, forward_parts=forward, backward_parts=backward)


LOSS_HEADS: dict[str, Callable[[MemorySpec], HeadMemory]] = {
    "standard": standard_head,
    "fused_ce": fused_head,
}
