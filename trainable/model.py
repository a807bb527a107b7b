"""A GPT-style decoder, nanoGPT-sized and readable in one sitting.

Pre-LayerNorm blocks, GELU MLP, learned absolute positions, input and output embeddings tied (or, with
`tie_embeddings=False`, an LM head with its own V x d weight).
The model knows nothing about techniques: the attention kernel is handed in as a callable
(`attention.py`), checkpointing is applied afterwards as a policy (`checkpointing.py`), precision is
autocast around the call (`precision.py`), and the LM head lives in the loss (`losses.py`), so
`forward` returns the final hidden states.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from .attention import Attend, eager_attention


@dataclass
class ModelConfig:
    vocab_size: int
    seq_len: int = 512
    n_layers: int = 6
    d_model: int = 512
    n_heads: int = 8
    ff_dim: int = 2048
    tie_embeddings: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, attend: Attend):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attend = attend

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = self.attend(q, k, v)  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.act = nn.GELU()
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attend: Attend):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg, attend)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, attend: Attend = eager_attention):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, attend) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        # Built without drawing random numbers and initialised last, so every other weight is the tied model's.
        self.lm_head = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head, std=0.02)

    @property
    def output_weight(self) -> Tensor:
        """The LM head's (V, d) weight: the input embedding's when tied, else its own."""
        return self.wte.weight if self.lm_head is None else self.lm_head

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> final hidden states (B, T, d); the loss applies the LM head."""
        T = idx.size(1)
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len {self.cfg.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.output_weight.T

    def num_params(self) -> int:
        """Trainable parameters, a tied embedding counted once (an untied head adds V x d)."""
        return sum(p.numel() for p in self.parameters())
