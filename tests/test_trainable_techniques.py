"""Newer techniques on CPU: selective checkpointing, fused CE, torch.compile, MFU, warm-up accounting, Ray metrics."""
from __future__ import annotations

import gc
import math
from collections import Counter
from functools import partial

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import helpers
from helpers import losses, run
from trainable import GPT, ModelConfig, RayMetricsExporter, apply_checkpointing
from trainable.checkpointing import op_name
from trainable.flops import mean_attended_keys, mfu, model_flops_per_token, non_embedding_params, peak_bf16_flops
from trainable.losses import standard_cross_entropy
from trainable.observe import GAUGES, TAG_KEYS

SMALL = ModelConfig(vocab_size=512, seq_len=64, n_layers=2, d_model=32, n_heads=4, ff_dim=64)


pytestmark = pytest.mark.usefixtures("one_thread")


tiny = partial(helpers.tiny, max_steps=4, eval_interval=2, eval_batches=1)  # helpers.tiny, 4 steps


# -- selective activation checkpointing -------------------------------------------------------------
class OpsAndLiveBytes(TorchDispatchMode):
    """Counts the aten ops that run, and can tell how many bytes of their outputs are still alive."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.outputs: list[tuple[StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[op_name(func)] += 1
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.outputs.append((StorageWeakRef(storage), storage.nbytes()))
        return out

    def live_bytes(self) -> int:
        """Bytes of the outputs' storages still alive (views of one storage counted once)."""
        gc.collect()
        live = {ref.cdata: n for ref, n in self.outputs if not ref.expired()}
        return sum(live.values())


def train_step(mode: str):
    """One forward/backward of the small model: loss, grads, bytes kept for backward, ops run in backward."""
    torch.manual_seed(0)
    model = apply_checkpointing(GPT(SMALL), mode)
    tokens = torch.randint(0, SMALL.vocab_size, (4, SMALL.seq_len + 1), generator=torch.Generator().manual_seed(1))
    with OpsAndLiveBytes() as forward:
        hidden = model(tokens[:, :-1])
    kept = forward.live_bytes() - hidden.untyped_storage().nbytes()
    loss = standard_cross_entropy(hidden, model.output_weight, tokens[:, 1:])
    with OpsAndLiveBytes() as backward:
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return loss.item(), grads, kept, backward.ops


def test_selective_checkpointing_saves_matmuls_and_recomputes_the_rest():
    loss_none, grads_none, kept_none, ops_none = train_step("none")
    loss_sac, grads_sac, kept_sac, ops_sac = train_step("selective")
    loss_full, _, kept_full, ops_full = train_step("full")
    assert loss_sac == loss_none == loss_full
    for a, b in zip(grads_sac, grads_none):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # memory kept from forward to backward: none > selective > full
    assert kept_full < kept_sac < kept_none, (kept_none, kept_sac, kept_full)
    # backward re-runs no matmul under selective (full re-runs the forward's addmm and bmm) ...
    matmuls = ("aten::addmm", "aten::mm", "aten::bmm")
    assert [ops_sac[m] for m in matmuls] == [ops_none[m] for m in matmuls]
    assert ops_full["aten::addmm"] > ops_sac["aten::addmm"] == 0 and ops_full["aten::bmm"] > ops_sac["aten::bmm"]
    # ... but recomputes the cheap ops, which no-checkpointing never runs in backward
    for cheap in ("aten::gelu", "aten::native_layer_norm", "aten::_softmax"):
        assert ops_sac[cheap] > 0 == ops_none[cheap], cheap


def test_selective_checkpointing_trial_has_the_same_curve(sample_dataset):
    plain, _ = run(tiny(sample_dataset))
    sac, _ = run(tiny(sample_dataset, checkpointing="selective"))
    assert losses(sac) == pytest.approx(losses(plain), rel=1e-6)
    assert sac[-1]["val_loss"] == pytest.approx(plain[-1]["val_loss"], rel=1e-6)
    assert sac[-1]["label"] == "sac"


# -- fused CE in a trial ----------------------------------------------------------------------------
def test_fused_ce_trial_matches_the_standard_loss(sample_dataset):
    plain, _ = run(tiny(sample_dataset))
    fused, _ = run(tiny(sample_dataset, loss="fused_ce"))
    assert losses(fused) == pytest.approx(losses(plain), rel=1e-5)
    assert fused[-1]["val_loss"] == pytest.approx(plain[-1]["val_loss"], rel=1e-5)
    assert fused[-1]["label"] == "fusedce"


# -- MFU ---------------------------------------------------------------------------------------------
def test_non_embedding_params_match_the_model():
    model = GPT(SMALL)
    embeddings = model.wte.weight.numel() + model.wpe.weight.numel()
    assert non_embedding_params(SMALL) == model.num_params() - embeddings


