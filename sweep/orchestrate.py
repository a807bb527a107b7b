"""Running a planned sweep: connect Ray, check the cluster can run it, run the grid or the max-batch search.

    plan = prepare(cfg)              # validate, plan, check the data, connect, check resources and storage
    results, path = run_sweep(cfg, plan)
    records, path = find_max_batch_size(cfg, plan)

The driver imports neither torch nor the training code: trials import it on their own workers.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from contract.experiment import GRID_FILE, MAX_BATCH_FILE, PREDICTIONS_FILE
from contract.io import counted, error_line, is_uri, write_json_atomic

from .config import SweepConfig
from .connect import ClusterInfo, check_storage, connect
from .errors import SweepError
from .plan import MAX_FAILURES, SweepPlan, check_data, plan_sweep, require_gpus
from .resume_state import mark_finished, use_valid_state
from .tuning import TRAINABLES, cluster_gpus, largest_node, local_gpus, name_trial, param_space, trial_resources

# Tune keeps each trial's newest checkpoint only. Not 2: Tune forces its experiment directory (each trial's
# result.json with it) to storage every `num_to_keep` checkpoints, and a restarted trial's result.json is first
# replaced by the copy in storage: with 2, the steps reported since the sync before the last checkpoint were lost
# on a restart (tests/test_fault_tolerance.py). Our checkpoints are whole before Tune registers them.
CHECKPOINTS_KEPT = 1


def runs_locally(cfg: SweepConfig) -> bool:
    """The trials run on this node: a local Ray instance, not --address / RAY_ADDRESS."""
    return cfg.address == "local" or (cfg.address is None and not os.environ.get("RAY_ADDRESS"))


def known_gpus(cfg: SweepConfig) -> int | None:
    """The GPUs trials will get, when known without connecting: a local instance's (an in-process Ray's)."""
    if not runs_locally(cfg):
        return None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return cluster_gpus()
    return local_gpus()


def prepare(cfg: SweepConfig) -> SweepPlan:
    """Validate and plan (before Ray for a local run), check the data, connect, check the cluster fits."""
    local = runs_locally(cfg)
    info: ClusterInfo | None = None
    gpus = known_gpus(cfg)
    if not local:
        cfg.validate()  # a bad flag never waits for a connection
        info = connect(cfg.address, log_to_driver=cfg.verbose >= 2)
        gpus = None if info.can_autoscale and not info.num_gpus else int(info.num_gpus)  # None: may come
    plan = plan_sweep(cfg, gpus)
    if plan.sample is not None:
        _prepare_sample(*plan.sample)
    check_data(plan, verify="full")
    if info is None:
        info = connect(cfg.address, log_to_driver=cfg.verbose >= 2)
        require_gpus(plan, int(info.num_gpus), cfg.address)
    plan = replace(plan, storage=check_storage(plan.storage, info, shared=cfg.shared_storage))
    check_resources(plan, info.can_autoscale)
    if info.multi_node:  # a node with other code or without --data: one line, before any trial is scheduled
        from .preflight import check_cluster

        check_cluster(plan.data_dir)
    _say_dashboard(info, cfg.verbose)
    return plan


def _prepare_sample(out_dir: str, vocab: int, seq_len: int) -> None:
    from data_prep import prepare_dataset

    print(f"preparing the shipped Polish sample into {out_dir} (once)", file=sys.stderr)
    prepare_dataset(out_dir=out_dir, tokenizer="bpe", vocab_size=vocab, seq_len=seq_len, seed=0, progress=False)


def _say_dashboard(info: ClusterInfo, verbose: int) -> None:
    if verbose < 1 or not info.started_local:
        return
    url = _dashboard_url()
    if url:
        sign_in = " (sign in with the token `ray get-auth-token` prints)" if info.auth_mode == "token" else ""
        print(f"Ray dashboard: {url}{sign_in}", file=sys.stderr)


def _dashboard_url() -> str | None:
    try:
        import ray

        url = ray.get_runtime_context().dashboard_url if hasattr(ray.get_runtime_context(), "dashboard_url") else None
        url = url or ray._private.worker.global_worker.node.address_info.get("webui_url")
    except Exception:  # noqa: BLE001 - a dashboard-less Ray: nothing to say
        return None
    return f"http://{url}" if url and not url.startswith("http") else url


def check_resources(plan: SweepPlan, can_autoscale: bool = False) -> None:
    """A trial's request must fit on one node, or Tune would wait for it forever. On an autoscaling cluster
    (cluster.yaml's GPU workers start at 0) the node may not exist yet: then say so and let Tune wait for it."""
    cfg = plan.cfg
    need_cpu = cfg.cpus_per_trial or 1
    have_cpu = largest_node("CPU")
    problems = []
    if need_cpu > have_cpu:
        problems.append((f"--cpus-per-trial {need_cpu}: no node of the cluster has that many CPUs (the largest has "
                         f"{have_cpu:g})", "; trials would wait forever"))
    if plan.use_gpu and largest_node("GPU") < 1:
        problems.append(("the grid needs a GPU per trial but no node of the cluster has one", ": use --device cpu"))
    for what, remedy in problems:
        if not can_autoscale:
            raise SweepError(what + remedy)
        print(f"note: {what} yet; its trials wait until the autoscaler adds one", file=sys.stderr)


# -- the grid ----------------------------------------------------------------------------------------------
def _tune_verbosity(verbose: int) -> int:
    return 2 if verbose >= 2 else 0


def _callbacks(plan: SweepPlan, total: int) -> list:
    """The compact trial lines below --verbose 2; at 2 Tune prints its own, and a resume still forgets the
    checkpoints a killed driver's state named but storage no longer holds (MissingCheckpoints)."""
    from .progress import MissingCheckpoints, TrialLines

    return [MissingCheckpoints()] if plan.cfg.verbose >= 2 else [TrialLines(total, plan.cfg.verbose)]


def _quiet_ray(verbose: int) -> None:
    """Ray Tune's INFO lines (result files written, TensorBoard hints) only at --verbose 2."""
    import logging

    if verbose < 2:
        for name in ("ray.tune", "ray.train", "ray.air"):
            logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's new output engine prints its configuration box even when silent; the old one is silent at 0.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose >= 2 else "0"


def write_predictions(plan: SweepPlan) -> None:
    """The memory model's peaks for the trials (and the seed grid on named GPUs), for the report (no torch)."""
    from .predict import prediction_rows_for

    try:
        write_json_atomic(f"{plan.path}/{PREDICTIONS_FILE}", prediction_rows_for(plan))
    except Exception as exc:  # noqa: BLE001 - a prediction is a courtesy; the sweep still runs
        print(f"note: no memory predictions for the report ({type(exc).__name__}: {exc})", file=sys.stderr)


def run_sweep(cfg: SweepConfig, plan: SweepPlan | None = None):
    """Run (or resume) the grid on Ray Tune; returns (ResultGrid, experiment path)."""
    from ray import tune

    from .predict import local_gpu_total_mib, predicted_oom_notice

    plan = plan or prepare(cfg)
    if plan.notice:
        print(plan.notice, file=sys.stderr)
    note = predicted_oom_notice(plan, local_gpu_total_mib() if runs_locally(cfg) else None)
    if note:
        print(note, file=sys.stderr)
    _quiet_ray(cfg.verbose)
    resources = trial_resources(plan.use_gpu, cfg.cpus_per_trial)
    trainable = tune.with_resources(TRAINABLES[cfg.trial_process], resources)
    if cfg.resume:
        use_valid_state(plan.path)
        finished = mark_finished(plan.path)
        if finished and cfg.verbose >= 1:
            print(f"note: {', '.join(finished)} finished before the driver stopped (final report saved, Tune's "
                  "state not yet): recorded as finished, not run again", file=sys.stderr)
        if cfg.verbose >= 1:
            print(f"resuming {plan.path}", file=sys.stderr)
        try:
            tuner = tune.Tuner.restore(plan.path, trainable=trainable, resume_unfinished=True, restart_errored=True,
                                       param_space=param_space(plan.grid))
        except (ValueError, RuntimeError) as exc:  # Tune's own refusal (e.g. a changed param space): one line
            raise SweepError(f"--resume {plan.path}: Ray Tune cannot restore it: {error_line(exc)}") from exc
    else:
        write_json_atomic(f"{plan.path}/{GRID_FILE}", {"preset": plan.preset_name, "use_gpu": plan.use_gpu,
                                                        "resources": resources, "grid": plan.grid})
        write_predictions(plan)
        if cfg.verbose >= 1:
            print(f"{counted(len(plan.grid), 'trial')} ({plan.preset_name} grid), {resources} each -> {plan.path}",
                  file=sys.stderr)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(plan.grid),
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent, reuse_actors=reuse_actors(plan),
                                        trial_name_creator=name_trial, trial_dirname_creator=name_trial),
            run_config=tune.RunConfig(
                name=plan.name, storage_path=plan.storage,
                # A failed trial (a lost node, a killed worker) restarts from its latest checkpoint.
                failure_config=tune.FailureConfig(
                    max_failures=MAX_FAILURES if cfg.max_failures is None else cfg.max_failures, fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                callbacks=_callbacks(plan, len(plan.grid)), verbose=_tune_verbosity(cfg.verbose),
            ),
        )
    return tuner.fit(), plan.path


