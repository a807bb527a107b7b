"""Explain the seed report's memory table: which definition of "peak" and which training choices reproduce it.

The seed report (RTX 5090) gives the peak memory of its 4-layer d256 GPT-2-vocabulary model at batch 32/64/128;
this project's peaks of the same model are higher and scale differently. This script measures, in ONE process on
one GPU and with the project's own trial (`trainable.run_trial`, 2 steps each, random tokens at vocab 50,257,
`--gpu-memory-gb 32` emulated), every seed technique at every batch size:

* under each candidate switch: the loss on fp32-upcast logits (default) or in the compute dtype
  (`loss_precision=compute`, bf16 techniques), a tied or untied LM head (`tie_embeddings`);
* under each candidate definition of the peak, read from the steady step (step 2) the trial reports: max
  allocated over the step (reset per phase), forward only, backward only, max reserved, and the cumulative
  max allocated since model creation (never reset: set-up, both steps, the evaluation), each in MiB and in
  10^6-byte MB;

then picks, for each seed cell, the closest configuration + definition and prints a markdown table: the seed's
value, this project's own step peak, the closest measurement, the difference, the mechanism, the memory model's
prediction for that row, and where the memory of that run goes (the trial's measured breakdown). A cell no
candidate comes within 10% of says so, and by which measurement. Window techniques are measured with the default
switches and with the switches that came closest for flash at the same batch (memory-wise flex is flash).

    python bench/seed_report_explain.py --out seed_report_h200.tables.md  # ~3 min on an H200 (1-2: flex compiles)
    python bench/seed_report_explain.py --techniques bf16 flash --batch-sizes 32 --out /tmp/t.md
    python bench/seed_report_explain.py --predict --out /tmp/p.md   # CPU: the memory model in place of the GPU
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.keys import MEMORY_COMPONENTS  # noqa: E402
from contract.techniques import TECHNIQUES as PRESETS  # noqa: E402
from trainable import TrialConfig, run_trial  # noqa: E402
from trainable.memory_model import predict_peak_memory  # noqa: E402
from trainable.setup import build_run  # noqa: E402

VOCAB = 50257
MODEL = dict(n_layers=4, d_model=256, n_heads=8, ff_dim=1024, seq_len=256)
BATCHES = (32, 64, 128)
MIB, MB = float(1 << 20), 1e6
# The seed report's table (MB as printed) and this project's seed-report preset on an H200 (MiB, 32 GB cap).
SEED_MB = {"baseline": (5004, 10743, 18959), "bf16": (2990, 5656, 10744), "flash": (2551, 4694, 8964),
           "window16": (2551, 4694, 8966), "window32": (2551, 4694, 8966), "gradcp": (3613, 8189, 14561)}
TECHNIQUES = {"baseline": {"technique": "baseline"}, "bf16": {"technique": "bf16"}, "flash": {"technique": "flash"},
              "gradcp": {"technique": "gradcp"}, "window16": {"technique": "window", "window": 16},
              "window32": {"technique": "window", "window": 32}}
VARIANTS = {  # name -> (switches, mechanism)
    "default": ({}, "this project's step (fp32-upcast loss, tied head)"),
    "bf16loss": ({"loss_precision": "compute"},
                 "log-softmax and its gradient in bf16 (the loss outside autocast): 6E instead of 12E bytes"),
    "untied": ({"tie_embeddings": False}, "untied LM head: +V*d parameters, +{vd:,.0f} MiB of params, grads, AdamW"),
    "bf16loss_untied": ({"loss_precision": "compute", "tie_embeddings": False},
                        "bf16 loss (6E instead of 12E) and an untied head (+{vd:,.0f} MiB)"),
}
DEFINITIONS = {  # name -> mechanism
    "step": "max allocated over the step, reset per phase",
    "forward": "forward pass only: no loss gradients yet (the 12E/6E backward buffers are not counted)",
    "backward": "backward pass only",
    "reserved": "max reserved: the caching allocator's segments, free blocks included",
    "cumulative": "max allocated since model creation, never reset (set-up, steps, evaluation)",
}


@dataclass
class Run:
    technique: str
    batch: int
    variant: str
    label: str
    kernel: str
    values_bytes: dict[str, float]  # definition -> bytes
    predicted_bytes: dict[str, float]
    final: dict = field(default_factory=dict)

    def value(self, definition: str, unit: str) -> float:
        return self.values_bytes[definition] / (MIB if unit == "MiB" else MB)


def synthetic_data(root: Path) -> Path:
    spec = importlib.util.spec_from_file_location("bench_trainable", ROOT / "bench" / "bench_trainable.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.write_synthetic_dataset(root, vocab_size=VOCAB, seq_len=MODEL["seq_len"],
                                         rows={"train": 2 * max(BATCHES), "val": max(BATCHES)})


def config(data: Path, technique: str, batch: int, variant: str) -> TrialConfig:
    return TrialConfig.from_dict({**TECHNIQUES[technique], **VARIANTS[variant][0], **MODEL, "data_dir": str(data),
                                  "batch_size": batch, "max_steps": 2, "warmup_steps": 1, "eval_interval": 0,
                                  "eval_batches": 1, "eval_batch_size": batch, "gpu_memory_gb": 32.0})


def check_wiring(data: Path) -> str | None:
    """Whether the project's set-up builds an untied head when asked (one line when it does not)."""
    run = build_run(config(data, "bf16", 32, "untied"))
    if getattr(run.build_model(), "lm_head", None) is None:
        return "tie_embeddings does not reach the model: trainable/setup.py's model_config must pass it on"
    return None