@pytest.mark.parametrize(("seq_len", "window"), [(64, None), (64, 1), (64, 16), (7, 3), (64, 63)])
def test_mean_attended_keys_counts_the_causal_half(seq_len, window):
    i = torch.arange(seq_len)
    distance = i[:, None] - i[None, :]
    allowed = (distance >= 0) & (distance < (window or seq_len))
    assert mean_attended_keys(seq_len, window) == pytest.approx(allowed.sum().item() / seq_len)


def test_model_flops_per_token_formula():
    d, L, T, V = SMALL.d_model, SMALL.n_layers, SMALL.seq_len, SMALL.vocab_size
    expected = 6 * (non_embedding_params(SMALL) + V * d) + 12 * L * d * (T + 1) / 2
    assert model_flops_per_token(SMALL) == pytest.approx(expected)
    assert model_flops_per_token(SMALL, window=8) < model_flops_per_token(SMALL)


@pytest.mark.parametrize(("name", "flops"), [
    ("NVIDIA H200", 989.5e12), ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835.5e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362.05e12),
    ("NVIDIA GeForce RTX 5090", 209.5e12),
])
def test_peak_flops_table(name, flops):
    assert peak_bf16_flops(name) == flops


def test_peak_flops_unknown_is_nan_and_override_wins():
    assert math.isnan(peak_bf16_flops("Some Future GPU")) and math.isnan(peak_bf16_flops(None))
    assert peak_bf16_flops(None, 1e12) == 1e12 and peak_bf16_flops("NVIDIA H200", 5e14) == 5e14
    assert math.isnan(mfu(1e6, 1e6, math.nan))


def test_trial_reports_mfu_and_steady_throughput(sample_dataset):
    reports, _ = run(tiny(sample_dataset, max_steps=5, peak_flops=1e12))
    flops = model_flops_per_token(SMALL)
    for r in reports:
        assert r["model_flops_per_token"] == pytest.approx(flops) and r["peak_flops"] == 1e12
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e12)
        assert r["compiling"] is False and r["warmup"] is (r["step"] == 1) and r["compile_time_s"] == 0.0
    final = reports[-1]
    steady = reports[1:]  # the first step of a process is warm-up
    expected = sum(256 for _ in steady) / sum(r["step_time_s"] for r in steady)
    assert final["steady_tokens_per_s"] == pytest.approx(expected)
    assert final["steady_mfu"] == pytest.approx(expected * flops / 1e12)
    _, without_peak = run(tiny(sample_dataset, max_steps=1))  # CPU, no override: unknown peak
    assert math.isnan(without_peak["mfu"]) and math.isnan(without_peak["peak_flops"])
    assert math.isnan(without_peak["steady_tokens_per_s"])  # its only step was warm-up


# -- torch.compile (the one CPU compile in the suite: ~35 s cold, a few s with inductor's cache) ----
@pytest.mark.slow
def test_compile_with_selective_checkpointing_on_cpu(sample_dataset):
    eager, _ = run(tiny(sample_dataset, checkpointing="selective"))
    compiled, _ = run(tiny(sample_dataset, checkpointing="selective", compile=True))
    assert compiled[-1]["label"] == "sac_compile"
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert compiled[-1]["val_loss"] == pytest.approx(eager[-1]["val_loss"], rel=1e-4)
    assert [r["compiling"] for r in compiled] == [True, False, False, False]  # forward + lazy backward in step 1
    assert [r["warmup"] for r in compiled] == [True, False, False, False]
    final = compiled[-1]
    assert final["compile_time_s"] == pytest.approx(compiled[0]["step_time_s"]) and final["compile_time_s"] > 0
    assert final["steady_tokens_per_s"] > 256 / compiled[0]["step_time_s"]  # compilation is not steady-state speed


# -- Ray metrics ----------------------------------------------------------------------------------
def test_ray_exporter_sets_gauges_inside_ray(ray_local):
    from ray.util.metrics import Gauge

    exporter = RayMetricsExporter("bf16_flash", 32)
    metrics = {"label": "bf16_flash", "loss": 2.5, "tokens_per_s": 1e5, "mem_step_peak_mib": math.nan, "mfu": 0.4}
    exporter.record(metrics)
    exporter.record({**metrics, "loss": 2.25, "mem_step_peak_mib": 1234.0})
    assert exporter.enabled is True and exporter.num_records == 2
    assert set(exporter.gauges) == set(GAUGES) and all(isinstance(g, Gauge) for g in exporter.gauges.values())
    assert all(g._tag_keys == TAG_KEYS for g in exporter.gauges.values())
    assert exporter.tags == {"trial": "bf16_flash_bs32", "label": "bf16_flash", "batch_size": "32"}
    assert exporter.last_values == {"memeff_loss": 2.25, "memeff_tokens_per_s": 1e5,
                                    "memeff_step_peak_mib": 1234.0, "memeff_mfu": 0.4}
