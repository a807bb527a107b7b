"""A sweep end to end: validate everything, connect Ray, run the grid (or the max-batch search).

`SweepConfig` is what the CLI builds; `plan_sweep` validates it without Ray (every problem is one
`SweepError` line); `run_sweep` and `find_max_batch_size` run it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .connect import check_storage, connect
from .grid import PRESETS, SEED_TECHNIQUES, GridPreset, SweepError, build_grid
from .probe import MAX_BATCH_FILE, MaxBatchSettings, format_max_batch
from .tuning import (
    check_fresh_name,
    cluster_gpus,
    default_name,
    experiment_path,
    format_rows,
    is_uri,
    latest_experiment,
    local_gpus,
    param_space,
    read_json,
    resolve_storage,
    summary_rows,
    sweep_trainable,
    trial_resources,
    write_json_atomic,
)

GRID_FILE = "sweep_grid.json"  # the validated grid, so --resume can rebuild the exact param space

# The shipped sample is prepared on first use with a vocabulary that suits its size. It is small
# (a few hundred rows of 256 tokens), so a GPU grid on it uses shorter rows and a step budget
# (several passes) unless the flags say otherwise; --data DIR is for real measurements.
SAMPLE_VOCAB = {"gpu": 2048, "cpu": 1024}
SAMPLE_GPU_OVERRIDES = {"seq_len": 256, "max_steps": 100, "warmup_steps": 10}
BUDGET_KEYS = ("epochs", "max_steps", "max_tokens")

# Fault tolerance: a trial saves its full state every N steps and a failed trial restarts from the
# latest save, up to MAX_FAILURES times. A CPU checkpoint of the tiny CPU-grid model costs a few ms,
# a GPU one (a synchronising step plus a copy of the weights and optimizer state) up to a second, so
# GPU trials save less often. Max-batch probes never checkpoint and are never retried (an OOM is the answer).
CHECKPOINT_INTERVAL = {"gpu": 50, "cpu": 10}
MAX_FAILURES = 2
CHECKPOINTS_KEPT = 2


@dataclass
class SweepConfig:
    """Everything one `python -m sweep.run` does; validated once by `plan_sweep`."""

    preset: str | None = None  # seed | cpu | None: auto (seed with GPUs, else cpu) unless a grid is given
    techniques: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    windows: tuple[int, ...] | None = None
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)  # model size and budget
    data_dir: str | None = None
    device: str = "auto"  # auto | cuda | cpu
    gpu_memory_gb: float | None = None
    address: str | None = None
    storage_path: str = "results"
    shared_storage: bool = False  # a local path that every node mounts (NFS): allowed on multi-node clusters
    name: str | None = None
    max_concurrent: int | None = None
    cpus_per_trial: int | None = None
    resume: bool = False
    verbose: int = 1
    # max-batch search
    find_max_batch: bool = False
    granularity: int = 1
    start: int | None = None
    max_batch: int | None = None
    probe_steps: int = 3
    seed_search: bool = True  # start each search next to the memory model's predicted max batch
    # the GPU the memory model predicts for (--predict, and the search's hint when nvidia-smi cannot tell)
    gpu: str | None = None  # a name from sweep.predict.GPU_TOTAL_MIB
    gpu_total_gb: float | None = None
    vocab_size: int | None = None  # --predict without --data
    # fault tolerance (sweeps only)
    checkpoint_interval: int | None = None  # steps between trial checkpoints; None: CHECKPOINT_INTERVAL; 0: off
    max_failures: int | None = None  # restarts of a failed trial from its last checkpoint; None: MAX_FAILURES

    @property
    def grid_given(self) -> bool:
        return any(x is not None for x in (self.techniques, self.batch_sizes, self.windows))


@dataclass
class SweepPlan:
    """A validated sweep: the grid, whether it needs GPUs, where data and results go."""

    cfg: SweepConfig
    preset_name: str  # seed | cpu | custom
    grid: list[dict[str, Any]]
    use_gpu: bool
    data_dir: str
    storage: str
    name: str
    sample: tuple[str, int, int] | None = None  # (dir, vocab, seq_len) still to prepare
    notice: str | None = None

    @property
    def path(self) -> str:
        return experiment_path(self.storage, self.name)


def _preset_for(cfg: SweepConfig, gpus: int | None) -> tuple[str, GridPreset]:
    if cfg.preset is not None:
        if cfg.preset not in PRESETS:
            raise SweepError(f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
        return cfg.preset, PRESETS[cfg.preset]
    if cfg.grid_given:
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and gpus == 0)
        base = PRESETS["cpu" if cpu else "seed"]
        return "custom", GridPreset(
            techniques=cfg.techniques or SEED_TECHNIQUES, batch_sizes=cfg.batch_sizes or base.batch_sizes,
            windows=cfg.windows or (), overrides=base.overrides, needs_gpu=not cpu,
        )
    if cfg.device == "cpu" or (cfg.device == "auto" and gpus == 0):
        return "cpu", PRESETS["cpu"]
    return "seed", PRESETS["seed"]


def grid_axes(cfg: SweepConfig, gpus: int | None) -> tuple[str, GridPreset, tuple, tuple, tuple]:
    """(preset name, preset, techniques, batch sizes, windows) the config asks for; explicit flags refine a preset."""
    preset_name, preset = _preset_for(cfg, gpus)
    techniques, batch_sizes, windows = preset.techniques, preset.batch_sizes, preset.windows
    if preset_name != "custom":
        techniques = cfg.techniques or techniques
        batch_sizes = cfg.batch_sizes or batch_sizes
        windows = cfg.windows or (windows if any(t in ("window", "window_gradcp") for t in techniques) else ())
    return preset_name, preset, techniques, batch_sizes, windows


def _default_data(seq_len: int, kind: str) -> tuple[str, int]:
    vocab = SAMPLE_VOCAB[kind]
    return str(Path("prepared").resolve() / f"sample-bpe{vocab}-s{seq_len}"), vocab


def _check_techniques(techniques) -> None:
    """Unknown technique names, with the closest known one (build_grid lists them all)."""
    import difflib

    from trainable import TECHNIQUES

    for technique in techniques:
        if technique not in TECHNIQUES:
            close = difflib.get_close_matches(technique, list(TECHNIQUES), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(f"unknown technique {technique!r}{hint}; choose from {', '.join(TECHNIQUES)}")


def _check_data(data_dir: str, grid: list[dict[str, Any]], verify: str = "full") -> None:
    """The dataset exists, is intact and fits the grid; "full" hashes every shard (once, before any trial:
    trials only compare sizes, which a flipped byte passes)."""
    from data_prep import DataPrepError, open_dataset

    if not Path(data_dir).is_dir():
        raise SweepError(f"--data {data_dir}: no such directory (prepare one with python -m data_prep)")
    try:
        ds = open_dataset(data_dir, verify=verify)
    except DataPrepError as exc:
        raise SweepError(f"--data {data_dir}: {exc}") from None
    seq_lens = {p["seq_len"] for p in grid}
    too_long = [s for s in seq_lens if s > ds.seq_len]
    if too_long:
        raise SweepError(f"dataset {data_dir} has rows of {ds.seq_len} tokens, shorter than the grid's seq_len "
                         f"{max(too_long)}: pass --seq-len {ds.seq_len} or prepare the data with a longer --seq-len")
    rows = ds.split("train").num_rows
    too_big = sorted({p["batch_size"] for p in grid if p["batch_size"] > rows})
    if too_big:
        raise SweepError(f"dataset {data_dir} has {rows} training rows, fewer than batch size {too_big[0]}: "
                         "use smaller batch sizes or more data")


def _check_fault_tolerance(cfg: SweepConfig) -> None:
    for flag, value in (("--checkpoint-interval", cfg.checkpoint_interval), ("--max-failures", cfg.max_failures)):
        if value is not None and value < 0:
            raise SweepError(f"{flag} must be >= 0 (0: off), got {value}")
        if value is not None and cfg.find_max_batch:
            raise SweepError(f"{flag} is for sweeps: max-batch probes never checkpoint and are never retried")


def checkpoint_interval(cfg: SweepConfig, use_gpu: bool) -> int:
    """The steps between trial checkpoints: the flag, else the default for the grid's hardware."""
    if cfg.checkpoint_interval is not None:
        return cfg.checkpoint_interval
    return CHECKPOINT_INTERVAL["gpu" if use_gpu else "cpu"]


