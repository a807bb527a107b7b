"""Attention kernels: the sliding-window definition, agreement between kernels, kernel selection (CPU)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from trainable import ATTENTION_BACKENDS, ConfigError, select_kernel, sliding_window_causal_mask
from trainable.attention import eager_attention, flex_attention_kernel, sdpa_attention

B, H, T, D = 2, 3, 24, 8

pytestmark = pytest.mark.usefixtures("one_thread")



def qkv(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(3)]


def brute_force(q, k, v, window):
    """Attention written from the definition: query i sees keys j with i - W < j <= i."""
    out = torch.zeros_like(q)
    for i in range(q.size(2)):
        keys = [j for j in range(q.size(2)) if j <= i and (window is None or i - window < j)]
        scores = q[:, :, i : i + 1] @ k[:, :, keys].transpose(-2, -1) / math.sqrt(q.size(-1))
        out[:, :, i] = (torch.softmax(scores, dim=-1) @ v[:, :, keys])[:, :, 0]
    return out


def test_window_mask_definition():
    mask = sliding_window_causal_mask(10, 4, torch.device("cpu"))
    for i in range(10):
        assert mask[i].nonzero().flatten().tolist() == list(range(max(0, i - 3), i + 1))  # W keys incl. itself
    assert sliding_window_causal_mask(10, None, torch.device("cpu")).equal(torch.ones(10, 10).tril().bool())


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_eager_equals_brute_force_reference(window):
    q, k, v = qkv()
    torch.testing.assert_close(eager_attention(q, k, v, window), brute_force(q, k, v, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [T, T + 5, 1000])
def test_window_at_least_seq_len_is_full_causal(window):
    q, k, v = qkv(1)
    torch.testing.assert_close(eager_attention(q, k, v, window), eager_attention(q, k, v, None), atol=0, rtol=0)


@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_equals_eager(window):
    q, k, v = qkv(2)
    torch.testing.assert_close(sdpa_attention(q, k, v, window), eager_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_flex_mask_equals_masked_reference(window):
    """flex's mask_mod encodes the same window (checked with flex's CPU reference path, forward only)."""
    q, k, v = qkv(3)
    torch.testing.assert_close(flex_attention_kernel(q, k, v, window), brute_force(q, k, v, window),
                               atol=1e-5, rtol=1e-5)


def test_eager_gradients_match_sdpa():
    q1, k1, v1 = (t.requires_grad_() for t in qkv(4))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q1, k1, v1))
    eager_attention(q1, k1, v1, 6).square().sum().backward()
    sdpa_attention(q2, k2, v2, 6).square().sum().backward()
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_bf16_eager_is_close_to_fp32():
    q, k, v = qkv(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = eager_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), eager_attention(q, k, v, None), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    ("attention", "precision", "device", "expected"),
    [
        ("standard", "tf32", "cpu", "eager"),
        ("standard", "bf16", "cuda", "eager"),
        ("window", "bf16", "cpu", "eager"),
        ("window", "tf32", "cuda", "flex"),
    ],
)
def test_kernel_selection(attention, precision, device, expected):
    assert select_kernel(attention, precision, device).name == expected


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_selection_without_flash_attn_package():
    assert select_kernel("flash", "bf16", "cuda").name == "sdpa_flash"
    assert select_kernel("window", "bf16", "cuda").name == "flex"
    with pytest.raises(ConfigError, match=r"pip install 'memeff-sweep\[flash\]'"):
        select_kernel("flash", "bf16", "cuda", requested="flash_attn")


def test_selection_rejects_what_cannot_run_here():
    with pytest.raises(ConfigError, match="flash attention needs a CUDA GPU; use --device cuda or technique bf16"):
        select_kernel("flash", "bf16", "cpu")
    with pytest.raises(ConfigError, match="flash attention needs a CUDA GPU"):
        select_kernel("window", "bf16", "cpu", requested="flex")
    with pytest.raises(ConfigError, match="cannot run 'window'"):
        select_kernel("window", "bf16", "cuda", requested="sdpa_flash")


def test_registry_kernels_declare_what_they_run():
    for name, kernel in ATTENTION_BACKENDS.items():
        assert kernel.name == name and kernel.attentions
    assert {"eager", "sdpa", "sdpa_flash", "flash_attn", "flex"} <= set(ATTENTION_BACKENDS)