def reuse_actors(plan: SweepPlan) -> bool:
    """Whether a finished trial's Tune worker runs the slot's next trial: as asked, else yes, but not on a resume
    (restored trials start from checkpoints: a reused worker was seen handed a deleted one) and, for trials that
    train in the worker itself, not when a trial compiles.

    A forked trial (the default) trains in a fresh process whatever its worker ran before, so reuse only keeps the
    worker's warm fork server. A trial in a reused worker is reset to a fresh process's state
    (trainable.setup.reset_process): on an H200 every eager technique then measured the same memory to the MiB as
    in a fresh process (tests/test_reuse_cuda.py), but reused workers died of SIGSEGV after FlexAttention trials."""
    if plan.cfg.reuse_actors is not None:
        return plan.cfg.reuse_actors
    if plan.cfg.resume:
        return False
    return plan.cfg.trial_process == "fork" or not any(compiles(p, plan.use_gpu) for p in plan.grid)


def compiles(point: dict[str, Any], use_gpu: bool) -> bool:
    """Whether a grid point compiles: torch.compile, or FlexAttention (it compiles its kernel on CUDA)."""
    from trainable.kernels import select_kernel_name

    return bool(point["compile"]) or (use_gpu and select_kernel_name(
        point["attention"], point["precision"], "cuda", point.get("kernel") or "auto") == "flex")