def plan_sweep(cfg: SweepConfig, gpus: int | None = None, verify: str = "full",
               require_gpus: bool = False) -> SweepPlan:
    """Validate the whole sweep without Ray; `gpus` = the cluster's GPUs when known (None: not yet).

    `verify`: how `--data` is checked ("full": every shard's sha256, "size": sizes only, for a re-plan).
    `require_gpus`: a GPU grid with `gpus` == 0 is an error, raised before the data is read."""
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise SweepError(f"unknown device {cfg.device!r}; choose from auto, cuda, cpu")
    if cfg.max_concurrent is not None and cfg.max_concurrent < 1:
        raise SweepError(f"--max-concurrent must be >= 1, got {cfg.max_concurrent}")
    if cfg.cpus_per_trial is not None and cfg.cpus_per_trial < 1:
        raise SweepError(f"--cpus-per-trial must be >= 1, got {cfg.cpus_per_trial}")
    if cfg.gpu_memory_gb is not None and not cfg.gpu_memory_gb > 0:
        raise SweepError(f"--gpu-memory-gb must be positive, got {cfg.gpu_memory_gb}")
    for flag, value, low in (("--granularity", cfg.granularity, 1), ("--start", cfg.start, 1),
                             ("--max", cfg.max_batch, 1), ("--probe-steps", cfg.probe_steps, 1)):
        if value is not None and value < low:
            raise SweepError(f"{flag} must be >= {low}, got {value}")
    if cfg.resume and cfg.find_max_batch:
        raise SweepError("--resume continues a sweep; a max-batch search starts afresh")
    _check_fault_tolerance(cfg)
    if cfg.gpu is not None or cfg.gpu_total_gb is not None:
        from .predict import gpu_total_mib

        gpu_total_mib(cfg.gpu, cfg.gpu_total_gb)  # validates both

    preset_name, preset, techniques, batch_sizes, windows = grid_axes(cfg, gpus)
    _check_techniques(techniques)
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and preset.needs_gpu)
    if cfg.device == "cpu" and preset_name == "seed":
        use_gpu = False
    overrides = {**preset.overrides, **cfg.overrides}
    if not use_gpu:
        overrides["device"] = "cpu"
    elif cfg.device == "cuda":
        overrides["device"] = "cuda"
    if require_gpus and gpus is not None:
        _require_gpus(use_gpu, preset_name, cfg.address, gpus)
    if cfg.gpu_memory_gb is not None:
        if not use_gpu:
            raise SweepError("--gpu-memory-gb limits a CUDA GPU; it cannot be used with a CPU grid")
        overrides["gpu_memory_gb"] = cfg.gpu_memory_gb

    sample_notice = None
    if cfg.data_dir is None and use_gpu:
        for key, value in SAMPLE_GPU_OVERRIDES.items():
            if key in cfg.overrides or (key == "max_steps" and any(k in cfg.overrides for k in BUDGET_KEYS)):
                continue
            overrides[key] = value
        sample_notice = (f"notice: no --data: the {preset_name} grid runs on the small shipped Polish sample "
                         f"(seq_len {overrides.get('seq_len')}"
                         f"{', %s steps' % overrides['max_steps'] if overrides.get('max_steps') else ''}); "
                         "pass --data DIR (python -m data_prep) for a real measurement")
    seq_len = int(overrides.get("seq_len", 512))
    sample = None
    if cfg.data_dir is not None:
        data_dir = str(Path(cfg.data_dir).expanduser().resolve())
    else:
        data_dir, vocab = _default_data(seq_len, "gpu" if use_gpu else "cpu")
        if not (Path(data_dir) / "manifest.json").is_file():
            sample = (data_dir, vocab, seq_len)
    overrides["data_dir"] = data_dir

    if cfg.find_max_batch:
        batch_sizes = (cfg.start or 1,)
    elif "checkpoint_interval" not in cfg.overrides:
        overrides["checkpoint_interval"] = checkpoint_interval(cfg, use_gpu)
    grid = build_grid(techniques, batch_sizes, windows, overrides=overrides, only=cfg.only, skip=cfg.skip)
    if cfg.data_dir is not None and not cfg.find_max_batch:
        _check_data(data_dir, grid, verify)
    elif cfg.data_dir is not None:
        _check_data(data_dir, [{**p, "batch_size": 1} for p in grid], verify)

    storage = resolve_storage(cfg.storage_path)
    name = cfg.name
    if cfg.resume:
        name = name or latest_experiment(storage)
        if name is None:
            raise SweepError(f"--resume: no experiment under {storage} (pass --name of the one to resume)")
        path = experiment_path(storage, name)
        if not is_uri(path) and not any(Path(path).glob("experiment_state-*.json")):
            raise SweepError(f"--resume: {path} is not a Tune experiment directory")
    else:
        name = name or default_name("max-batch" if cfg.find_max_batch else preset_name)
        check_fresh_name(storage, name)

    notice = sample_notice
    if preset_name == "cpu" and cfg.preset is None:
        notice = (f"notice: no GPU in the Ray cluster: running {PRESETS['cpu'].description}; "
                  "use --preset seed on a GPU machine for the real sweep")
    return SweepPlan(cfg=cfg, preset_name=preset_name, grid=grid, use_gpu=use_gpu, data_dir=data_dir,
                     storage=storage, name=name, sample=sample, notice=notice)


