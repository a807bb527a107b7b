"""The sweep end to end on a local Ray (tiny model, few steps) and the CLI's refusals of bad input."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest

from contract.experiment import GRID_KEY, KIND_KEY
from sweep import PRESETS, SweepConfig, SweepError, build_grid, plan_sweep, run_sweep, trial_name
from sweep.orchestrate import results_table
from sweep.tuning import param_space

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_layers": 1, "d_model": 32, "n_heads": 2, "ff_dim": 64, "seq_len": 32, "max_steps": 4,
        "eval_batches": 1, "eval_batch_size": 4}


def test_seed_preset_is_the_seeds_18_experiments():
    preset = PRESETS["seed"]
    grid = build_grid(preset.techniques, preset.batch_sizes, preset.windows, overrides={"data_dir": "/d"})
    names = [trial_name(p) for p in grid]
    assert len(names) == len(set(names)) == 18
    for label in ("baseline", "bf16", "bf16_flash", "bf16_window16", "bf16_window32", "gradcp"):
        assert {f"{label}_bs{bs}" for bs in (32, 64, 128)} <= set(names)
    assert all(p["window"] is None for p in grid if "window" not in trial_name(p))


def test_only_skip_and_windows_shape_the_grid():
    grid = build_grid(["bf16", "window"], [16, 32], [8, 16], overrides={"data_dir": "/d", "device": "cpu"},
                      only=["window"], skip=["bs32"])
    assert sorted(trial_name(p) for p in grid) == ["bf16_window16_bs16", "bf16_window8_bs16"]
    with pytest.raises(SweepError, match="windowed technique"):
        build_grid(["bf16"], [8], [16], overrides={"data_dir": "/d"})
    with pytest.raises(SweepError, match="no trials"):
        build_grid(["bf16"], [8], overrides={"data_dir": "/d"}, only=["flash"])


def test_param_space_is_flat_with_one_grid_search():
    grid = build_grid(["baseline", "window"], [4, 8], [8], overrides={"data_dir": "/d", "device": "cpu"})
    space = param_space(grid)
    assert set(space) == set(grid[0]) | {GRID_KEY, KIND_KEY}
    assert sorted(space[GRID_KEY]["grid_search"]) == sorted(trial_name(p) for p in grid)
    assert space["device"] == "cpu"  # constants stay plain values


def test_gpu_memory_gb_reaches_every_trial_config():
    plan = plan_sweep(SweepConfig(techniques=("bf16",), batch_sizes=(8,), device="cuda", gpu_memory_gb=12.5,
                                  data_dir=None), gpus=1)
    assert [p["gpu_memory_gb"] for p in plan.grid] == [12.5] and plan.use_gpu



def test_every_sweep_config_field_has_a_flag_in_a_help_group(monkeypatch):
    """A SweepConfig field left out of sweep.run's GROUPS would get no flag: building the parser refuses."""
    cli = importlib.import_module("sweep.run")
    flagged = {f.name for f in fields(SweepConfig) if not f.metadata.get("no_cli")}
    assert set(cli.build_parser().parse_args([])._sweep_fields) == flagged
    monkeypatch.setitem(cli.GROUPS, "grid", tuple(n for n in cli.GROUPS["grid"] if n != "skip"))
    with pytest.raises(RuntimeError, match=r"SweepConfig fields in no GROUPS entry \(so without a flag\): skip$"):
        cli.build_parser()


