"""Attention kernels behind one signature, in a small registry.

Every kernel maps q, k, v of shape (batch, heads, seq, head_dim) to the attention output of the
same shape, causal, optionally restricted to a sliding window. THE WINDOW, defined once:

    with window W, the query at position i attends to the keys j with  i - W < j <= i,

i.e. W keys including itself (fewer at the start of the sequence). flash_attn expresses this as
`window_size=(W - 1, 0)`, flex as the mask `0 <= i - j < W`, eager/SDPA as the boolean mask
`sliding_window_causal_mask`. `window=None` is plain causal attention.

Inside a torch.compile'd model (the `compile` switch) the kernels stay traceable: masks are built
in the graph instead of read from a host-side cache, and flex calls the flex_attention op directly
so that the outer compilation fuses it (outside one, flex runs its own compiled kernel: uncompiled,
flex_attention falls back to a slow reference path that materialises the scores).

Which kernel runs is decided inside the trial from the config and the hardware (`select_kernel`, over
the torch-free table in `kernels.py`), never at import time; the trial reports the chosen kernel's name
as `attention_kernel`. Kernels do not fall back silently: `sdpa_flash` allows only SDPA's flash backend, so an unsupported input
raises instead of quietly running the math kernel.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import CUDA_NEEDED, KERNEL_PREFERENCE, KERNELS, KernelSpec, select_kernel_name  # noqa: F401

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q, k, v) -> out, all (B, H, T, Dh)


@functools.lru_cache(maxsize=32)
def sliding_window_causal_mask(seq_len: int, window: int | None, device: torch.device) -> Tensor:
    """Boolean (T, T) mask, True where query i may attend key j: j <= i and i - j < window."""
    i = torch.arange(seq_len, device=device)
    distance = i[:, None] - i[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def _window_mask(seq_len: int, window: int | None, device: torch.device) -> Tensor:
    """The cached mask in eager mode; under torch.compile a few fused ops inside the graph instead
    (dynamo would trace through the lru_cache anyway, with a warning)."""
    if torch.compiler.is_compiling():
        return sliding_window_causal_mask.__wrapped__(seq_len, window, device)
    return sliding_window_causal_mask(seq_len, window, device)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor:
    """Textbook attention: materialises the (B, H, T, T) score matrix, masked softmax in fp32."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    mask = _window_mask(q.size(-2), window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return probs @ v


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor:
    """torch SDPA with whatever backend torch picks (math on CPU); a window becomes an explicit mask."""
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = _window_mask(q.size(-2), window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_flash_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor:
    """torch SDPA restricted to the FlashAttention backend: fails loudly rather than falling back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if window is not None:
        raise ValueError("sdpa_flash has no sliding window; use flash_attn or flex")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def flash_attn_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor:
    """Tri Dao's flash_attn package (imported on first use); it wants (B, T, H, Dh)."""
    from flash_attn import flash_attn_func

    window_size = (window - 1, 0) if window is not None else (-1, -1)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          causal=True, window_size=window_size)
    return out.transpose(1, 2)


# BlockMasks by (seq_len, window, device type, device index): a plain dict rather than an lru_cache, so
# that a compiled model reads a mask built beforehand (`prepare_flex`) as a graph input.
_FLEX_BLOCK_MASKS: dict[tuple, object] = {}


def _build_flex_block_mask(seq_len: int, window: int | None, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_window_causal(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        allowed = distance >= 0
        if window is not None:
            allowed = allowed & (distance < window)
        return allowed

    return create_block_mask(sliding_window_causal, None, None, seq_len, seq_len, device=device)


def flex_block_mask(seq_len: int, window: int | None, device: torch.device):
    """flex_attention BlockMask of the sliding-window causal pattern (built once per shape and device;
    inside a compiled graph a missing one is built in the graph and not cached)."""
    key = (seq_len, window, device.type, device.index)
    mask = _FLEX_BLOCK_MASKS.get(key)
    if mask is None:
        mask = _build_flex_block_mask(seq_len, window, device)
        if not torch.compiler.is_compiling():
            _FLEX_BLOCK_MASKS[key] = mask
    return mask


def prepare_flex(seq_len: int, window: int | None, device: torch.device) -> None:
    """Build the BlockMask before the first (possibly compiled) forward."""
    flex_block_mask(seq_len, window, device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """flex_attention only becomes a fused kernel under torch.compile (compiled on first CUDA use)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_kernel(q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor:
    """torch flex_attention with a sliding-window causal BlockMask; always compiled on CUDA.

    Inside a compiled model the op is left to the outer compilation (one graph, no nested compile);
    in an eager model it runs its own torch.compile'd kernel. On CPU it runs flex's unfused
    reference path (forward only), which tests use to check the mask.
    """
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = flex_block_mask(q.size(-2), window, q.device)
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block_mask)


def clear_caches() -> None:
    """Forget every cached mask and compiled kernel (device tensors among them), so the next trial in this
    process starts from what a fresh process has: nothing (`setup.reset_process`)."""
    sliding_window_causal_mask.cache_clear()
    _FLEX_BLOCK_MASKS.clear()
    _compiled_flex.cache_clear()


@dataclass(frozen=True)
class AttentionKernel:
    """One entry of the registry: the kernel's requirements (`kernels.KernelSpec`) plus its function."""

    spec: KernelSpec
    fn: Callable[..., Tensor]  # fn(q, k, v, window)
    prepare: Callable[[int, int | None, torch.device], None] | None = None  # (seq_len, window, device)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def attentions(self) -> tuple[str, ...]:
        return self.spec.attentions

    @property
    def needs_cuda(self) -> bool:
        return self.spec.needs_cuda

    @property
    def needs_bf16(self) -> bool:
        return self.spec.needs_bf16

    def bind(self, window: int | None) -> Attend:
        """The (q, k, v) -> out callable a model layer calls."""
        return functools.partial(self.fn, window=window)


_FUNCTIONS: dict[str, tuple[Callable[..., Tensor], Callable | None]] = {
    "eager": (eager_attention, None),
    "sdpa": (sdpa_attention, None),
    "sdpa_flash": (sdpa_flash_attention, None),
    "flash_attn": (flash_attn_attention, None),
    "flex": (flex_attention_kernel, prepare_flex),
}
ATTENTION_BACKENDS: dict[str, AttentionKernel] = {
    name: AttentionKernel(spec, *_FUNCTIONS[name]) for name, spec in KERNELS.items()
}


def select_kernel(attention: str, precision: str, device_type: str, requested: str = "auto") -> AttentionKernel:
    """The kernel a trial runs (`kernels.select_kernel_name`), with its function."""
    return ATTENTION_BACKENDS[select_kernel_name(attention, precision, device_type, requested)]