def _runs_locally(cfg: SweepConfig) -> bool:
    """The trials run on this node: a local Ray instance, not --address / RAY_ADDRESS."""
    return cfg.address == "local" or (cfg.address is None and not os.environ.get("RAY_ADDRESS"))


def _local_gpu_mib(cfg: SweepConfig) -> float | None:
    """This node's GPU memory (nvidia-smi) when the trials run on this node, else None."""
    from .predict import local_gpu_total_mib

    return local_gpu_total_mib() if _runs_locally(cfg) else None


def _precheck_local_gpus(cfg: SweepConfig) -> int | None:
    """Without --address we know the local instance's GPUs before starting Ray."""
    if not _runs_locally(cfg):
        return None
    ray = sys.modules.get("ray")  # in-process Ray already up (a notebook, the tests): ask it
    if ray is not None and ray.is_initialized():
        return cluster_gpus()
    return local_gpus()


def _require_gpus(use_gpu: bool, preset_name: str, address: str | None, gpus: int) -> None:
    if use_gpu and gpus == 0:
        where = f"at {address}" if address else "(local instance)"
        raise SweepError(f"the {preset_name} grid needs GPUs (one per trial) but the Ray cluster {where} "
                         "has none: use --device cpu for a CPU grid, or --address of a GPU cluster")