@pytest.mark.slow
def test_small_sweep_end_to_end(ray_local, sample_dataset, tmp_path):
    from ray import tune

    from trainable import TrialConfig

    cfg = SweepConfig(techniques=("baseline", "window"), windows=(8,), batch_sizes=(4, 8), overrides=TINY,
                      data_dir=str(sample_dataset), device="cpu", storage_path=str(tmp_path), name="e2e", verbose=0)
    results, path = run_sweep(cfg)
    expected = {"baseline_bs4", "baseline_bs8", "bf16_window8_bs4", "bf16_window8_bs8"}
    assert path == str(tmp_path / "e2e")
    assert {r.config[GRID_KEY] for r in results} == expected
    for r in results:
        assert r.error is None
        assert r.metrics["final"] is True and r.metrics["status"] == "ok" and r.metrics["step"] == 4
        assert Path(r.path).name == r.config[GRID_KEY]  # trial dirs carry the trial names
        cfg_back = TrialConfig.from_dict({k: v for k, v in r.config.items() if k not in (GRID_KEY, KIND_KEY)})
        assert trial_name(cfg_back) == r.config[GRID_KEY]  # the flat config is the trial's own
        assert cfg_back.label == r.metrics["label"]

    restored = tune.ResultGrid(tune.ExperimentAnalysis(path))
    assert {r.config[GRID_KEY] for r in restored} == expected
    assert all(r.error is None and r.metrics["status"] == "ok" for r in restored)
    table, _ = results_table(path)
    assert "bf16_window8" in table and "baseline" in table

    with pytest.raises(SweepError, match="already exists"):
        plan_sweep(cfg, gpus=0)


BAD_INPUT = [
    (["--techniques", "nope"], "unknown technique"),
    (["--techniques", "bf16", "--windows", "16"], "windowed technique"),
    (["--batch-sizes", "0"], "batch size"),
    (["--data", "/no/such/dir"], "no such directory"),
    (["--preset", "seed"], "needs GPUs"),
    (["--device", "cuda", "--techniques", "bf16"], "needs GPUs"),
    (["--find-max-batch", "--granularity", "0"], "--granularity"),
    (["--techniques", "flash", "--device", "cpu"], "CUDA"),
]


@pytest.mark.slow
def test_bad_cli_input_exits_2_with_one_line_before_ray_starts(tmp_path):
    """All cases run at once (2 cores): each must fail on validation, long before a Ray start would end."""
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, "-m", "sweep.run", *args, "--storage-path", str(tmp_path)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args, _ in BAD_INPUT
    ]
    for proc, (args, needle) in zip(procs, BAD_INPUT):
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, err)
        assert "Traceback" not in err and "Ray instance" not in out + err
    assert time.monotonic() - t0 < 90
    assert not any(tmp_path.iterdir())  # nothing written


def test_trials_predicted_not_to_fit_are_named_before_any_run(sample_dataset):
    """A GPU grid on a known card: the memory model names the trials that will OOM; they still run (a result)."""
    from sweep.predict import predicted_oom_notice

    model = {"seq_len": 64, "n_layers": 2, "d_model": 256, "n_heads": 4, "ff_dim": 1024}
    cfg = SweepConfig(techniques=("baseline", "flash", "flash_compile"), batch_sizes=(4, 512), device="cuda",
                      gpu_memory_gb=0.5, data_dir=str(sample_dataset), overrides=model)
    plan = plan_sweep(cfg, gpus=1)
    note = predicted_oom_notice(plan, local_mib=None)
    assert note is not None and "2 of 6 trials" in note, note
    named = set(re.findall(r"(\w+_bs\d+) \(~", note))
    assert named == {"baseline_bs512", "bf16_flash_bs512"}, note  # compiled: an upper bound, not named
    assert "end as OOM results" in note and "--gpu-memory-gb 0.5" in note
    roomy = replace(cfg, gpu_memory_gb=40.0)
    assert predicted_oom_notice(plan_sweep(roomy, gpus=1), local_mib=None) is None
    unknown = replace(cfg, gpu_memory_gb=None)  # a remote cluster's GPUs: nothing is said
    assert predicted_oom_notice(plan_sweep(unknown, gpus=1), local_mib=None) is None
    cpu = replace(cfg, device="cpu", techniques=("baseline",), gpu_memory_gb=None)
    assert predicted_oom_notice(plan_sweep(cpu, gpus=0), local_mib=24564.0) is None


