"""The analytic memory model against what autograd really keeps (CPU) and against itself (invariants)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trainable.attention import ATTENTION_BACKENDS
from trainable.checkpointing import apply_checkpointing
from trainable.fused_ce import fused_linear_cross_entropy
from trainable.losses import standard_cross_entropy
from trainable.memory_model import (
    MIB,
    MemoryConstants,
    MemorySpec,
    calibrate,
    layer_matmul_params,
    layer_memory,
    num_params,
    predict_max_batch_size,
    predict_peak_memory,
    to_spec,
)
from trainable.model import GPT, ModelConfig

TINY = dict(n_layers=2, d_model=64, n_heads=4, ff_dim=256, seq_len=32, vocab_size=96, batch_size=2, device="cpu")
SEED_SHAPE = dict(n_layers=6, d_model=512, n_heads=8, ff_dim=2048, seq_len=512, vocab_size=50257, batch_size=32)
LOSS_FNS = {
    "standard": standard_cross_entropy,
    "fused_ce": lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=16),
}


def _build(spec: MemorySpec) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=spec.vocab_size, seq_len=spec.seq_len, n_layers=spec.n_layers,
                      d_model=spec.d_model, n_heads=spec.n_heads, ff_dim=spec.ff_dim)
    model = GPT(cfg, ATTENTION_BACKENDS[spec.kernel].bind(spec.window))
    return apply_checkpointing(model, spec.checkpointing)


def measured_saved_bytes(spec: MemorySpec) -> int:
    """Bytes autograd keeps from forward to backward: unique non-parameter storages of saved tensors,
    plus the block inputs a checkpointed block keeps alive (its own saved-tensor hooks hide them)."""
    model = _build(spec)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t
        return t

    def keep_block_input(_module, args) -> None:
        keep(args[0])

    if spec.checkpointing == "full":
        for block in model.blocks:
            block.register_forward_pre_hook(keep_block_input)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), generator=g)
    targets = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.autocast):
            loss = LOSS_FNS[spec.loss](model(idx), model.output_weight, targets)
    loss.backward()  # the graph really was complete
    assert model.wte.weight.grad is not None
    return sum(t.untyped_storage().nbytes() for t in kept.values())


CASES = [
    dict(precision="fp32", kernel="eager"),
    dict(precision="bf16", kernel="eager"),
    dict(precision="bf16", kernel="sdpa"),
    dict(precision="fp32", kernel="eager", checkpointing="full"),
    dict(precision="bf16", kernel="eager", checkpointing="full"),
    dict(precision="bf16", kernel="sdpa", checkpointing="full"),
    dict(precision="bf16", kernel="eager", loss="fused_ce"),
    dict(precision="fp32", kernel="sdpa", loss="fused_ce"),
]


def _case_id(case: dict) -> str:
    return "-".join(str(v) for v in case.values())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_saved_activations_match_autograd(case):
    spec = MemorySpec(**TINY, **case)
    predicted = predict_peak_memory(spec).saved_for_backward_mib * MIB
    measured = measured_saved_bytes(spec)
    assert abs(predicted - measured) <= 0.10 * measured, f"predicted {predicted:.0f} B, measured {measured} B"


@pytest.mark.parametrize("case", CASES[:6], ids=_case_id)
def test_per_layer_activations_match_autograd(case):
    """Two extra blocks add exactly two layers' worth (isolates the per-layer formula from the head)."""
    one, three = (MemorySpec(**{**TINY, "n_layers": n}, **case) for n in (1, 3))
    measured_per_layer = (measured_saved_bytes(three) - measured_saved_bytes(one)) / 2
    bd_one, bd_three = predict_peak_memory(one), predict_peak_memory(three)
    predicted_per_layer = (bd_three.saved_for_backward_mib - bd_one.saved_for_backward_mib) * MIB / 2
    assert abs(predicted_per_layer - measured_per_layer) <= 0.10 * measured_per_layer
    if case.get("checkpointing") != "full":  # the difference is one block's activations + its bf16 weight copies
        copies = 2 * layer_matmul_params(one) if one.autocast else 0
        assert bd_one.activations_per_layer_mib * MIB + copies == pytest.approx(predicted_per_layer, rel=1e-6)


def test_fp32_layer_is_twice_korthikanti_16bit_without_dropout():
    """64 sbh + 4 a s^2 b (+ LN statistics and the mask) = 2 x (32 sbh + 2 a s^2 b)."""
    spec = to_spec(SEED_SHAPE, precision="fp32", kernel="eager")
    b, s, h, a = spec.batch_size, spec.seq_len, spec.d_model, spec.n_heads
    extras = 16 * b * s + s * s
    assert layer_memory(spec).saved == 2 * (32 * s * b * h + 2 * a * s * s * b) + extras
    bf16 = to_spec(SEED_SHAPE, precision="bf16", kernel="eager")
    assert layer_memory(bf16).saved == 36 * s * b * h + 6 * a * s * s * b + extras


