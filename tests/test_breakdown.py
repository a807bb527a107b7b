"""Where the memory goes, on CPU: the predicted breakdown's arithmetic for every technique, the replay and
attribution of a hand-built allocator trace, and the recorder's hooks on a real model (markers on CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from contract.keys import BREAKDOWN_KEYS, MEMORY_COMPONENTS
from contract.techniques import TECHNIQUES
from trainable import TrialConfig
from trainable.breakdown import (
    MARKER_FUNCTION, MIB, Block, Event, Frame, FrameRules, Marker, attribute, blocks_at_start, block_size,
    live_blocks, not_measured, parse_trace, replay,
)
from trainable.breakdown_probe import StepRecorder, _weight_cast, predicted_breakdown, project_rules
from trainable.memory_model import predict_peak_memory

SEED = dict(n_layers=6, d_model=512, n_heads=8, ff_dim=2048, seq_len=512, vocab_size=10000)
SEED_REPORT = dict(n_layers=4, d_model=256, n_heads=8, ff_dim=1024, seq_len=256, vocab_size=50257)
MODELLED = [t for t, s in TECHNIQUES.items() if s.get("checkpointing") != "selective"]


def _config(technique: str, shape: dict, batch_size: int, **kw) -> TrialConfig:
    window = {"window": 16} if TECHNIQUES[technique].get("attention") == "window" else {}
    return TrialConfig.from_dict({"technique": technique, "data_dir": "/d", "batch_size": batch_size, **shape,
                                  **window, **kw})


# -- predicted ------------------------------------------------------------------------------------


@pytest.mark.parametrize("technique", MODELLED)
@pytest.mark.parametrize("shape, batch_size", [(SEED, 1), (SEED, 128), (SEED_REPORT, 32), (SEED_REPORT, 512)],
                         ids=["seed-bs1", "seed-bs128", "report-bs32", "report-bs512"])
def test_predicted_components_sum_to_the_peak_in_every_phase(technique, shape, batch_size):
    bd = predict_peak_memory(_config(technique, shape, batch_size))
    assert set(bd.components_mib) == set(MEMORY_COMPONENTS) and min(bd.components_mib.values()) >= 0
    assert sum(bd.components_mib.values()) == pytest.approx(bd.peak_mib, rel=1e-9)
    assert bd.components_mib == bd.phase_components_mib[bd.phase]
    for phase, components in bd.phase_components_mib.items():
        assert sum(components.values()) == pytest.approx(bd.phases_mib[phase], rel=1e-9), phase
        assert min(components.values()) >= 0, phase
    assert bd.components_mib["params"] == pytest.approx(bd.params_mib)
    assert bd.components_mib["optimizer"] >= bd.optimizer_states_mib


def test_predicted_components_say_where_the_seed_report_peak_goes():
    bd = predict_peak_memory(_config("baseline", SEED_REPORT, 128, vocab_size=50257))
    c, e_mib = bd.components_mib, 128 * 256 * 50257 / MIB
    assert bd.phase == "backward_start"
    assert c["logits_loss"] == pytest.approx(12 * e_mib, rel=0.01)  # log-probs + two gradients, fp32
    assert c["weight_copies"] == 0 and c["grads"] == 0  # fp32: no copies; no gradient stored yet
    flash = predict_peak_memory(_config("flash", SEED_REPORT, 128)).components_mib
    assert flash["act_attention"] < c["act_attention"] / 3 and flash["weight_copies"] > 0


def test_the_trials_predicted_keys_cover_the_contract_and_are_nan_where_not_modelled():
    keys = {**not_measured(), **predicted_breakdown(_config("bf16", SEED_REPORT, 32), 50257, None)}
    assert set(keys) == set(BREAKDOWN_KEYS)
    predicted = [keys[f"predicted_{c}_mib"] for c in MEMORY_COMPONENTS]
    assert sum(predicted) == pytest.approx(predict_peak_memory(_config("bf16", SEED_REPORT, 32)).peak_mib)
    assert keys["predicted_slack_mib"] > 0 and math.isnan(keys["measured_other_mib"])
    for cfg in (_config("sac", SEED_REPORT, 32), _config("flash_compile", SEED_REPORT, 32)):
        assert all(math.isnan(v) for v in predicted_breakdown(cfg, 50257, None).values())


# -- replay and attribution of a hand-built trace ----------------------------------------------------


RULES = FrameRules(model_ranges={"act_attention": (30, 45), "act_mlp": (48, 57)})
MODEL = "/x/trainable/model.py"
ATTN = (Frame("/t/torch/nn/modules/linear.py", 125, "forward"), Frame(MODEL, 40, "forward"), Frame(MODEL, 67, "forward"))
MLP = (Frame(MODEL, 55, "forward"), Frame(MODEL, 68, "forward"))
NORM = (Frame("/t/torch/nn/modules/normalization.py", 217, "forward"), Frame(MODEL, 67, "forward"))
RESIDUAL = (Frame(MODEL, 67, "forward"),)
LOSS = (Frame("/x/trainable/losses.py", 25, "standard_cross_entropy"),)
SEEDGRAD = (Frame("/t/torch/autograd/__init__.py", 88, "_make_grads"),)
CLIP = (Frame("/t/torch/nn/utils/clip_grad.py", 40, "clip_grad_norm_"),)
MARK = (Frame("/x/trainable/breakdown_probe.py", 50, MARKER_FUNCTION),)


def _marker(addr: int) -> list[Event]:
    return [Event("alloc", addr, 1, MARK), Event("free_requested", addr, 1), Event("free_completed", addr, 1)]


def _step() -> tuple[list[Event], dict[int, Block], list[Marker]]:
    """Params (4 KiB at 0x1000) and Adam states (8 KiB at 0x10000) live throughout; a forward, a backward whose
    peak holds a frameless loss gradient and a parameter's .grad, an optimizer step; markers interleaved."""
    events = [
        *_marker(0x90),  # start of the record (context: logits_loss)
        Event("alloc", 0x20000, 1000, ATTN),  # rounds to 1024
        Event("alloc", 0x30000, 2048, MLP),
        Event("alloc", 0x40000, 512, NORM),
        Event("alloc", 0x50000, 4096, RESIDUAL),
        Event("alloc", 0x60000, 300, ()),  # forward allocation nobody claims? (frameless: starts backward)
        Event("free_requested", 0x60000, 300),
        Event("alloc", 0x70000, 8192, LOSS),  # log-probs (allocated in backward here: still the loss's)
        Event("alloc", 0x80000, 16, SEEDGRAD),
        Event("segment_alloc", 0x100000, 2 << 20),
        Event("alloc", 0x100000, 8192, ()),  # frameless backward: the loss's gradient (context logits_loss)
        *_marker(0x91),  # context -> act_mlp
        Event("alloc", 0x110000, 4096, ()),  # a weight gradient, tagged as grads after the peak
        Event("free_requested", 0x20000, 1000),  # an activation freed: the peak was just before
        *_marker(0x92),  # tag 0x110000 as grads
        Event("alloc", 0x120000, 64, CLIP),  # optimizer phase
        Event("free_requested", 0x110000, 4096),
    ]
    live_at_end = {a: Block(a, s) for a, s in ((0x1000, 4096), (0x10000, 8192), (0x30000, 2048), (0x40000, 512),
                                               (0x50000, 4096), (0x70000, 8192), (0x80000, 512), (0x100000, 8192),
                                               (0x120000, 512))}
    markers = [Marker("context", "logits_loss"), Marker("context", "act_mlp"), Marker("tag", "grads", 0x110000)]
    return events, live_at_end, markers


