"""`python -m trainable`: seed-compatible flags, --metrics-out JSON lines, one-line errors with exit 2."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trainable.cli import build_parser, config_from_args, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--n-layers", "2", "--d-model", "32", "--n-heads", "4", "--ff-dim", "64",
        "--seq-len", "64", "--batch-size", "4", "--warmup-steps", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_seed_flags_map_onto_switches():
    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["--data", "/d", *argv]))

    assert cfg().label == "baseline"
    assert cfg("--bf16").label == "bf16"
    assert cfg("--bf16", "--flash-attn").label == "bf16_flash"
    assert cfg("--bf16", "--flash-attn", "--window-size", "16").label == "bf16_window16"
    assert cfg("--bf16", "--window-size", "16").label == "bf16_window16"
    assert cfg("--gradient-checkpointing").label == "gradcp"
    assert cfg("--technique", "flash", "--gradient-checkpointing").label == "bf16_flash_gradcp"
    c = cfg("--technique", "window", "--window-size", "8", "--max-steps", "5", "--lr", "1e-3", "--seed", "7",
            "--gpu-memory-gb", "4", "--epochs", "2")
    assert (c.window, c.max_steps, c.lr, c.seed, c.gpu_memory_gb, c.epochs) == (8, 5, 1e-3, 7, 4.0, 2)
    assert cfg("--checkpointing", "selective").label == "sac"
    assert cfg("--technique", "flash", "--loss", "fused_ce", "--compile").label == "bf16_flash_fusedce_compile"
    assert cfg("--technique", "fused_ce_compile").label == "bf16_flash_fusedce_compile"
    assert cfg("--peak-flops", "312e12").peak_flops == 312e12 and cfg().compile is False


def test_metrics_out_writes_one_json_object_per_step(sample_dataset, tmp_path, capsys):
    out = tmp_path / "metrics.jsonl"
    code = main(["--data", str(sample_dataset), *TINY, "--max-steps", "4", "--eval-interval", "2",
                 "--eval-batches", "1", "--metrics-out", str(out), "--log-every", "2"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r.keys() >= {"step", "loss", "tokens_per_s", "mem_step_peak_mib", "attention_kernel"} for r in rows)
    assert rows[-1]["final"] is True and "val_loss" in rows[1]
    assert not (tmp_path / "metrics.jsonl.partial").exists()
    printed = capsys.readouterr().out
    assert "step      2" in printed and "val_loss" in printed and "done in" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--flash-attn", "--bf16", "--device", "cpu"], "flash attention needs a CUDA GPU; use --device cuda or "
                                                         "technique bf16"),
        (["--flash-attn"], "flash attention needs bf16 precision"),
        (["--window-size", "0"], "window must be between 1 and seq_len - 1"),
        (["--window-size", "64"], "window must be between 1 and seq_len - 1"),
        (["--batch-size", "0"], "batch size must be >= 1"),
        (["--technique", "gradcpp"], "did you mean 'gradcp'?"),
        (["--d-model", "30"], "d_model 30 is not divisible by n_heads 4"),
        (["--vocab-size", "999"], "vocab_size 999 does not match the dataset's"),
        (["--data", "/nonexistent/prepared"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(sample_dataset, tmp_path, capsys, argv, message):
    out = tmp_path / "m.jsonl"
    code = main(["--data", str(sample_dataset), *TINY, "--max-steps", "1", "--metrics-out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "m.jsonl.partial").exists()


ON_OFF = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)


def _sweep_parser() -> argparse.ArgumentParser:
    from sweep.run import build_parser as sweep_build_parser

    return sweep_build_parser()


@pytest.mark.parametrize(("make_parser", "some"), [
    (build_parser, {"--window-size", "--checkpoint-dir", "--metrics-out", "--verify-data", "--log-every", "--seed"}),
    (_sweep_parser, {"--techniques", "--batch-sizes", "--storage-path", "--max-steps", "--seed"}),
], ids=["trainable", "sweep.run"])
def test_help_shows_the_default_of_every_option_with_a_value(make_parser, some):
    """`python -m trainable --help` and `python -m sweep.run --help`: every option that takes a value (and every
    --x/--no-x pair) says its default; a None default reads `unset` like the generated flags, never `None`."""
    parser = make_parser()
    formatter = parser._get_formatter()
    text = parser.format_help()
    assert "%(default)" not in text and "(default: None)" not in text
    valued, missing = [], []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, *ON_OFF)):
            continue  # positionals, --help, plain on/off switches
        valued.append(action.option_strings[0])
        shown = formatter._expand_help(action) if action.help else ""
        if "(default: " not in shown or "(default: None)" in shown:
            missing.append(action.option_strings[0])
    assert not missing, f"{parser.prog} --help shows no default for {missing}"
    assert some <= set(valued)  # the check sees the options it is about


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--batch-size", "many"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "invalid int value: 'many'" in err and "\n" not in err


@pytest.mark.slow
def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainable", "--data", str(tmp_path), "--flash-attn", "--bf16",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("python -m trainable: error: flash attention needs a CUDA GPU; "
                                   "use --device cuda or technique bf16")


@pytest.mark.slow
def test_the_readme_example_runs_as_written_on_the_sample_make_run_prepares(tmp_path):
    from data_prep import prepare_dataset
    from sweep.grid import CPU_OVERRIDES
    from sweep.plan import SAMPLE_VOCAB

    [line] = re.findall(r"^python -m trainable .*$", (ROOT / "README.md").read_text(), re.M)
    argv = shlex.split(line, comments=True)
    data = argv[argv.index("--data") + 1]
    vocab, seq_len = SAMPLE_VOCAB["cpu"], CPU_OVERRIDES["seq_len"]
    assert data == f"prepared/sample-bpe{vocab}-s{seq_len}"  # where `make run` prepares the sample on a CPU machine
    prepare_dataset(out_dir=tmp_path / data, tokenizer="bpe", vocab_size=vocab, seq_len=seq_len, seed=0,
                    progress=False)
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"done in [\d.]+s, val_loss \d", proc.stdout), proc.stdout
    out = tmp_path / argv[argv.index("--metrics-out") + 1]
    assert len(out.read_text().splitlines()) == int(argv[argv.index("--max-steps") + 1])


def test_a_loss_that_goes_nan_ends_the_run_with_one_line_and_exit_1(sample_dataset, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    code = main(["--data", str(sample_dataset), *TINY, "--lr", "1e30", "--max-steps", "20", "--log-every", "0",
                 "--metrics-out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and re.fullmatch(r"baseline: the loss became (nan|inf) at step \d+; training stopped", err), err
    final = json.loads(out.read_text().splitlines()[-1])
    assert final["final"] is True and final["status"] == "nan" and final["step"] < 20