def prepare(cfg: SweepConfig) -> SweepPlan:
    """Validate (before Ray), connect to Ray, re-plan with the cluster's GPUs, prepare the sample."""
    gpus = _precheck_local_gpus(cfg)
    plan = plan_sweep(cfg, gpus, require_gpus=True)  # hashes every shard of --data, once
    info = connect(cfg.address)
    storage = check_storage(plan.storage, info, shared=cfg.shared_storage)
    gpus = cluster_gpus()
    plan = replace(plan_sweep(cfg, gpus, verify="size", require_gpus=True), storage=storage)
    if plan.sample is not None and not cfg.resume:
        _prepare_sample(*plan.sample)
    if cfg.data_dir is None and not cfg.resume:  # the sample: enough rows for every batch size?
        _check_data(plan.data_dir, [{**p, "batch_size": 1} for p in plan.grid] if cfg.find_max_batch else plan.grid)
    return plan


def _prepare_sample(out_dir: str, vocab: int, seq_len: int) -> None:
    from data_prep import prepare_dataset

    print(f"preparing the shipped Polish sample into {out_dir} (once)", file=sys.stderr)
    prepare_dataset(out_dir=out_dir, tokenizer="bpe", vocab_size=vocab, seq_len=seq_len, seed=0)


def run_sweep(cfg: SweepConfig, plan: SweepPlan | None = None):
    """Run (or resume) the grid on Ray Tune; returns (ResultGrid, experiment path)."""
    from ray import tune

    plan = plan or prepare(cfg)
    if plan.notice:
        print(plan.notice, file=sys.stderr)
    oom_note = predicted_oom_notice(cfg, plan, _local_gpu_mib(cfg))
    if oom_note:
        print(oom_note, file=sys.stderr)
    resources = trial_resources(plan.use_gpu, cfg.cpus_per_trial)
    trainable = tune.with_resources(sweep_trainable, resources)
    # num_to_keep makes Tune snapshot the experiment state after every few checkpoints: cheap, but Tune warns
    # about it every time short trials checkpoint often (the CPU grid's do).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    grid_file = f"{plan.path}/{GRID_FILE}"
    if cfg.resume:
        # Tune keeps the grid's sample_from lookups only in memory: hand the same param space back.
        saved = read_json(grid_file)
        if not saved or not saved.get("grid"):
            raise SweepError(f"--resume: {grid_file} is missing: {plan.path} was not written by python -m sweep.run")
        print(f"resuming {plan.path}", file=sys.stderr)
        tuner = tune.Tuner.restore(plan.path, trainable=trainable, resume_unfinished=True, restart_errored=True,
                                   param_space=param_space(saved["grid"]))
    else:
        write_json_atomic(grid_file, {"preset": plan.preset_name, "use_gpu": plan.use_gpu,
                                      "resources": resources, "grid": plan.grid})
        from .tuning import name_trial

        print(f"{len(plan.grid)} trials ({plan.preset_name} grid), {resources} each -> {plan.path}", file=sys.stderr)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(plan.grid),
            tune_config=tune.TuneConfig(
                max_concurrent_trials=cfg.max_concurrent,
                reuse_actors=False,
                trial_name_creator=name_trial,
                trial_dirname_creator=name_trial,
            ),
            run_config=tune.RunConfig(
                name=plan.name,
                storage_path=plan.storage,
                # A failed trial (a lost node, a killed worker) restarts from its latest checkpoint.
                failure_config=tune.FailureConfig(
                    max_failures=MAX_FAILURES if cfg.max_failures is None else cfg.max_failures, fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                verbose=cfg.verbose,
            ),
        )
    return tuner.fit(), plan.path


