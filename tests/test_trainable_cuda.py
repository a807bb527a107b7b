"""CUDA-only checks of the kernels and the measurement (skipped without a GPU)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from trainable import ATTENTION_BACKENDS, GPT, ModelConfig, TrialConfig, run_trial
from trainable.attention import eager_attention, flex_attention_kernel, sdpa_flash_attention
from trainable.losses import standard_cross_entropy

pytestmark = pytest.mark.cuda
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def qkv(B=2, H=8, T=512, D=64, dtype=torch.bfloat16, seed=0, grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)]


def fp32_reference(q, k, v, window):
    return eager_attention(q.float(), k.float(), v.float(), window)


def test_sdpa_flash_matches_eager_within_bf16_tolerance():
    q, k, v = qkv()
    torch.testing.assert_close(sdpa_flash_attention(q, k, v).float(), fp32_reference(q, k, v, None), **BF16_TOL)


def test_sdpa_flash_fails_loudly_instead_of_falling_back():
    q, k, v = qkv(dtype=torch.float32)  # flash has no fp32 kernel: must raise, not run the math backend
    with pytest.raises(RuntimeError):
        sdpa_flash_attention(q, k, v)


@pytest.mark.parametrize("window", [1, 16, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flex_window_matches_masked_reference(window, dtype):
    q, k, v = qkv(dtype=dtype, T=256)
    tol = BF16_TOL if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flex_attention_kernel(q, k, v, window).float(), fp32_reference(q, k, v, window), **tol)


def test_flex_window_gradients_match_eager():
    q1, k1, v1 = qkv(T=256, dtype=torch.float32, grad=True)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q1, k1, v1))
    flex_attention_kernel(q1, k1, v1, 16).square().sum().backward()
    eager_attention(q2, k2, v2, 16).square().sum().backward()
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn not installed")
@pytest.mark.parametrize("window", [None, 16])
def test_flash_attn_matches_masked_reference(window):
    q, k, v = qkv()
    out = ATTENTION_BACKENDS["flash_attn"].fn(q, k, v, window)
    torch.testing.assert_close(out.float(), fp32_reference(q, k, v, window), **BF16_TOL)


def peak_train_step_mib(kernel: str, window=None, batch=8, seq=512) -> float:
    cfg = ModelConfig(vocab_size=512, seq_len=seq, n_layers=2, d_model=512, n_heads=8, ff_dim=2048)
    torch.manual_seed(0)
    model = GPT(cfg, ATTENTION_BACKENDS[kernel].bind(window)).cuda()
    tokens = torch.randint(0, 512, (batch, seq + 1), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = standard_cross_entropy(model(tokens[:, :-1]), model.output_weight, tokens[:, 1:])
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def test_bf16_flash_uses_less_peak_memory_than_eager_at_seq_512():
    eager = peak_train_step_mib("eager")
    flash = peak_train_step_mib("sdpa_flash")
    window = peak_train_step_mib("flex", window=16)
    assert flash < 0.8 * eager and window < 0.8 * eager, (eager, flash, window)


def trial(data, **kw) -> TrialConfig:
    base = dict(data_dir=str(data), device="cuda", n_layers=2, d_model=128, n_heads=4, ff_dim=512, seq_len=64,
                batch_size=32, max_steps=5, warmup_steps=1, eval_interval=0, eval_batches=2, eval_batch_size=16)
    return TrialConfig.from_dict({**base, **kw})


def run(cfg):
    reports = []
    final = run_trial(cfg, reports.append)
    return reports, final


@pytest.mark.parametrize(("technique", "kernels"), [("baseline", {"eager"}), ("bf16", {"eager"}),
                                                    ("flash", {"flash_attn", "sdpa_flash"}),
                                                    ("window", {"flash_attn", "flex"}), ("gradcp", {"eager"})])
def test_memory_keys_are_positive_and_ordered(sample_dataset, technique, kernels):
    reports, final = run(trial(sample_dataset, technique=technique, window=16 if technique == "window" else None))
    assert final["status"] == "ok" and final["attention_kernel"] in kernels and final["device"] == "cuda"
    assert final["tf32"] is (technique != "fp32") and final["gpu_total_mib"] > 0 and final["gpu_name"]
    for r in reports:
        fwd, bwd, opt, step = (r[f"mem_{p}_peak_mib"] for p in ("fwd", "bwd", "opt", "step"))
        assert min(fwd, bwd, opt, r["mem_allocated_mib"]) > 0 and math.isfinite(r["loss"])
        assert step == max(fwd, bwd, opt)
        assert r["mem_reserved_mib"] >= r["mem_allocated_mib"] and step >= r["mem_allocated_mib"]
        assert r["step_time_s"] > 0
    # from step 2 on the Adam state exists: the optimizer phase holds params + grads + 2 moments
    assert reports[-1]["mem_opt_peak_mib"] > reports[-1]["mem_allocated_mib"]


def test_gradient_checkpointing_lowers_the_forward_peak(sample_dataset):
    _, plain = run(trial(sample_dataset, technique="baseline", batch_size=128))
    _, ckpt = run(trial(sample_dataset, technique="gradcp", batch_size=128))
    assert ckpt["mem_fwd_peak_mib"] < plain["mem_fwd_peak_mib"]
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-3)


def test_real_oom_under_memory_cap_ends_the_trial_as_oom(sample_dataset):
    cfg = trial(sample_dataset, technique="baseline", d_model=256, n_layers=4, batch_size=512, gpu_memory_gb=0.1)
    reports, final = run(cfg)
    assert final["oom"] is True and final["status"] == "oom" and final["final"] is True
    assert final["oom_phase"] in ("forward", "backward") and final["batch_size"] == 512
    assert final["gpu_memory_limit_gb"] == 0.1 and final["mem_reserved_mib"] > 0
    assert torch.cuda.memory_allocated() < 64 * 2**20  # the failed trial's tensors were freed
    # the cap is lifted afterwards: the same trial without it completes
    _, ok = run(trial(sample_dataset, technique="baseline", d_model=256, n_layers=4, batch_size=512, max_steps=2))
    assert ok["status"] == "ok"