# -- what the sweep says about the grid it runs -------------------------------------------------------------
def test_the_cpu_notice_describes_the_grid_that_actually_runs(sample_dataset):
    plan = plan_sweep(SweepConfig(data_dir=str(sample_dataset), overrides={"max_steps": 600}), gpus=0)
    assert plan.preset_name == "cpu" and {p["max_steps"] for p in plan.grid} == {600}
    assert plan.notice == ("notice: no GPU in the Ray cluster: running the CPU grid: 8 trials, 2 layers x d_model 64, "
                           "seq_len 64, 600 steps each; use --preset seed on a GPU machine for the real sweep")
    tokens = plan_sweep(SweepConfig(data_dir=str(sample_dataset), overrides={"max_tokens": 5000}), gpus=0)
    assert "30 steps / 5000 tokens each" in tokens.notice  # both budgets; the first reached ends a trial
    assert plan_sweep(SweepConfig(data_dir=str(sample_dataset), verbose=0), gpus=0).notice is None
    asked = plan_sweep(SweepConfig(data_dir=str(sample_dataset), device="cpu"), gpus=1)  # a GPU there, CPU asked for
    assert asked.preset_name == "cpu" and asked.notice.startswith("notice: --device cpu: running the CPU grid: 8 trials")


@pytest.mark.parametrize(("given", "expected"), [
    ({"batch_sizes": (4,)}, {"bf16_window16_bs4", "baseline_bs4", "sac_bs4"}),
    ({"windows": (8,)}, {"bf16_window8_bs8", "bf16_window8_gradcp_bs16", "gradcp_bs16"}),
])
def test_a_grid_of_flags_alone_on_a_cpu_takes_the_techniques_a_cpu_runs_and_says_so(given, expected, sample_dataset):
    plan = plan_sweep(SweepConfig(data_dir=str(sample_dataset), **given), gpus=0)
    assert plan.preset_name == "custom" and not plan.use_gpu
    assert expected <= set(plan.names) and not any("flash" in n or "compile" in n for n in plan.names)
    assert {p["device"] for p in plan.grid} == {"cpu"}
    assert plan.notice.startswith("notice: no GPU: the grid uses the techniques a CPU runs (baseline, fp32, bf16, ")
    assert f": the custom CPU grid: {len(plan.grid)} trials, 2 layers x d_model 64, seq_len 64, 30 steps each" \
        in plan.notice


def _saved_experiment(storage: Path, grid: list[dict], statuses: dict[str, str]) -> Path:
    """An experiment as a killed sweep leaves it: the grid it saved and Tune's state of its trials."""
    import json

    exp = storage / "exp"
    exp.mkdir(parents=True)
    (exp / "sweep_grid.json").write_text(json.dumps({"preset": "cpu", "use_gpu": False, "grid": grid}))
    trials = [[json.dumps({"relative_logdir": name, "status": status}), "{}"] for name, status in statuses.items()]
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trials}))
    return exp


def test_a_resumed_sweep_says_which_grid_it_resumes_and_keeps_its_saved_points(sample_dataset, tmp_path):
    first = plan_sweep(SweepConfig(data_dir=str(sample_dataset), overrides={"max_steps": 600}), gpus=0)
    older = [{k: v for k, v in p.items() if k != "tie_embeddings"} for p in first.grid]  # saved by older code
    _saved_experiment(tmp_path, older, {first.names[0]: "TERMINATED", first.names[1]: "RUNNING"})
    plan = plan_sweep(SweepConfig(resume=True, name="exp", storage_path=str(tmp_path)), gpus=0)
    assert plan.notice == ("notice: resuming the cpu grid: 8 trials, 2 layers x d_model 64, seq_len 64, 600 steps "
                           "each; 1 finished, 7 to run")
    assert plan.grid == older  # Tune restores only the param space it saved: no field added since
    assert plan.names == first.names and plan.data_dir == str(sample_dataset)