def find_max_batch_size(cfg: SweepConfig, plan: SweepPlan | None = None) -> tuple[list[dict[str, Any]], str]:
    """The max-batch search for every technique (and window) of the grid; returns (records, path)."""
    plan = plan or prepare(replace(cfg, find_max_batch=True))
    if plan.notice:
        print(plan.notice, file=sys.stderr)
    from data_prep import open_dataset

    rows = open_dataset(plan.data_dir, verify="size").split("train").num_rows
    upper = min(cfg.max_batch or rows, rows)
    if cfg.max_batch and cfg.max_batch > rows:
        print(f"note: the dataset has {rows} training rows: the search stops at batch size {rows}", file=sys.stderr)
    parallelism = cfg.max_concurrent or (cluster_gpus() if plan.use_gpu else 1) or 1
    start = min(cfg.start or (32 if plan.use_gpu else 1), upper)
    settings = MaxBatchSettings(start=start, max_batch_size=upper, granularity=cfg.granularity,
                                probe_steps=cfg.probe_steps, parallelism=parallelism)
    if settings.granularity > upper:
        raise SweepError(f"--granularity {cfg.granularity} is larger than the largest batch size to try ({upper})")
    resources = trial_resources(plan.use_gpu, cfg.cpus_per_trial)
    hints = search_hints(cfg, plan) if plan.use_gpu and cfg.seed_search else {}
    print(f"max-batch search over {len(plan.grid)} techniques, {parallelism} probe(s) per round, "
          f"batch {'near the predicted max' if hints else start}..{upper}, granularity {cfg.granularity} "
          f"-> {plan.path}/{MAX_BATCH_FILE}", file=sys.stderr)
    from .max_batch import run_max_batch_search

    records = run_max_batch_search(plan.grid, settings, storage=plan.storage, name=plan.name,
                                   resources=resources, verbose=cfg.verbose, hints=hints)
    return records, plan.path