def test_replay_finds_the_peak_and_attributes_every_live_block():
    events, live_at_end, markers = _step()
    result = replay(events, live_at_end, markers, RULES, reserved_at_end=(8 << 20),
                    identities={0x1000: "params", 0x10000 + 8: "optimizer"})
    expected = {"params": 4096, "optimizer": 8192, "act_attention": 1024, "act_mlp": 2048, "act_norm": 512,
                "act_residual": 4096, "logits_loss": 8192 + 512 + 8192, "grads": 4096}
    assert result.markers_matched and result.phase == "backward"
    assert result.components == {c: float(expected.get(c, 0)) for c in MEMORY_COMPONENTS}
    assert result.peak_bytes == sum(expected.values())
    assert result.reserved_at_peak == 8 << 20  # the segment was allocated before the peak
    report = result.report()
    assert set(report) == {k for k in BREAKDOWN_KEYS if not k.startswith("predicted_")}
    assert report["breakdown_peak_mib"] * MIB == result.peak_bytes
    assert report["measured_slack_mib"] * MIB == (8 << 20) - result.peak_bytes


def test_blocks_live_at_start_are_rebuilt_from_the_end_state():
    events, live_at_end, _ = _step()
    start = blocks_at_start(events, live_at_end)
    assert sorted(start) == [0x1000, 0x10000]  # the rest was allocated during the step
    freed_before = [Event("free_requested", 0x5000, 700)]  # live at start, freed during the step
    assert blocks_at_start(freed_before, {})[0x5000].size == block_size(700) == 1024