def incomplete_trials(results) -> list[str]:
    """Trials without a final report and without an error: stopped by an interrupt."""
    names = []
    for result in results:
        metrics = result.metrics or {}
        if result.error is None and metrics.get("final") is not True:
            names.append(str((result.config or {}).get("trial_name") or Path(str(result.path)).name))
    return sorted(names)


def resume_command(cfg: SweepConfig, plan: SweepPlan) -> str:
    address = f" --address {shlex.quote(cfg.address)}" if cfg.address else ""
    return (f"python -m sweep.run --resume --name {shlex.quote(plan.name)} --storage-path "
            f"{shlex.quote(plan.storage)}{address}")


# -- the max-batch search ---------------------------------------------------------------------------------
def find_max_batch_size(cfg: SweepConfig, plan: SweepPlan | None = None) -> tuple[list[dict[str, Any]], str]:
    """The max-batch search for every technique (and window) of the grid; returns (records, path)."""
    from data_prep import open_dataset

    from .max_batch import run_max_batch_search
    from .predict import local_gpu_total_mib, search_hints
    from .probe import MaxBatchSettings

    plan = plan or prepare(replace(cfg, find_max_batch=True))
    if plan.notice:
        print(plan.notice, file=sys.stderr)
    _quiet_ray(cfg.verbose)
    rows = open_dataset(plan.data_dir, verify="none").split("train").num_rows
    upper = min(cfg.max_batch or rows, rows)
    if cfg.max_batch and cfg.max_batch > rows:
        print(f"note: the dataset has {rows} training rows: the search stops at batch size {rows}", file=sys.stderr)
    if cfg.granularity > upper:
        raise SweepError(f"--granularity {cfg.granularity} is larger than the largest batch size to try ({upper})")
    parallelism = cfg.max_concurrent or (cluster_gpus() if plan.use_gpu else 1) or 1
    start = min(cfg.start or (32 if plan.use_gpu else 1), upper)
    settings = MaxBatchSettings(start=start, max_bound=upper, granularity=cfg.granularity,
                                probe_steps=cfg.probe_steps, parallelism=parallelism)
    hints: dict[str, dict[str, Any]] = {}
    if plan.use_gpu and cfg.seed_search:
        hints, line = search_hints(plan, local_gpu_total_mib() if runs_locally(cfg) else None)
        print(line, file=sys.stderr)
    print(f"max-batch search over {len(plan.grid)} techniques, {parallelism} probe(s) per round, "
          f"batch {'near the predicted max' if hints else start}..{upper}, granularity {cfg.granularity} "
          f"-> {plan.path}/{MAX_BATCH_FILE}", file=sys.stderr)
    records = run_max_batch_search(plan.grid, settings, storage=plan.storage, name=plan.name,
                                   resources=trial_resources(plan.use_gpu, cfg.cpus_per_trial),
                                   verbose=_tune_verbosity(cfg.verbose), hints=hints,
                                   callbacks=_callbacks(plan, 0))
    return records, plan.path


# -- the end ----------------------------------------------------------------------------------------------
def results_table(path: str) -> tuple[str, Any]:
    """(the comparison and max-batch tables from `analysis`, the loaded results): printed before the report's
    plots are drawn, so the table the user waits for comes first."""
    import analysis

    loaded = analysis.load(path)
    text = analysis.format_table(loaded)
    if max_batch := analysis.format_max_batch_table(loaded):
        text += "\n\n" + max_batch
    return text, loaded


def write_report(path: str, loaded: Any) -> str | None:
    """The report and plots next to local results; the directory, or None for storage URIs."""
    import analysis

    if is_uri(path):
        return None
    out_dir = str(Path(path) / "analysis")
    analysis.write_report(loaded, out_dir)
    return out_dir