def trial_budget(cfg: SweepConfig, local_mib: float | None):
    """One trial's memory budget as the memory model sees it (SweepError on a bad flag).

    The GPU's size comes from --gpu-total-gb / --gpu, else `local_mib` (nvidia-smi on this node), else the
    default H200; --gpu-memory-gb caps it.
    """
    from .predict import memory_budget

    local = None if (cfg.gpu or cfg.gpu_total_gb) else local_mib
    return memory_budget(cfg.gpu_memory_gb, gpu=cfg.gpu, gpu_total_gb=cfg.gpu_total_gb, total_mib=local,
                         total_source=f"this node's GPU ({local:.0f} MiB, nvidia-smi)" if local else None)


def predicted_oom_notice(cfg: SweepConfig, plan: SweepPlan, local_mib: float | None) -> str | None:
    """The trials the memory model predicts will not fit their GPU, said before any GPU time is spent.

    They still run: an OOM is a measured result (seconds of GPU time), and the prediction is an estimate.
    Said only when the GPU is known (a local GPU, or --gpu / --gpu-total-gb / --gpu-memory-gb): the driver
    of a remote cluster may not see the workers' GPUs. Compiled configs are left out: for them the model
    gives the eager step, an upper bound.
    """
    if not plan.use_gpu or cfg.resume:
        return None
    if local_mib is None and not (cfg.gpu or cfg.gpu_total_gb or cfg.gpu_memory_gb):
        return None
    from data_prep import open_dataset

    from .predict import predict_points

    try:
        budget = trial_budget(cfg, local_mib)
    except SweepError:
        return None
    vocab = open_dataset(plan.data_dir, verify="none").vocab_size
    rows = predict_points([{**point, "vocab_size": vocab} for point in plan.grid], budget)
    over = [f"{row['trial']} (~{row['predicted_reserved_mib'] / 1024:.1f} GiB)" for row in rows
            if row["error"] is None and row["fits"] is False and not row["upper_bound"]]
    if not over:
        return None
    return (f"note: the memory model predicts {len(over)} of {len(plan.grid)} trials will not fit "
            f"{budget.source}: {', '.join(over)}. They run anyway and end as OOM results; `--skip NAME` leaves one out.")


def search_hints(cfg: SweepConfig, plan: SweepPlan) -> dict[str, dict[str, Any]]:
    """Per technique label: the memory model's predicted max batch under the trial's budget (the search's hint).

    The GPU's size comes from --gpu-total-gb / --gpu, else nvidia-smi on this node, else the default H200.
    A technique the model does not cover gets no hint (its search grows from --start as before).
    """
    from data_prep import open_dataset

    from .predict import local_gpu_total_mib, predict_point

    try:
        budget = trial_budget(cfg, local_gpu_total_mib())
    except SweepError as exc:
        print(f"note: no predicted max batch ({exc}); searching unseeded", file=sys.stderr)
        return {}
    vocab = open_dataset(plan.data_dir, verify="none").vocab_size
    hints: dict[str, dict[str, Any]] = {}
    for point in plan.grid:
        row = predict_point({**point, "vocab_size": vocab, "batch_size": 1}, budget, granularity=1)
        if row["error"] is None:
            hints[row["technique"]] = {"max_batch": row["predicted_max_batch"], "budget_mib": row["budget_mib"],
                                       "vocab_size": vocab}
    print(f"seeding each search with its predicted max batch (budget {budget.source}); --no-seed to search "
          "without", file=sys.stderr)
    return hints


def results_table(results, path: str) -> str:
    """The comparison table from `analysis` (writing its report next to the results), else a short one."""
    try:
        import analysis
    except ImportError:
        analysis = None
    if analysis is not None:
        try:
            loaded = analysis.load(path)
            text = analysis.format_table(loaded)
            out_dir = None if is_uri(path) else str(Path(path) / "analysis")
            if out_dir is not None:
                analysis.write_report(loaded, out_dir)
                text += f"\n\nreport and plots: {out_dir}"
            return text
        except Exception as exc:  # the sweep still ends cleanly with our own table
            print(f"note: analysis could not build the report ({type(exc).__name__}: {exc}); "
                  "showing a short table", file=sys.stderr)
    return format_rows(summary_rows(results))


__all__ = ["SweepConfig", "SweepPlan", "find_max_batch_size", "format_max_batch", "plan_sweep", "prepare",
           "results_table", "run_sweep"]