def test_resume_refuses_when_every_saved_state_is_damaged(sample_dataset, tmp_path):
    exp = _saved_experiment(tmp_path, plan_sweep(SweepConfig(data_dir=str(sample_dataset)), gpus=0).grid, {})
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text("{cut sh")
    with pytest.raises(SweepError, match="every experiment_state-.*json in .* is damaged"):
        plan_sweep(SweepConfig(resume=True, name="exp", storage_path=str(tmp_path)), gpus=0)


def test_dry_run_lists_what_would_run_and_writes_nothing(sample_dataset, tmp_path, capsys):
    from sweep.run import main

    assert main(["--dry-run", "--data", str(sample_dataset), "--storage-path", str(tmp_path), "--name", "dry"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"dry run: 8 trials (cpu grid) -> {tmp_path / 'dry'}; nothing runs"
    assert out[1].startswith("notice: no GPU in the Ray cluster: running the CPU grid: 8 trials")
    assert out[2].split() == ["trial", "device", "batch", "seq_len", "predicted", "peak", "(MiB)", "fits"]
    rows = [line.split() for line in out[4:12]]
    assert [r[0] for r in rows] == plan_sweep(SweepConfig(data_dir=str(sample_dataset)), gpus=0).names
    assert all(r[1] == "cpu" and r[4].isdigit() and r[-1] == "-" for r in rows)  # CUDA peak; fits: not for a CPU
    assert out[-2].startswith("predicted peak: what one training step would allocate on a CUDA GPU")
    assert out[-1].startswith("assumed: vocab 512; budget ")
    assert not any(tmp_path.iterdir())


def test_dry_run_rows_of_a_gpu_grid_say_whether_each_trial_fits(sample_dataset):
    from sweep.predict import dry_run_rows

    cfg = SweepConfig(techniques=("baseline", "sac"), batch_sizes=(4, 4096), device="cuda", gpu_memory_gb=2.0,
                      data_dir=str(sample_dataset), overrides={"seq_len": 64})
    rows, assumed = dry_run_rows(plan_sweep(cfg, gpus=1))
    fits = {r["trial"]: (r["predicted peak (MiB)"], r["fits"]) for r in rows}
    assert fits["baseline_bs4"][1] is True and fits["baseline_bs4096"][1] is False
    assert fits["sac_bs4"] == ("not modelled", None)
    assert "budget 2048 MiB = --gpu-memory-gb 2" in assumed


def test_the_tensorboard_line_names_the_experiment_only_when_it_has_event_files(tmp_path, monkeypatch):
    from sweep.run import tensorboard_line

    exp = tmp_path / "results" / "exp"
    (exp / "baseline_bs4").mkdir(parents=True)
    assert tensorboard_line(str(exp)) is None
    (exp / "baseline_bs4" / "events.out.tfevents.1.host").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert tensorboard_line(str(exp)).startswith("TensorBoard: tensorboard --logdir results/exp")
    assert tensorboard_line(f"file://{exp}").startswith(f"TensorBoard: tensorboard --logdir file://{exp}")


def test_a_trial_line_says_how_the_trial_ended():
    from sweep.progress import summary

    assert summary({"status": "ok", "final": True, "step": 100, "loss": 5.2104, "mem_step_peak_mib": 15016.0,
                    "wall_tokens_per_s": 1.51e6, "tokens_per_s": 9.9e9}) == \
        "step 100  loss 5.210  peak 15,016 MiB  1.51M tok/s"  # the final line: the wall-clock speed
    assert summary({"status": "ok", "step": 30, "loss": 6.75, "mem_step_peak_mib": float("nan"),
                    "tokens_per_s": 23400.0}) == "step 30  loss 6.750  23.4k tok/s"  # CPU: no memory measured
    assert summary({"status": "nan", "step": 2, "loss": float("nan")}) == \
        "the loss became nan at step 2: training stopped"
    assert summary({"status": "oom", "step": 1, "oom_phase": "backward", "mem_reserved_mib": 80123.0}) == \
        "step 1  in backward  80,123 MiB reserved"