def measure(data: Path, technique: str, batch: int, variant: str) -> Run | None:
    cfg = config(data, technique, batch, variant)
    reports: list[dict] = []
    torch.cuda.reset_peak_memory_stats()
    final = run_trial(cfg, reports.append)
    after = torch.cuda.max_memory_allocated()  # since the trial's last reset: its last optimizer phase + eval
    if final.get("status") != "ok":  # (not expected under 32 GB: then that candidate is left out, and said so)
        print(f"  {cfg.label} bs{batch}: {final.get('status')} {final.get('oom_message', '')}", file=sys.stderr)
        return None
    steady = reports[1]
    phases = [r[k] for r in reports for k in ("mem_fwd_peak_mib", "mem_bwd_peak_mib", "mem_opt_peak_mib")]
    values = {"step": steady["mem_step_peak_mib"] * MIB, "forward": steady["mem_fwd_peak_mib"] * MIB,
              "backward": steady["mem_bwd_peak_mib"] * MIB,
              "reserved": max(r["mem_reserved_mib"] for r in reports) * MIB,
              "cumulative": max(max(phases) * MIB, float(after))}
    return Run(technique, batch, variant, final["label"], final["attention_kernel"], values,
               predicted_values(cfg, final["attention_kernel"]), final)


def predicted_values(cfg: TrialConfig, kernel: str | None) -> dict[str, float]:
    """The memory model's value (bytes) of each definition it predicts (cumulative: the step's peak)."""
    bd = predict_peak_memory(cfg, vocab_size=VOCAB, **({"attention_kernel": kernel} if kernel else {}))
    predicted = {"step": bd.peak_mib, "forward": bd.phases_mib["forward"],
                 "backward": max(bd.phases_mib["backward_start"], bd.phases_mib["backward_layers"]),
                 "reserved": bd.reserved_mib, "cumulative": bd.peak_mib}
    return {k: v * MIB for k, v in predicted.items()}


def predict(technique: str, batch: int, variant: str) -> Run:
    """`--predict`: the memory model in place of the measurement (no GPU; no breakdown, no val_ppl)."""
    cfg = config(Path("unused"), technique, batch, variant)
    values = predicted_values(cfg, None)
    from trainable.memory_model import to_spec

    return Run(technique, batch, variant, cfg.label, to_spec(cfg, vocab_size=VOCAB).kernel, values, values, {})


def closest(runs: list[Run], seed_mb: float) -> tuple[Run, str, str, float]:
    """(run, definition, unit, relative difference) nearest the seed's number."""
    best = None
    for run in runs:
        for definition in DEFINITIONS:
            for unit in ("MiB", "MB"):
                diff = run.value(definition, unit) / seed_mb - 1
                if best is None or abs(diff) < abs(best[3]):
                    best = (run, definition, unit, diff)
    return best


def mechanism(run: Run, definition: str, unit: str) -> str:
    vd = 16 * VOCAB * MODEL["d_model"] / MIB
    parts = [VARIANTS[run.variant][1].format(vd=vd)] if run.variant != "default" else []
    if definition != "step":
        parts.append(DEFINITIONS[definition])
    if unit == "MB":
        parts.append("MB as 10^6 bytes (MiB figures read 4.9% higher)")
    return "; ".join(parts) or "this project's own step peak"


