"""The LM head's switches on CPU: loss_precision (fp32 upcast | compute dtype) and tie_embeddings.

The math (the loss in bf16 equals the fp32 loss within bf16 tolerance and keeps bf16 log-probabilities; the
untied model has V x d more parameters and a head of its own; checkpointing leaves every loss unchanged with
each switch), the one validation (combinations that mean nothing are refused with one line), the labels, and the
memory model's account of both (exact byte differences).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from contract.techniques import technique_family, technique_label
from trainable import ATTENTION_BACKENDS, GPT, ConfigError, ModelConfig, TrialConfig, apply_checkpointing
from trainable.losses import loss_for
from trainable.memory_model import MIB, predict_peak_memory, to_spec

TINY = ModelConfig(vocab_size=97, seq_len=32, n_layers=2, d_model=32, n_heads=4, ff_dim=64)
SEED_REPORT = dict(n_layers=4, d_model=256, n_heads=8, ff_dim=1024, seq_len=256, vocab_size=50257)
SWITCHES = [dict(loss_precision=lp, tie_embeddings=tie) for lp in ("fp32", "compute") for tie in (True, False)]

pytestmark = pytest.mark.usefixtures("one_thread")


def build(tie=True, checkpointing="none", seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(TINY, tie_embeddings=tie), ATTENTION_BACKENDS["eager"].bind(None))
    return apply_checkpointing(model, checkpointing)


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, TINY.vocab_size, (n, TINY.seq_len + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def loss_and_grads(model: GPT, loss_precision: str):
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_for("standard", loss_precision)(model(x), model.output_weight, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_loss_in_bf16_equals_the_fp32_loss_within_bf16_tolerance():
    fp32, grads32 = loss_and_grads(build(), "fp32")
    bf16, grads16 = loss_and_grads(build(), "compute")
    assert fp32.dtype == bf16.dtype == torch.float32  # the mean is fp32 either way
    assert bf16.item() == pytest.approx(fp32.item(), rel=1e-2)
    for name, g in grads32.items():
        assert (grads16[name] - g).norm() <= 0.05 * g.norm() + 1e-6, name


def _saved_logit_sized(loss_precision: str) -> list[torch.Tensor]:
    """The N x V tensors autograd keeps from forward to backward (the log-probabilities)."""
    model, (x, y) = build(), batch()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_for("standard", loss_precision)(model(x), model.output_weight, y)
    logit_sized = {t.untyped_storage().data_ptr(): t for t in saved if t.shape == (4 * TINY.seq_len, TINY.vocab_size)}
    return list(logit_sized.values())  # (log_softmax and nll_loss both keep the same one)


def test_the_loss_precision_is_the_dtype_of_the_saved_log_probabilities():
    for loss_precision, dtype in (("fp32", torch.float32), ("compute", torch.bfloat16)):
        assert [t.dtype for t in _saved_logit_sized(loss_precision)] == [dtype]


def test_untied_model_has_its_own_head_and_v_times_d_more_parameters():
    tied, untied = build(tie=True), build(tie=False)
    assert untied.num_params() - tied.num_params() == TINY.vocab_size * TINY.d_model
    assert tied.output_weight is tied.wte.weight
    assert untied.output_weight is untied.lm_head and untied.output_weight is not untied.wte.weight
    shared = tied.state_dict()
    for name, value in untied.state_dict().items():  # same seed, same weights for everything they share
        if name != "lm_head":
            assert torch.equal(value, shared[name]), name
    _, grads = loss_and_grads(untied, "fp32")
    x, _ = batch()
    unseen = torch.ones(TINY.vocab_size, dtype=torch.bool)
    unseen[x.unique()] = False
    assert grads["wte.weight"][unseen].abs().max() == 0  # the input embedding learns only from its lookups
    assert grads["lm_head"][unseen].abs().max() > 0  # the head learns from every logit


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: technique_label({"precision": "bf16", **s}))
def test_checkpointing_leaves_every_loss_unchanged_with_each_switch(switches):
    def losses(checkpointing: str) -> list[float]:
        model = build(tie=switches["tie_embeddings"], checkpointing=checkpointing, seed=1)
        opt, out = torch.optim.AdamW(model.parameters(), lr=1e-2), []
        for step in range(3):
            x, y = batch(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_for("standard", switches["loss_precision"])(model(x), model.output_weight, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    assert losses("none") == pytest.approx(losses("full"), rel=1e-6, abs=1e-6)


def _cfg(**kw) -> TrialConfig:
    return TrialConfig.from_dict({"data_dir": "/d", **kw})


@pytest.mark.parametrize("overrides, message", [
    (dict(technique="baseline", loss_precision="compute"), "fp32 on a 'tf32' run"),
    (dict(technique="gradcp", loss_precision="compute"), "use it with bf16 precision"),
    (dict(technique="fp32", loss_precision="compute"), "fp32 on a 'fp32' run"),
    (dict(technique="fused_ce", loss_precision="compute"), "fused_ce computes its softmax in fp32"),
    (dict(technique="bf16", loss_precision="bf16"), "unknown loss_precision 'bf16'"),
    (dict(technique="bf16", tie_embeddings="no"), "tie_embeddings must be true or false"),
])
def test_meaningless_combinations_are_refused_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        _cfg(**overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, label", [
    (dict(technique="bf16"), "bf16"),  # defaults change no existing label
    (dict(technique="flash", loss_precision="compute"), "bf16_flash_bf16loss"),
    (dict(technique="baseline", tie_embeddings=False), "untied"),
    (dict(technique="flash_gradcp", loss_precision="compute", tie_embeddings=False), "bf16_flash_gradcp_bf16loss_untied"),
    (dict(technique="fused_ce_compile", tie_embeddings=False), "bf16_flash_fusedce_untied_compile"),
    (dict(technique="window", window=16, loss_precision="compute", checkpointing="selective"),
     "bf16_window16_sac_bf16loss"),
])
def test_every_other_switch_composes_and_the_label_says_so(overrides, label):
    cfg = _cfg(**overrides)
    assert cfg.label == label and TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert technique_family(cfg) == label.replace("_flash", "").replace("_window16", "")


def test_sweep_cli_offers_both_switches():
    from sweep.run import build_parser

    args = build_parser().parse_args(["--loss-precision", "compute", "--no-tie-embeddings"])
    assert (args.loss_precision, args.tie_embeddings) == ("compute", False)


def _phases(**kw) -> dict[str, float]:
    return {k: v * MIB for k, v in predict_peak_memory(to_spec(SEED_REPORT, batch_size=32, **kw)).phases_mib.items()}


def test_memory_model_counts_the_loss_in_bf16_as_6e_instead_of_12e():
    e = 32 * 256 * 50257
    fp32, compute = _phases(precision="bf16", kernel="sdpa_flash"), \
        _phases(precision="bf16", kernel="sdpa_flash", loss_precision="compute")
    assert fp32["backward_start"] - compute["backward_start"] == pytest.approx(6 * e)  # 12E -> 6E
    assert fp32["forward"] - compute["forward"] == pytest.approx(6 * e)  # no fp32 copy, bf16 log-probs: 2 + 4E less
    with pytest.raises(ValueError, match="loss_precision"):
        to_spec(SEED_REPORT, batch_size=32, loss_precision="bf16")


def test_memory_model_counts_an_untied_head_in_params_grads_and_states():
    vd = 50257 * 256
    tied, untied = _phases(precision="tf32"), _phases(precision="tf32", tie_embeddings=False)
    assert untied["backward_start"] - tied["backward_start"] == pytest.approx(12 * vd)  # params + AdamW states
    assert untied["optimizer_step"] - tied["optimizer_step"] == pytest.approx(20 * vd)  # + grads + temporary
    spec = to_spec(_cfg(technique="flash", vocab_size=50257, tie_embeddings=False, loss_precision="compute"))
    assert spec.tie_embeddings is False and spec.loss_precision == "compute"


def test_a_trial_trains_with_the_switches_it_was_given(sample_dataset, one_thread):
    """The switches reach the run: the untied trial has V x d more parameters, the bf16-loss trial a different
    training loss (its log-softmax is bf16) but the same fp32 validation, so val_ppl compares across switches."""
    from trainable import run_trial

    def final(**switches):
        cfg = TrialConfig.from_dict(dict(data_dir=str(sample_dataset), device="cpu", n_layers=1, d_model=32,
                                         n_heads=2, ff_dim=64, seq_len=32, batch_size=4, max_steps=2,
                                         eval_batches=1, eval_batch_size=4, technique="bf16", **switches))
        return run_trial(cfg, lambda m: None)

    plain, untied, bf16loss = final(), final(tie_embeddings=False), final(loss_precision="compute")
    assert untied["num_params"] - plain["num_params"] == 512 * 32 and untied["label"].endswith("untied")
    assert bf16loss["label"].endswith("bf16loss") and bf16loss["loss"] != plain["loss"]
    assert bf16loss["loss"] == pytest.approx(plain["loss"], rel=2e-2)