def test_num_params_matches_the_model():
    spec = MemorySpec(**TINY)
    assert num_params(spec) == _build(spec).num_params()


@pytest.mark.parametrize("kernel", ["sdpa_flash", "flash_attn", "flex"])
def test_fused_kernels_have_no_quadratic_term(kernel):
    def per_layer(seq_len, kernel, window=None):
        spec = to_spec(SEED_SHAPE, precision="bf16", kernel=kernel, seq_len=seq_len, window=window)
        return layer_memory(spec).saved

    assert per_layer(1024, kernel) == 2 * per_layer(512, kernel)  # linear in s
    assert per_layer(1024, kernel, window=64) == per_layer(1024, kernel)  # the window changes FLOPs only
    eager_excess = per_layer(1024, "eager") - 2 * per_layer(512, "eager")
    assert eager_excess > 0.5 * per_layer(512, "eager")  # eager's s^2 term does grow


@pytest.mark.parametrize("case", [dict(precision="tf32", kernel="eager"), dict(precision="bf16", kernel="sdpa_flash"),
                                  dict(precision="bf16", kernel="flex", checkpointing="full", window=64),
                                  dict(precision="bf16", kernel="sdpa_flash", loss="fused_ce")], ids=_case_id)
def test_peak_is_monotone_and_max_batch_is_consistent(case):
    spec = to_spec(SEED_SHAPE, **case)
    peaks = [predict_peak_memory(spec.with_batch_size(b)).peak_mib for b in range(1, 130)]
    assert all(x <= y for x, y in zip(peaks, peaks[1:]))
    for budget in (2_000.0, 40_000.0, 140_000.0):
        b = predict_max_batch_size(spec, budget)
        assert b >= 1
        assert predict_peak_memory(spec.with_batch_size(b)).peak_mib <= budget
        assert predict_peak_memory(spec.with_batch_size(b + 1)).peak_mib > budget
    assert predict_max_batch_size(spec, 10.0) == 0


def test_techniques_rank_as_expected_at_the_seed_shape():
    peak = {name: predict_peak_memory(to_spec(SEED_SHAPE, **kw)).peak_mib for name, kw in {
        "fp32": dict(precision="fp32", kernel="eager"),
        "flash": dict(precision="bf16", kernel="sdpa_flash"),
        "flash_gradcp": dict(precision="bf16", kernel="sdpa_flash", checkpointing="full"),
        "flash_fused": dict(precision="bf16", kernel="sdpa_flash", loss="fused_ce"),
    }.items()}
    assert peak["fp32"] > peak["flash"] > peak["flash_gradcp"]
    assert peak["flash_fused"] < peak["flash"] / 2  # the logits dominate this small model


def test_optimizer_step_is_the_peak_for_tiny_batches():
    bd = predict_peak_memory(to_spec(SEED_SHAPE, precision="bf16", kernel="sdpa_flash", loss="fused_ce",
                                     batch_size=1, seq_len=64))
    assert bd.phase == "optimizer_step"
    assert bd.peak_mib == pytest.approx(bd.params_mib * 5 + bd.overhead_mib, rel=0.01)  # 20 bytes per param


def test_calibrate_recovers_known_constants():
    truth = MemoryConstants(activation_scale={"bf16/eager/none": 1.3, "fp32/eager/none": 0.9,
                                             "bf16/sdpa_flash/full": 1.1}, overhead_mib=321.0)
    grid = [to_spec(SEED_SHAPE, batch_size=b, **kw) for b in (4, 16, 48) for kw in (
        dict(precision="bf16", kernel="eager"), dict(precision="fp32", kernel="eager"),
        dict(precision="bf16", kernel="sdpa_flash", checkpointing="full"))]
    measurements = [(spec, predict_peak_memory(spec, constants=truth).peak_mib) for spec in grid]
    fitted = calibrate(measurements)
    assert fitted.overhead_mib == pytest.approx(321.0, abs=0.5)
    for key, value in truth.activation_scale.items():
        assert fitted.scale(key) == pytest.approx(value, rel=1e-3)
    for spec, measured in measurements:
        assert predict_peak_memory(spec, constants=fitted).peak_mib == pytest.approx(measured, rel=1e-4)


