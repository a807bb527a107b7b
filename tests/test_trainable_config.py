"""TrialConfig: presets, labels, the dict round trip and every rejection (pure; no torch work)."""
from __future__ import annotations

import dataclasses
import math

import pytest

from trainable import CHECKPOINTING, LOSSES, TECHNIQUES, ConfigError, TrialConfig, technique_label
from trainable.config import ATTENTIONS, PRECISIONS

BASE = {"data_dir": "/data/prepared"}


def cfg(**kw) -> TrialConfig:
    return TrialConfig.from_dict({**BASE, **kw})


def test_defaults_are_the_seed_model_and_baseline():
    c = cfg()
    assert (c.n_layers, c.d_model, c.n_heads, c.ff_dim, c.seq_len) == (6, 512, 8, 2048, 512)
    assert (c.precision, c.attention, c.checkpointing, c.loss) == ("tf32", "standard", "none", "standard")
    assert c.compile is False and c.peak_flops is None
    assert c.lr == 3e-4 and c.window is None and c.vocab_size is None and c.label == "baseline"


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_round_trip_for_every_preset(technique):
    c = cfg(technique=technique, window=16 if TECHNIQUES[technique]["attention"] == "window" else None)
    d = c.to_dict()
    assert TrialConfig.from_dict(d) == c
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in d.values())  # flat, JSON-able
    for switch, value in TECHNIQUES[technique].items():
        assert d[switch] == value
    assert isinstance(d["compile"], bool) and d["loss"] in LOSSES and d["checkpointing"] in CHECKPOINTING


@pytest.mark.parametrize(
    ("switches", "label"),
    [
        ({"technique": "baseline"}, "baseline"),
        ({"technique": "fp32"}, "fp32"),
        ({"technique": "bf16"}, "bf16"),
        ({"technique": "flash"}, "bf16_flash"),
        ({"technique": "window", "window": 16}, "bf16_window16"),
        ({"technique": "gradcp"}, "gradcp"),
        ({"technique": "flash", "checkpointing": "full"}, "bf16_flash_gradcp"),
        ({"technique": "flash_gradcp"}, "bf16_flash_gradcp"),
        ({"precision": "bf16", "checkpointing": "full"}, "bf16_gradcp"),
        ({"attention": "window", "window": 8}, "window8"),
        ({"checkpointing": "selective"}, "sac"),
        ({"technique": "sac"}, "sac"),
        ({"technique": "flash_sac"}, "bf16_flash_sac"),
        ({"technique": "fused_ce"}, "bf16_flash_fusedce"),
        ({"loss": "fused_ce"}, "fusedce"),
        ({"technique": "flash", "compile": True}, "bf16_flash_compile"),
        ({"technique": "flash_compile"}, "bf16_flash_compile"),
        ({"technique": "window_compile", "window": 16}, "bf16_window16_compile"),
        ({"technique": "fused_ce_compile"}, "bf16_flash_fusedce_compile"),
        ({"technique": "fused_ce", "checkpointing": "selective", "compile": True}, "bf16_flash_sac_fusedce_compile"),
        ({"technique": "window_compile", "window": 16, "checkpointing": "full"}, "bf16_window16_gradcp_compile"),
    ],
)
def test_label_is_derived_from_switches(switches, label):
    c = cfg(**switches)
    assert technique_label(c) == label == c.label


def test_explicit_switch_overrides_preset():
    c = cfg(technique="bf16", precision="fp32", checkpointing="full")
    assert (c.precision, c.checkpointing, c.label) == ("fp32", "full", "fp32_gradcp")
    c = cfg(technique="fused_ce_compile", loss="standard", compile=False)
    assert (c.loss, c.compile, c.label) == ("standard", False, "bf16_flash")


def test_compile_accepts_numpy_bools_from_tune():
    np = pytest.importorskip("numpy")
    c = cfg(compile=np.bool_(True), peak_flops=np.float64(989.5e12))
    assert c.compile is True and type(c.compile) is bool and c.peak_flops == 989.5e12
    assert TrialConfig.from_dict(c.to_dict()) == c


def test_registries_define_the_accepted_names():
    assert set(CHECKPOINTING) >= {"none", "full", "selective"} and {"standard", "fused_ce"} <= set(LOSSES)
    assert set(PRECISIONS) == {"fp32", "tf32", "bf16"} and set(ATTENTIONS) == {"standard", "flash", "window"}


def test_numeric_strings_from_tune_or_json_are_normalised():
    c = cfg(batch_size=8.0, window=4.0, attention="window", lr=1)
    assert c.batch_size == 8 and isinstance(c.batch_size, int) and c.window == 4 and isinstance(c.lr, float)