def where(run: Run) -> str:
    """The measured breakdown's three largest components (MiB)."""
    measured = {c: run.final.get(f"measured_{c}_mib", math.nan) for c in MEMORY_COMPONENTS}
    if any(math.isnan(v) for v in measured.values()):
        return "-"
    top = sorted(measured.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{c} {v:,.0f}" for c, v in top) + f" (peak in {run.final.get('breakdown_phase')})"


def explain_cell(technique: str, batch: int, seed_mb: float, runs: list[Run]) -> str:
    own = next(r for r in runs if r.variant == "default")
    run, definition, unit, diff = closest(runs, seed_mb)
    value = run.value(definition, unit)
    predicted = run.predicted_bytes[definition] / (MIB if unit == "MiB" else MB)
    why = mechanism(run, definition, unit)
    if abs(diff) > 0.10:
        low = min(((r, d) for r in runs for d in DEFINITIONS), key=lambda rd: rd[0].value(rd[1], "MiB"))
        high = max(((r, d) for r in runs for d in DEFINITIONS), key=lambda rd: rd[0].value(rd[1], "MB"))
        why = (f"none within 10% (the closest is {diff:+.0%} away): every measurement lies between "
               f"{low[0].value(low[1], 'MiB'):,.0f} MiB ({low[0].label}, '{low[1]}') and "
               f"{high[0].value(high[1], 'MB'):,.0f} MB ({high[0].label}, '{high[1]}')")
    return (f"| {technique} | {batch} | {seed_mb:,.0f} | {own.value('step', 'MiB'):,.0f} MiB | {run.label}, "
            f"{definition}, {unit} | {value:,.0f} {unit} | {diff:+.1%} | {why} | {predicted:,.0f} {unit} "
            f"({predicted / value - 1:+.1%}) | {where(run)} |")


def all_measurements(runs: list[Run]) -> str:
    lines = ["| technique | batch | configuration | kernel | " + " | ".join(f"{d} MiB" for d in DEFINITIONS)
             + " | predicted step MiB | val_ppl |", "|---|---:|---|---|" + "---:|" * (len(DEFINITIONS) + 2)]
    for r in runs:
        cells = " | ".join(f"{r.value(d, 'MiB'):,.0f}" for d in DEFINITIONS)
        lines.append(f"| {r.technique} | {r.batch} | {r.label} | {r.kernel} | {cells} | "
                     f"{r.predicted_bytes['step'] / MIB:,.0f} | {r.final.get('val_ppl', math.nan):,.0f} |")
    return "\n".join(lines)


def variants_for(technique: str, batch: int, runs: list[Run]) -> list[str]:
    bf16 = PRESETS[TECHNIQUES[technique]["technique"]]["precision"] == "bf16"  # loss precision is a bf16 choice
    names = [v for v in VARIANTS if bf16 or "bf16loss" not in v]
    if technique.startswith("window"):  # flex is flash, memory-wise: the default and flash's best switches
        flash = [r for r in runs if r.technique == "flash" and r.batch == batch]
        best = closest(flash, SEED_MB["flash"][BATCHES.index(batch)])[0].variant if flash else "default"
        names = list(dict.fromkeys(["default", best]))
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="markdown file to write the tables to")
    p.add_argument("--techniques", nargs="+", default=list(TECHNIQUES), choices=list(TECHNIQUES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCHES), choices=list(BATCHES))
    p.add_argument("--predict", action="store_true", help="no GPU: the memory model's values instead of measured")
    args = p.parse_args(argv)
    if not args.predict and not torch.cuda.is_available():
        p.exit(2, "seed_report_explain: needs a CUDA GPU (it measures allocator peaks)\n")
    if not args.out.parent.is_dir():
        p.exit(2, f"seed_report_explain: --out {args.out}: {args.out.parent} is not a directory\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    order = [t for t in TECHNIQUES if t in args.techniques]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp))
        problem = None if args.predict else check_wiring(data)
        if problem:
            print(f"seed_report_explain: {problem}", file=sys.stderr)
            return 2
        runs: list[Run] = []
        for technique in order:
            for batch in args.batch_sizes:
                for variant in variants_for(technique, batch, runs):
                    run = predict(technique, batch, variant) if args.predict else measure(data, technique, batch, variant)
                    if run is None:
                        continue
                    runs.append(run)
                    print(f"  {runs[-1].label:<24} bs{batch:<4} step {runs[-1].value('step', 'MiB'):>9,.0f} MiB "
                          f"({time.perf_counter() - started:4.0f} s)", file=sys.stderr)
    header = ("| technique | batch | seed (MB) | this project (step peak) | closest: configuration, definition, unit | "
              "its value | vs seed | mechanism | memory model for that row (vs measured) | where the memory goes "
              "(measured, MiB) |\n|---|---:|---:|---:|---|---:|---:|---|---:|---|")
    cells = [explain_cell(t, b, SEED_MB[t][BATCHES.index(b)], [r for r in runs if r.technique == t and r.batch == b])
             for t in order for b in args.batch_sizes
             if any(r.technique == t and r.batch == b and r.variant == "default" for r in runs)]
    source = "PREDICTED by the memory model (no GPU)" if args.predict else f"GPU: {torch.cuda.get_device_name()}"
    text = (f"{source}, torch {torch.__version__}, {len(runs)} trials in {time.perf_counter() - started:.0f} s, "
            f"model {MODEL} at vocab {VOCAB}, --gpu-memory-gb 32.\n\n{header}\n" + "\n".join(cells)
            + f"\n\nEvery measurement (MiB):\n\n{all_measurements(runs)}\n" + loss_precision_check(runs))
    print(text)
    args.out.write_text(text)
    return 0


def loss_precision_check(runs: list[Run]) -> str:
    """A line when loss_precision changed nothing: the trial is then not building its loss with `loss_for`."""
    for r in runs:
        if r.variant == "bf16loss":
            base = next((d for d in runs if d.technique == r.technique and d.batch == r.batch
                         and d.variant == "default"), None)
            if base is not None and abs(r.values_bytes["step"] / base.values_bytes["step"] - 1) < 0.01:
                return ("\nWARNING: loss_precision=compute changed no peak: trainable/trial.py must build its loss "
                        "with trainable.losses.loss_for(cfg.loss, cfg.loss_precision).\n")
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