def test_trial_config_adapter():
    from trainable.config import TrialConfig

    cfg = TrialConfig(technique="flash", data_dir="unused", vocab_size=50257, batch_size=8)
    spec = to_spec(cfg)
    assert spec.kernel in ("sdpa_flash", "flash_attn") and spec.precision == "bf16" and spec.device == "cuda"
    assert to_spec(dataclasses.replace(cfg, technique="baseline", precision=None, attention=None)).kernel == "eager"
    with pytest.raises(ValueError, match="vocab_size"):
        to_spec(TrialConfig(technique="flash", data_dir="unused"))
    bd = predict_peak_memory(cfg)
    assert bd.peak_mib > bd.params_mib * 4 and bd.reserved_mib >= bd.peak_mib


@pytest.mark.cuda
@pytest.mark.parametrize("case", [dict(precision="tf32", kernel="eager"), dict(precision="bf16", kernel="sdpa_flash"),
                                  dict(precision="bf16", kernel="sdpa_flash", checkpointing="full")], ids=_case_id)
def test_prediction_close_to_cuda_peak(case):
    """Uncalibrated defaults within 25% of max_memory_allocated over two real AdamW steps."""
    spec = MemorySpec(**{**SEED_SHAPE, "n_layers": 2, "batch_size": 8}, **{**case, "device": "cuda"})
    device = torch.device("cuda")
    model = _build(spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=spec.autocast):
            loss = standard_cross_entropy(model(idx), model.output_weight, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated(device) / MIB
    assert predict_peak_memory(spec).peak_mib == pytest.approx(measured, rel=0.25)


# -- long sequences: quadratic for eager, linear for fused kernels ------------------------------------------------


def _peak_bytes(seq_len: int, batch_size: int, **kw) -> tuple[float, str]:
    bd = predict_peak_memory(to_spec(SEED_SHAPE, vocab_size=10000, seq_len=seq_len, batch_size=batch_size, **kw))
    return bd.peak_mib * MIB, bd.phase


@pytest.mark.parametrize("precision, probs_bytes, backward_bytes", [("tf32", 4, 12), ("bf16", 6, 10)])
def test_eager_peak_is_quadratic_in_seq_len_with_the_models_s2_coefficient(precision, probs_bytes, backward_bytes):
    """f(3s) - 2 f(2s) + f(s) = 2 C s^2 for f = A + B s + C s^2: C is every s^2 term the step holds at its peak
    (backward through the top layer's attention): each layer's probabilities and ~mask, the backward's three fp32
    score-sized buffers (less the released bf16 probabilities under bf16), and the cached mask."""
    s, b, layers, heads = 4096, 2, SEED_SHAPE["n_layers"], SEED_SHAPE["n_heads"]
    (f1, p1), (f2, p2), (f3, p3) = (_peak_bytes(k * s, b, precision=precision, kernel="eager") for k in (1, 2, 3))
    assert p1 == p2 == p3 == "backward_layers"
    coefficient = layers * (probs_bytes * heads * b + 1) + backward_bytes * heads * b + 1
    assert f3 - 2 * f2 + f1 == pytest.approx(2 * coefficient * s * s, rel=1e-9)


@pytest.mark.parametrize("kernel, window", [("sdpa_flash", None), ("flex", 256), ("flex", None)])
def test_fused_kernels_peak_is_linear_in_seq_len_and_window_free(kernel, window):
    s, b = 2048, 2
    peaks = [_peak_bytes(k * s, b, precision="bf16", kernel=kernel, window=window) for k in (1, 2, 3)]
    (f1, _), (f2, _), (f3, _) = peaks
    assert f3 - 2 * f2 + f1 == pytest.approx(0, abs=1.0)
    assert peaks == [_peak_bytes(k * s, b, precision="bf16", kernel="sdpa_flash") for k in (1, 2, 3)]


def test_at_fixed_tokens_per_batch_only_eager_grows_with_seq_len():
    """tokens = b s fixed: fused kernels change only by the position table (s x h params, AdamW states) and the
    positions' ids; eager grows with a s^2 b = a s tokens."""
    tokens, h = 16384, SEED_SHAPE["d_model"]
    flash = {s: _peak_bytes(s, tokens // s, precision="bf16", kernel="sdpa_flash") for s in (512, 2048, 8192)}
    assert {phase for _, phase in flash.values()} == {"backward_start"}
    assert flash[8192][0] - flash[512][0] == pytest.approx((12 * h + 8) * (8192 - 512), rel=1e-9)
    eager = [_peak_bytes(s, tokens // s, precision="bf16", kernel="eager")[0] for s in (512, 2048, 8192)]
    assert eager[2] - eager[1] > 3 * (eager[1] - eager[0]) > 0  # linear in s at fixed tokens: 6144 vs 1536 steps
    assert eager[2] > 10 * flash[8192][0]