def test_the_peak_can_be_the_start_and_markers_must_match():
    live = {0x1000: Block(0x1000, 4096)}
    result = replay([*_marker(0x90), Event("free_requested", 0x1000, 4096)], {}, [Marker("context", "x")], RULES,
                    identities={0x1000: "params"})
    assert result.peak_bytes == 4096 and result.components["params"] == 4096 and result.phase == "forward"
    missing = replay([Event("alloc", 0x2000, 10, ATTN)], live, [Marker("context", "act_mlp")], RULES)
    assert not missing.markers_matched


@pytest.mark.parametrize("frames, component", [
    (ATTN, "act_attention"), (MLP, "act_mlp"), (NORM, "act_norm"), (RESIDUAL, "act_residual"), (LOSS, "logits_loss"),
    ((Frame("/x/trainable/attention.py", 60, "eager_attention"), *ATTN), "act_attention"),
    ((Frame("/x/trainable/fused_ce.py", 99, "forward"),), "logits_loss"),
    ((Frame("/t/torch/optim/adamw.py", 10, "step"),), "optimizer"),
    ((Frame("/t/torch/nn/modules/sparse.py", 190, "forward"), Frame(MODEL, 104, "forward")), "act_residual"),
    ((Frame(MODEL, 111, "logits"),), "logits_loss"), (CLIP, None), ((), None),
])
def test_frames_name_the_component(frames, component):
    assert RULES.component(frames) == component
    assert RULES.component(tuple(reversed(frames))) == component  # the order of the stack does not matter


def test_phases_move_forward_only_and_tags_win():
    assert RULES.phase_after("forward", ATTN) == "forward"
    assert RULES.phase_after("forward", SEEDGRAD) == RULES.phase_after("forward", ()) == "backward"
    assert RULES.phase_after("backward", CLIP) == "optimizer" and RULES.phase_after("optimizer", ()) == "optimizer"
    assert attribute(Block(0, 512, ATTN, tag="weight_copies"), RULES) == "weight_copies"
    assert attribute(Block(0, 512, (), "backward", "act_norm"), RULES) == "act_norm"
    assert attribute(Block(0, 512, (), "forward"), RULES) == "other"


def test_snapshot_dicts_parse():
    trace = [{"action": "alloc", "addr": 16, "size": 100, "stream": 0,
              "frames": [{"filename": MODEL, "line": 40, "name": "forward"}]}, {"action": "oom", "size": 5}]
    events = parse_trace(trace)
    assert events[0] == Event("alloc", 16, 100, (Frame(MODEL, 40, "forward"),)) and events[1].addr == 0
    segments = [{"address": 0, "total_size": 4096, "blocks": [
        {"address": 0, "size": 1024, "state": "active_allocated", "frames": []},
        {"address": 1024, "size": 3072, "state": "inactive"}]}]
    live, reserved = live_blocks(segments)
    assert list(live) == [0] and live[0].size == 1024 and reserved == 4096


# -- the recorder's hooks on a real model (CPU: the markers are allocations on the CPU) ----------------


def test_project_rules_cover_the_models_attention_and_mlp():
    import inspect

    from trainable import model

    rules = project_rules()
    for cls, component in ((model.CausalSelfAttention, "act_attention"), (model.MLP, "act_mlp")):
        line = inspect.getsourcelines(cls.forward)[1] + 1
        assert rules.component((Frame(model.__file__, line, "forward"),)) == component
    block_line = inspect.getsourcelines(model.Block.forward)[1] + 1
    assert rules.component((Frame(model.__file__, block_line, "forward"),)) == "act_residual"


