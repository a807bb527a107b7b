"""CUDA-only checks of the kernels and the measurement (skipped without a GPU)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from helpers import run
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
    cfg = trial(sample_dataset, technique="baseline", d_model=256, n_layers=4, batch_size=512, gpu_memory_gb=1.0)
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # cuBLAS workspace exists before we count
    before = torch.cuda.memory_allocated()
    reports, final = run(cfg)
    assert final["oom"] is True and final["status"] == "oom" and final["final"] is True
    assert final["oom_phase"] in ("forward", "backward") and final["mem_reserved_mib"] > 0
    # the failed trial's tensors (model, grads, AdamW state: ~50 MiB here) were freed
    assert torch.cuda.memory_allocated() - before < 8 * 2**20
    # the cap is lifted afterwards: the same trial without it completes
    _, ok = run(trial(sample_dataset, technique="baseline", d_model=256, n_layers=4, batch_size=512, max_steps=2))
    assert ok["status"] == "ok"


# -- newer techniques: torch.compile, selective checkpointing, fused CE, MFU --------------------------
def compiled_graph_breaks(kernel: str, window=None, checkpointing="none") -> int:
    """Graph breaks of the compiled training forward (flex must fuse into the graph, not fall back)."""
    from trainable import apply_checkpointing
    from trainable.compile_policy import forward_loss
    from trainable.losses import standard_cross_entropy

    cfg = ModelConfig(vocab_size=512, seq_len=256, n_layers=2, d_model=128, n_heads=4, ff_dim=512)
    model = apply_checkpointing(GPT(cfg, ATTENTION_BACKENDS[kernel].bind(window)).cuda(), checkpointing)
    if ATTENTION_BACKENDS[kernel].prepare is not None:
        ATTENTION_BACKENDS[kernel].prepare(cfg.seq_len, window, torch.device("cuda"))
    tokens = torch.randint(0, 512, (4, cfg.seq_len + 1), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(forward_loss(model, standard_cross_entropy))(tokens[:, :-1], tokens[:, 1:])
    torch._dynamo.reset()
    return explained.graph_break_count


@pytest.mark.parametrize(("kernel", "window", "checkpointing"), [
    ("sdpa_flash", None, "none"), ("sdpa_flash", None, "selective"), ("flex", 16, "none"), ("flex", 16, "full"),
    ("flex", 16, "selective"), ("eager", None, "selective"),
])
def test_compiled_forward_is_one_graph(kernel, window, checkpointing):
    assert compiled_graph_breaks(kernel, window, checkpointing) == 0


COMPILE_CASES = [
    dict(technique="flash_compile"),
    dict(technique="fused_ce_compile"),
    dict(technique="window_compile", window=16, checkpointing="selective"),
    dict(technique="window_compile", window=16, checkpointing="full"),
]


@pytest.mark.parametrize("switches", COMPILE_CASES, ids=lambda s: "-".join(map(str, s.values())))
def test_compile_matches_eager_and_reports_compile_time_apart(sample_dataset, switches):
    compiled_reports, compiled = run(trial(sample_dataset, max_steps=6, **switches))
    eager_reports, eager = run(trial(sample_dataset, max_steps=6, **{**switches, "compile": False}))
    assert compiled["status"] == eager["status"] == "ok" and compiled["label"].endswith("_compile")
    assert [r["loss"] for r in compiled_reports] == pytest.approx([r["loss"] for r in eager_reports], rel=2e-2)
    assert compiled_reports[0]["compiling"] is True and compiled_reports[0]["warmup"] is True
    assert not any(r["compiling"] for r in compiled_reports[2:])
    assert compiled["compile_time_s"] >= compiled_reports[0]["step_time_s"] > 0
    assert compiled["steady_tokens_per_s"] > 0 and math.isfinite(compiled["steady_tokens_per_s"])
    if not math.isnan(compiled["peak_flops"]):  # a GPU of the table (H100/H200/A100/L40S/RTX 5090...)
        assert all(0 < r["mfu"] < 1 for r in compiled_reports[1:])


def test_window_on_flex_flags_its_compiling_step_even_without_compile(sample_dataset):
    torch._dynamo.reset()  # earlier tests may have compiled flex for these shapes already
    reports, final = run(trial(sample_dataset, technique="window", window=16, max_steps=4))
    if final["attention_kernel"] != "flex":
        pytest.skip("flash_attn ran the window")
    assert reports[0]["compiling"] is True and final["compile_time_s"] > 0


def test_selective_checkpointing_memory_lies_between_none_and_full(sample_dataset):
    _, plain = run(trial(sample_dataset, technique="bf16", batch_size=128))
    _, sac = run(trial(sample_dataset, technique="bf16", checkpointing="selective", batch_size=128))
    _, full = run(trial(sample_dataset, technique="bf16_gradcp", batch_size=128))
    assert full["mem_fwd_peak_mib"] < sac["mem_fwd_peak_mib"] < plain["mem_fwd_peak_mib"]
    assert sac["loss"] == pytest.approx(plain["loss"], rel=1e-3) and sac["label"] == "bf16_sac"


def test_selective_checkpointing_with_eager_flex_window(sample_dataset):
    """Eager model, compiled flex kernel inside a selective-checkpointing region."""
    torch._dynamo.reset()  # so that this trial compiles flex itself (and says so) rather than reusing a cache
    reports, final = run(trial(sample_dataset, technique="window", window=16, checkpointing="selective"))
    ref_reports, _ = run(trial(sample_dataset, technique="window", window=16))
    assert final["status"] == "ok" and final["label"] == "bf16_window16_sac"
    assert [r["loss"] for r in reports] == pytest.approx([r["loss"] for r in ref_reports], rel=2e-2)
    if final["attention_kernel"] == "flex":  # the compiled flex kernel ran (no silent unfused fallback)
        assert reports[0]["compiling"] is True, "flex was not compiled inside the SAC region: use window_compile"


def test_fused_ce_lowers_the_peak_at_a_large_vocab(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_trainable",
                                                  Path(__file__).resolve().parents[1] / "bench" / "bench_trainable.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = bench.write_synthetic_dataset(tmp_path / "v50k", vocab_size=50257, seq_len=128,
                                         rows={"train": 512, "val": 32, "test": 1})
    # 256 x 128 = 32768 tokens: four 8192-token chunks instead of 32768 x 50257 logits at once
    _, standard = run(trial(data, technique="flash", seq_len=128, batch_size=256, max_steps=3))
    _, fused = run(trial(data, technique="fused_ce", seq_len=128, batch_size=256, max_steps=3))
    assert fused["label"] == "bf16_flash_fusedce" and fused["loss"] == pytest.approx(standard["loss"], rel=2e-2)
    assert fused["mem_step_peak_mib"] < 0.8 * standard["mem_step_peak_mib"]


SYNC_FREE_CASES = [dict(technique="baseline"), dict(technique="flash"), dict(technique="window", window=16),
                   dict(technique="gradcp"), dict(technique="fused_ce"), dict(technique="bf16", checkpointing="selective"),
                   dict(technique="flash_compile"), dict(technique="fused_ce_compile")]


@pytest.mark.parametrize("switches", SYNC_FREE_CASES, ids=lambda s: "-".join(map(str, s.values())))
def test_training_steps_never_wait_for_the_gpu_beyond_the_reported_step(sample_dataset, switches):
    """Between reports, any host-GPU synchronisation (`.item()` on a CUDA tensor, a blocking copy, a
    stream sync) raises under sync-debug mode "error"; only the reported step's CUDA event is waited on.
    A sync there would idle the GPU every step and is what made the trainable slower than a plain loop."""
    steps = 8
    seen = []

    def report(metrics):
        seen.append(metrics["step"])
        if metrics["step"] == 2:  # step 3 is queued: from here every step is steady state
            torch.cuda.set_sync_debug_mode("error")
        if metrics["step"] == steps - 1:  # the last step evaluates, which synchronises by design
            torch.cuda.set_sync_debug_mode("default")

    try:  # reports inline, so the debug mode switches exactly between the steps named above
        final = run_trial(trial(sample_dataset, max_steps=steps, **switches), report, background_reports=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert final["status"] == "ok" and seen == list(range(1, steps + 1))
    assert all(math.isfinite(loss) for loss in (final["loss"], final["val_loss"]))
