"""Model FLOPs per token and the GPU's peak rate, for MFU (model FLOPs utilisation).

MFU = tokens_per_s * model_flops_per_token / peak_flops (Chowdhery et al. 2022, PaLM, appendix B).
"Model" FLOPs count the math the model needs, not what the hardware ran: recomputation by gradient
checkpointing and the masked-out half of an eager attention score matrix are NOT counted, so MFU
compares techniques by useful work (a technique that recomputes shows a lower MFU).
"""
from __future__ import annotations

import math

from .model import ModelConfig

# Peak dense (no 2:4 sparsity) BF16 tensor-core rate with FP32 accumulation, FLOP/s, from the vendor
# datasheets (their headline numbers are "with sparsity", twice these):
#   H100 SXM / H200 SXM: NVIDIA H100 Tensor Core GPU datasheet and H200 datasheet, BF16 1,979 TFLOPS
#     sparse -> 989.5 dense; H100 PCIe 1,513 -> 756; H100 NVL and H200 NVL 1,671 -> 835.5.
#   A100 (SXM and PCIe, 40/80 GB): NVIDIA A100 datasheet, BF16 312 TFLOPS dense.
#   L40S: NVIDIA L40S datasheet, BF16 362.05 TFLOPS dense (733 sparse).
#   RTX 5090: NVIDIA RTX Blackwell GPU architecture whitepaper, FP16/BF16 tensor with FP32 accumulate
#     209.5 TFLOPS dense. RTX 4090: Ada Lovelace architecture whitepaper, 165.2 TFLOPS dense.
# Matched as substrings of torch.cuda.get_device_name(), first match wins (so "H100 NVL" before "H100").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.5e12),
    ("H200", 989.5e12),
    ("H100 NVL", 835.5e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),
    ("A100", 312e12),
    ("L40S", 362.05e12),
    ("RTX 5090", 209.5e12),
    ("RTX 4090", 165.2e12),
)


def peak_bf16_flops(gpu_name: str | None, override: float | None = None) -> float:
    """Peak dense BF16 FLOP/s of `gpu_name` (`override` wins); NaN when unknown or on CPU."""
    if override is not None:
        return float(override)
    if not gpu_name:
        return math.nan
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in gpu_name.lower():
            return flops
    return math.nan


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters outside the token and position embeddings (blocks incl. biases and LayerNorms, final LN)."""
    d, f = cfg.d_model, cfg.ff_dim
    per_block = (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (d * f + f) + (f * d + d)
    return cfg.n_layers * per_block + 2 * d


def mean_attended_keys(seq_len: int, window: int | None) -> float:
    """Keys one query attends to, averaged over positions: causal (T + 1) / 2, window W: mean min(i + 1, W)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    full = seq_len - window + 1  # positions i >= W - 1 see exactly W keys
    ramp = window * (window - 1) / 2  # positions 0 .. W - 2 see 1 .. W - 1 keys
    return (full * window + ramp) / seq_len


def model_flops_per_token(cfg: ModelConfig, window: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of `trainable.model.GPT`:

        F = 6 * (N + V * d)  +  12 * L * d * K

    N = non-embedding parameters (`non_embedding_params`), V * d = the LM-head matmul (its weight
    is tied to the input embedding, but it is still a matmul; the embedding lookups are free),
    6 = 2 FLOPs per multiply-add x (1 forward + 2 backward). The attention term counts the two
    score matmuls (q k^T and p v: 2 * 2 * d FLOPs per attended key per layer, x3 for backward)
    over K = `mean_attended_keys`: ONLY THE CAUSAL HALF, K = (T + 1) / 2 (with a sliding window W,
    the mean of min(i + 1, W)). PaLM's 6N + 12 L d T counts the full T x T matrix, so for causal
    attention its attention term is about twice ours.
    """
    head = cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.n_layers * cfg.d_model * mean_attended_keys(cfg.seq_len, window)
    return 6 * (non_embedding_params(cfg) + head) + attention


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]; NaN when the peak is unknown."""
    if not (peak_flops > 0) or not math.isfinite(tokens_per_s):
        return math.nan
    return tokens_per_s * flops_per_token / peak_flops