def test_recorder_hooks_mark_contexts_grads_copies_and_residual_gradients(one_thread):
    from trainable import ATTENTION_BACKENDS, GPT, ModelConfig
    from trainable.losses import standard_cross_entropy

    cfg = ModelConfig(vocab_size=50, seq_len=16, n_layers=2, d_model=32, n_heads=4, ff_dim=64)
    torch.manual_seed(0)
    model = GPT(cfg, ATTENTION_BACKENDS["eager"].bind(None))
    optimizer = torch.optim.AdamW(model.parameters())
    recorder = StepRecorder(model, optimizer, torch.device("cpu"))
    recorder._install()
    try:
        x = torch.randint(0, 50, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = standard_cross_entropy(model(x), model.output_weight, x)
        copies = [m for m in recorder.markers if m.component == "weight_copies"]
        loss.backward()
    finally:
        for handle in recorder._handles:
            handle.remove()
    contexts = [m.component for m in recorder.markers if m.kind == "context"]
    per_block = ["act_mlp", "act_norm", "act_attention", "act_norm"]
    assert contexts[:1 + 2 * len(per_block)] == ["act_norm", *per_block, *per_block]  # ln_f, then each block
    assert set(contexts[1 + 2 * len(per_block):]) == {"act_residual"}  # the embeddings
    assert len(copies) == 4 * cfg.n_layers  # every Linear's bf16 weight copy, tagged during forward
    grads = {m.ptr for m in recorder.markers if m.component == "grads"}
    assert {p.grad.untyped_storage().data_ptr() for p in model.parameters()} <= grads
    assert sum(m.component == "act_residual" and m.kind == "tag" for m in recorder.markers) == 2 * cfg.n_layers + 1


def test_weight_cast_is_found_from_a_linears_output_when_backward_keeps_it():
    linear = torch.nn.Linear(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(torch.randn(2, 3, 8, requires_grad=True))
        frozen_input = linear(torch.randn(2, 3, 8))  # no input gradient: the weight's copy is not kept
    cast = _weight_cast(out.grad_fn, linear.weight)
    assert cast is not None and cast.dtype == torch.bfloat16 and cast.numel() == linear.weight.numel()
    assert _weight_cast(out.grad_fn, torch.nn.Linear(8, 16).weight) is None
    assert _weight_cast(frozen_input.grad_fn, linear.weight) is None


def test_a_cpu_trial_reports_the_predicted_breakdown_and_nan_measured(sample_dataset, one_thread):
    from trainable import run_trial

    cfg = TrialConfig(technique="bf16", data_dir=str(sample_dataset), device="cpu", n_layers=2, d_model=32,
                      n_heads=4, ff_dim=64, seq_len=64, batch_size=4, max_steps=3, eval_interval=0, eval_batches=1,
                      eval_batch_size=4, tie_embeddings=False)
    reports: list[dict] = []
    final = run_trial(cfg, reports.append)
    predicted = predict_peak_memory(cfg, vocab_size=512, device="cuda")
    assert sum(final[f"predicted_{c}_mib"] for c in MEMORY_COMPONENTS) == pytest.approx(predicted.peak_mib)
    assert final["predicted_slack_mib"] == pytest.approx(predicted.reserved_mib - predicted.peak_mib)
    assert all(math.isnan(final[f"measured_{c}_mib"]) for c in MEMORY_COMPONENTS)
    assert math.isnan(final["breakdown_peak_mib"]) and final["breakdown_phase"] is None
    assert [r["warmup"] for r in reports] == [True, False, False]  # nothing recorded on CPU: step 2 is steady


def test_a_recording_that_cannot_start_never_fails_the_step(capsys):
    """On this CPU-only torch the allocator history cannot be recorded: the step still runs, unflagged."""
    from dataclasses import dataclass

    from trainable.breakdown_probe import BreakdownProbe

    @dataclass
    class Record:
        warmup: bool = False

    probe = BreakdownProbe(_config("bf16", SEED_REPORT, 32), 50257, "eager", torch.device("cuda"))
    ran = []
    record = probe.step(lambda step, x, y: ran.append(step) or Record(), 2, 1, None, None, torch.nn.Linear(2, 2),
                        None)
    assert ran == [2] and record.warmup is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("breakdown: where the memory goes was not measured")
    keys = probe.report()
    assert math.isnan(keys["breakdown_peak_mib"]) and keys["predicted_logits_loss_mib"] > 0
