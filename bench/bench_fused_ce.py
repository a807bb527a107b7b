"""Benchmark the fused linear + cross-entropy loss against the standard loss on one CUDA GPU.

Four variants, forward + backward, bf16 autocast: (a) standard loss eager, (b) standard loss
torch.compile'd, (c) fused eager, (d) fused with a compiled chunk body; first the loss head alone
(hidden states -> loss), then the whole `trainable.model.GPT` (if importable) with each loss.
Prints a markdown table of tokens/s and peak allocated memory. Seed shape: d=512, V=50257,
128 x 512 tokens; well under 2 minutes on an H200 (compilation included).

    python bench/bench_fused_ce.py [--batch-size 128] [--seq-len 512] [--iters 10] [--out table.md]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from contract.io import write_text_atomic  # noqa: E402
from trainable.fused_ce import fused_linear_cross_entropy  # noqa: E402

MIB = float(1 << 20)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _fallback_standard_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Same math as trainable.losses.standard_cross_entropy, for checkouts without it."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


try:
    from trainable.losses import standard_cross_entropy as standard_loss  # noqa: E402
except ImportError:
    standard_loss = _fallback_standard_loss


def loss_variants(chunk_size: int) -> dict[str, LossFn]:
    return {
        "standard eager": standard_loss,
        "standard compiled": torch.compile(standard_loss),
        "fused eager": lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=chunk_size),
        "fused compiled chunk": lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=chunk_size,
                                                                           compiled=True),
    }


@dataclass
class Result:
    scope: str
    variant: str
    tokens_per_s: float
    peak_mib: float  # max_memory_allocated during the step
    step_extra_mib: float  # peak minus what was allocated before the step
    loss: float


def measure(step: Callable[[], torch.Tensor], tokens: int, iters: int, warmup: int = 2) -> tuple[float, float, float, float]:
    """(tokens/s, peak MiB, extra MiB over the pre-step allocation, last loss) of `step` (fwd + bwd)."""
    for _ in range(warmup):  # includes torch.compile's first call
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        loss = step()
    stop.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(stop) / 1000.0
    peak = torch.cuda.max_memory_allocated()
    return tokens * iters / seconds, peak / MIB, (peak - before) / MIB, float(loss)


def bench_head(args, variants: dict[str, LossFn], device: torch.device) -> list[Result]:
    """Loss head alone: fp32 hidden states (as the final LayerNorm emits under autocast) -> loss."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.batch_size, args.seq_len, args.d_model, device=device, generator=g).requires_grad_()
    weight = (0.02 * torch.randn(args.vocab_size, args.d_model, device=device, generator=g)).requires_grad_()
    targets = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device, generator=g)
    results = []
    for name, loss_fn in variants.items():
        def step(loss_fn=loss_fn):
            hidden.grad = weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(hidden, weight, targets)
            loss.backward()
            return loss.detach()

        results.append(Result("loss head", name, *measure(step, hidden.shape[0] * hidden.shape[1], args.iters)))
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
    return results


def build_model(args, device: torch.device):
    """trainable.model.GPT with an SDPA flash kernel, or None when the package is not importable."""
    try:
        from trainable.attention import ATTENTION_BACKENDS
        from trainable.model import GPT, ModelConfig
    except ImportError as exc:
        print(f"(trainable.model not importable: {exc}; loss head only)", file=sys.stderr)
        return None
    cfg = ModelConfig(vocab_size=args.vocab_size, seq_len=args.seq_len, d_model=args.d_model)
    return GPT(cfg, ATTENTION_BACKENDS["sdpa_flash"].bind(None)).to(device)


def bench_model(args, variants: dict[str, LossFn], device: torch.device) -> list[Result]:
    model = build_model(args, device)
    if model is None:
        return []
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device, generator=g)
    targets = torch.roll(idx, -1, dims=1)
    results = []
    for name, loss_fn in variants.items():
        def step(loss_fn=loss_fn):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(idx), model.output_weight, targets)
            loss.backward()
            return loss.detach()

        results.append(Result("full model", name, *measure(step, idx.numel(), args.iters)))
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return results


def markdown_table(results: list[Result]) -> str:
    lines = ["| scope | variant | tok/s | peak MiB | step extra MiB | loss |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.scope} | {r.variant} | {r.tokens_per_s:,.0f} | {r.peak_mib:,.0f} | "
                     f"{r.step_extra_mib:,.0f} | {r.loss:.4f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--head-only", action="store_true", help="skip the full-model runs")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "d_model", "vocab_size", "chunk_size", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_fused_ce needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    variants = loss_variants(args.chunk_size)
    results = bench_head(args, variants, device)
    if not args.head_only:
        results += bench_model(args, variants, device)
    table = markdown_table(results)
    header = (f"GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16 autocast, "
              f"{args.batch_size}x{args.seq_len} tokens, d={args.d_model}, V={args.vocab_size}, "
              f"chunk={args.chunk_size}, fwd+bwd, {time.perf_counter() - started:.0f} s total")
    print(header + "\n\n" + table)
    if args.out:
        write_text_atomic(str(args.out), header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
