"""The Ray Tune function trainable that trains each trial in a fresh fork (`fork_server`), not in its worker.

Every trial gets a fresh process (fresh CUDA context, fresh caching allocator: what it measures cannot depend on
the trials before it) without a process start, and the Tune worker, reused from trial to trial (`reuse_actors`),
never imports torch. The worker keeps what only it can do: the Tune session. It hands the child local copies of
the checkpoints Tune names for a restore, passes each report on with `tune.report`, and registers each checkpoint
the child wrote into the worker's spool directory. A child that dies or raises fails the trial (Tune restarts it
from its latest checkpoint); the worker dying kills the child (`fork_server`). `trainable.tune_trainable` is the
same trial in the worker's own process.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from .config import TrialConfig
from .fork_server import Send, fork_server, origin, preload_for, process_start_time

TARGET = "trainable.forked:train_child"


class TrialProcessError(RuntimeError):
    """The trial's process raised (its traceback is the message, ending in its own error line) or died."""


def forked_tune_trainable(config: dict) -> None:
    """Ray Tune function trainable: the trial `config` describes (TrialConfig keys), trained in a fresh fork."""
    from ray import tune

    from .observe import RayMetricsExporter

    # One INFO line per checkpoint would flood the driver's console; the results keep every checkpoint's path.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = TrialConfig.from_dict(config)
    exporter = RayMetricsExporter(cfg.label, cfg.batch_size)
    spool = tempfile.mkdtemp(prefix="trial_spool_")
    try:
        payload = {"config": cfg.to_dict(), "checkpoints": _local_checkpoints(tune.get_checkpoint(), spool),
                   "spool": spool, "worker_start_time": process_start_time()}
        error, final_seen = None, False
        for message in fork_server().run(TARGET, payload, preload_for(payload["config"])):
            if "report" in message:
                _report(message, tune)
                exporter.record(message["report"])
                final_seen = final_seen or message["report"].get("final") is True
            elif "error" in message:
                error = message
            elif "exit" in message:
                _raise_for(error, message["exit"], final_seen)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _report(message: dict[str, Any], tune) -> None:
    """One report to Tune, with its checkpoint when it has one (removed once Tune persisted it: the child's ack)."""
    if "checkpoint" not in message:
        tune.report(message["report"])
        return
    directory = message["checkpoint"]
    tune.report(message["report"], checkpoint=tune.Checkpoint.from_directory(directory))
    shutil.rmtree(directory, ignore_errors=True)


def _raise_for(error: dict[str, Any] | None, code: int, final_seen: bool) -> None:
    if error is not None:
        raise TrialProcessError(error.get("traceback") or error["error"])
    if code == 0:
        return
    words = f"signal {-code}" if code < 0 else f"exit status {code}"
    if final_seen:  # its results are all with Tune: a crash on the way out loses nothing
        logging.getLogger(__name__).warning("the trial's process ended with %s after its final report", words)
        return
    raise TrialProcessError(f"the trial's process ended with {words} before its final report")


def _local_checkpoints(checkpoint, spool: str) -> list[str]:
    """Local directories of the checkpoints to try, in order (`checkpoint_io._candidates`): storage paths as they
    are on a local or mounted filesystem, downloaded into the spool from a remote one (s3://, gs://)."""
    if checkpoint is None:
        return []
    import pyarrow.fs

    from .checkpoint_io import _candidates

    local = []
    for i, candidate in enumerate(_candidates(checkpoint)):
        if isinstance(candidate.filesystem, pyarrow.fs.LocalFileSystem):
            local.append(candidate.path)
            continue
        try:
            local.append(candidate.to_directory(os.path.join(spool, f"restore_{i}")))
        except (OSError, FileNotFoundError) as exc:  # the child reports the named one as unreadable
            logging.getLogger(__name__).warning("checkpoint %s could not be downloaded: %s", candidate.path, exc)
    return local


def train_child(payload: dict[str, Any], send: Send) -> None:
    """The child's side (`fork_server` target): the trial, its reports and checkpoints sent to the worker."""
    from .checkpoint_io import SpoolCheckpointIO
    from .observe import RayMetricsExporter
    from .trial import run_trial

    quiet = RayMetricsExporter()
    quiet.enabled = False  # the worker exports the dashboard's gauges: it is the process Ray knows
    run_trial(TrialConfig.from_dict(payload["config"]), lambda metrics: send({"report": metrics}),
              checkpoint_io=SpoolCheckpointIO(payload["checkpoints"], payload["spool"], send),
              exporter=quiet, origin=origin(payload))