REJECTIONS = [
    ({"attention": "window", "window": 0}, "window must be between 1 and seq_len - 1"),
    ({"attention": "window", "window": -3}, "window must be between 1 and seq_len - 1"),
    ({"attention": "window", "window": 512}, "window must be between 1 and seq_len - 1"),
    ({"technique": "window", "window": 64, "seq_len": 64}, "window must be between 1 and seq_len - 1"),
    ({"technique": "window"}, "needs a window size"),
    ({"technique": "bf16", "window": 16}, "needs sliding-window attention"),
    ({"technique": "flash", "window": 16}, "needs sliding-window attention"),
    ({"technique": "flash", "device": "cpu"}, "flash attention needs a CUDA GPU; use --device cuda or technique bf16"),
    ({"technique": "window", "window": 8, "kernel": "flex", "device": "cpu"}, "flash attention needs a CUDA GPU"),
    ({"attention": "flash"}, "flash attention needs bf16 precision"),
    ({"technique": "flash", "precision": "fp32"}, "flash attention needs bf16 precision"),
    ({"technique": "window", "window": 8, "kernel": "flash_attn", "precision": "tf32"}, "needs bf16"),
    ({"kernel": "sdpa_flash"}, "cannot run 'standard' attention"),
    ({"batch_size": 0}, "batch size must be >= 1"),
    ({"technique": "flsh"}, "unknown technique 'flsh' (did you mean 'flash'?)"),
    ({"precision": "bf61"}, "unknown precision 'bf61' (did you mean 'bf16'?)"),
    ({"checkpointing": "ful"}, "unknown checkpointing 'ful' (did you mean 'full'?)"),
    ({"attention": "flahs"}, "unknown attention 'flahs'"),
    ({"loss": "fused"}, "unknown loss 'fused'"),
    ({"batchsize": 8}, "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    ({"d_model": 100, "n_heads": 8}, "d_model 100 is not divisible by n_heads 8"),
    ({"n_layers": 0}, "n_layers must be >= 1"),
    ({"data_dir": None}, "data_dir is required"),
    ({"data_dir": ""}, "data_dir is required"),
    ({"lr": 0}, "lr must be a positive number"),
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an int"),
    ({"batch_size": "8"}, "batch_size must be an int"),
    ({"gpu_memory_gb": 0}, "gpu_memory_gb must be a positive number"),
    ({"gpu_memory_gb": 4, "device": "cpu"}, "gpu_memory_gb limits a CUDA GPU"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"schedule": "linear"}, "unknown schedule 'linear'"),
    ({"compile": "yes"}, "compile must be true or false, got 'yes'"),
    ({"compile": 1}, "compile must be true or false, got 1"),
    ({"checkpointing": "selectiv"}, "unknown checkpointing 'selectiv' (did you mean 'selective'?)"),
    ({"peak_flops": 0}, "peak_flops must be a positive number"),
    ({"peak_flops": float("inf")}, "peak_flops must be a finite number"),
]


@pytest.mark.parametrize(("overrides", "message"), REJECTIONS)
def test_rejected_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        cfg(**overrides)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_from_dict_rejects_non_dicts():
    with pytest.raises(ConfigError, match="must be a dict"):
        TrialConfig.from_dict(["batch_size", 8])


def test_tokens_per_step_and_window_on_cpu_is_allowed():
    c = cfg(technique="window", window=16, device="cpu", batch_size=4, seq_len=64)
    assert c.tokens_per_step == 256 and c.label == "bf16_window16" and not math.isnan(c.lr)


def test_relative_data_dir_becomes_absolute(tmp_path, monkeypatch):
    """Tune runs each trial in its own working directory: the path is fixed where the config is made."""
    monkeypatch.chdir(tmp_path)
    c = TrialConfig.from_dict({"data_dir": "prepared"})
    assert c.data_dir == str(tmp_path / "prepared") and TrialConfig.from_dict(c.to_dict()) == c


FLOAT_FIELDS = [f.name for f in dataclasses.fields(TrialConfig) if str(f.type).split(" |")[0] == "float"]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_every_float_knob_refuses_what_is_not_a_finite_number(name, value):
    """`--lr nan`, `--weight-decay inf`, `--checkpoint-minutes inf` ...: one line, before anything runs."""
    with pytest.raises(ConfigError) as info:
        cfg(**{name: value})
    assert str(info.value) == f"{name} must be a finite number, got {value}"


def test_the_float_knobs_are_the_ones_the_cli_offers():
    assert {"lr", "weight_decay", "min_lr_ratio", "grad_clip", "gpu_memory_gb", "checkpoint_minutes",
            "peak_flops"} <= set(FLOAT_FIELDS)
