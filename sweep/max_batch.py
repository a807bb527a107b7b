"""The OOM-aware max-batch-size search on Ray Tune: every probe is a trial, trained in a fresh process.

One Tune experiment holds every probe (so the dashboard and `analysis.load` see them as trials);
a Tune `Searcher` drives the search for each technique in turn, in rounds of k probes (k = GPUs): it
waits for all of a round, classifies each (fits / OOM / error) and asks the search for the next round.

Each technique's first probe is a *scout* (`probe.scout`): one fresh process that runs the whole search
inside itself, seeded with the memory model's predicted max batch (`hints`) when there is one, each
in-process probe a few steps, no process start. Its answer is then confirmed by fresh-process probes
(`search.MaxBatchSearch(expect=...)`): the pair at its edge, then a gallop and a bisection if either
disagrees. So an exact scout costs 3 probes; the answer is always what fresh processes proved, so
allocator state after an OOM never biases it. Every probe trains in a fork of a server in its Tune
worker (`trainable.fork_server`): a fresh process without a process start; the workers are reused
(`reuse_actors`) to keep their servers. Records go to STORAGE/NAME/max_batch.json (Contract 3), rewritten
after every finished technique. Every record also says what the unseeded search without a scout would
have cost, replayed against the outcomes the found answer implies (no extra probe).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from contract.experiment import GRID_KEY, KIND_KEY, MAX_BATCH_FILE
from contract.io import write_json_atomic
from contract.techniques import technique_label

from .grid import trial_name
from .probe import SCOUT_KEY, MaxBatchSettings, classify_probe, probe_config, probe_trainable
from .search import MaxBatchSearch, Outcome, SearchResult, replay_search
from .tuning import experiment_path, name_trial

_SCOUT = -1  # a pending probe that is the technique's scout

@dataclass
class _Target:
    base: dict[str, Any]
    label: str
    preset: str
    window: int | None
    hint: dict[str, Any] | None = None  # predicted max batch (+ budget_mib, vocab_size), None: unseeded


class MaxBatchSearcher(Searcher):
    """Tune searcher running `MaxBatchSearch` for each target (technique, window) in turn."""

    def __init__(self, targets: list[dict[str, Any]], settings: MaxBatchSettings,
                 on_record: Callable[[dict[str, Any]], None], hints: dict[str, dict[str, Any]] | None = None):
        super().__init__()
        hints = hints or {}
        self.targets = []
        for t in targets:
            label = technique_label(t)
            self.targets.append(_Target(base=t, label=label, preset=t["technique"], window=t.get("window"),
                                        hint=hints.get(label)))
        self.settings = settings
        self.on_record = on_record
        self.errors: dict[str, BaseException | str] = {}  # trial_id -> error (filled by ProbeErrors)
        self.records: list[dict[str, Any]] = []
        self._index = -1
        self._steps = None
        self._pending: list[int] = []  # batch sizes of this round not handed out yet
        self._in_flight: dict[str, int] = {}  # trial_id -> batch size
        self._done: dict[str, tuple[dict | None, bool]] = {}  # trial_id -> (last result, errored)
        self._peaks: dict[str, float] = {}
        self._scout_trial: str | None = None  # the running scout's trial id
        self._scouted: dict[str, Any] | None = None  # the current technique's scout result, once it ran
        self._t0 = time.perf_counter()
        self._next_target()

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its searcher with the experiment; a running search (a generator) is not resumable."""
        state = dict(self.__dict__)
        state.pop("_steps", None)
        return state

    # -- search driving --------------------------------------------------------------------------
    def _next_target(self) -> None:
        """Start the next technique's search: its scout, or its first round of fresh probes."""
        self._index += 1
        if self._index >= len(self.targets):
            self._steps = None
            return
        self._t0, self._scouted = time.perf_counter(), None
        if self.settings.scout:
            self._steps, self._pending = iter(()), [_SCOUT]
            return
        self._start_fresh(None)

    def _start_fresh(self, expect: int | None) -> None:
        """The fresh-probe search of the current technique: confirming `expect` (the scout's answer), else
        seeded with the predicted max batch, else growing from --start."""
        hint = self.targets[self._index].hint
        self._steps = MaxBatchSearch(**self._search_settings(), hint=hint["max_batch"] if hint and expect is None
                                     else None, expect=expect).steps()
        try:
            self._pending = list(next(self._steps))
        except StopIteration as done:
            self._finish(done.value)
            self._next_target()

    def _scout_spec(self) -> dict[str, Any]:
        hint = self.targets[self._index].hint
        s = self.settings
        return {"start": s.start, "max_bound": s.max_bound, "granularity": s.granularity,
                "probe_steps": s.probe_steps, "hint": hint["max_batch"] if hint else None}

    def _search_settings(self) -> dict[str, int]:
        s = self.settings
        return dict(start=s.start, max_bound=s.max_bound, granularity=s.granularity,
                    parallelism=s.parallelism)

    def _finish(self, res: SearchResult) -> None:
        target = self.targets[self._index]
        unseeded = (replay_search(res.max_batch_size, **self._search_settings())
                    if res.status == "ok" and res.max_batch_size is not None else None)
        scouted = int(self._scouted is not None)  # the scout is a probe and a round of its own
        record = {
            "label": target.label,
            "technique": target.preset,
            "window": target.window,
            "max_batch_size": res.max_batch_size,
            "peak_mem_mib": res.peak_mem_mib,
            "probes": res.probes + scouted,
            "rounds": res.rounds + scouted,
            "wall_time_s": round(time.perf_counter() - self._t0, 3),
            "gpu_memory_gb": target.base.get("gpu_memory_gb"),
            "status": res.status,
            "error": res.error,
            "hit_upper_bound": res.hit_upper_bound,
            "granularity": self.settings.granularity,
            "parallelism": self.settings.parallelism,
            "probe_steps": self.settings.probe_steps,
            "start": self.settings.start,
            "max_bound": self.settings.max_bound,
            "device": target.base.get("device"),
            "seq_len": target.base.get("seq_len"),
            "outcomes": {str(bs): o.kind.value for bs, o in sorted(res.history.items())},
            "seeded": target.hint is not None,
            "predicted_max_batch": target.hint["max_batch"] if target.hint else None,
            "predicted_budget_mib": target.hint["budget_mib"] if target.hint else None,
            "unseeded_probes": unseeded.probes if unseeded else None,
            "unseeded_rounds": unseeded.rounds if unseeded else None,
        }
        self.records.append(record)
        self.on_record(record)

    def _round_complete(self) -> None:
        """Classify the finished round and advance the search (possibly to the next technique)."""
        if self._scout_trial is not None:
            self._scout_done()
            return
        outcomes: dict[int, Outcome] = {}
        for trial_id, bs in self._in_flight.items():
            result, errored = self._done[trial_id]
            error = self.errors.get(trial_id) or ("trial failed without an error message" if errored else None)
            outcomes[bs] = classify_probe(result, error, self.settings.probe_steps, self._peaks.get(trial_id))
        self._in_flight.clear()
        try:
            self._pending = list(self._steps.send(outcomes))
        except StopIteration as done:
            self._finish(done.value)
            self._next_target()

    def _scout_done(self) -> None:
        """Confirm the scout's answer with fresh probes (or, when it found none, search as without a scout)."""
        trial_id, self._scout_trial = self._scout_trial, None
        result, errored = self._done[trial_id]
        self._in_flight.clear()
        result = result or {}
        error = self.errors.get(trial_id) if errored else None
        self._scouted = {"max_batch": result.get("scout_max_batch"), "error": result.get("scout_error") or error}
        expect = result.get("scout_max_batch") if not errored else None
        self._start_fresh(int(expect) if isinstance(expect, (int, float)) and not isinstance(expect, bool) else None)

    def _suggest_scout(self, trial_id: str) -> dict[str, Any]:
        spec = self._scout_spec()
        first = min(spec["hint"] or spec["start"], spec["max_bound"])  # where the scout's search begins
        config = probe_config(self.targets[self._index].base, max(first, 1), spec["probe_steps"])
        self._scout_trial, self._in_flight[trial_id] = trial_id, config["batch_size"]
        return {**config, SCOUT_KEY: spec, GRID_KEY: trial_name(config, kind="probe") + "_scout", KIND_KEY: "probe"}

    # -- Searcher API ------------------------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        """What a restart could use: the finished techniques' records."""
        write_json_atomic(checkpoint_path, self.records)

    def restore(self, checkpoint_path: str) -> None:
        import json

        with open(checkpoint_path) as f:
            self.records = json.load(f)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._in_flight and all(t in self._done for t in self._in_flight) and not self._pending:
            self._round_complete()
        if self._steps is None:
            return Searcher.FINISHED if not self._in_flight else None
        if not self._pending:
            return None  # wait for the round to finish
        bs = self._pending.pop(0)
        if bs == _SCOUT:
            return self._suggest_scout(trial_id)
        self._in_flight[trial_id] = bs
        config = probe_config(self.targets[self._index].base, bs, self.settings.probe_steps)
        return {**config, GRID_KEY: trial_name(config, kind="probe"), KIND_KEY: "probe"}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        peak = result.get("mem_step_peak_mib")
        if isinstance(peak, (int, float)) and not math.isnan(peak):
            self._peaks[trial_id] = max(self._peaks.get(trial_id, 0.0), float(peak))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result:
            self.on_trial_result(trial_id, result)
        self._done[trial_id] = (result, error)


class ProbeErrors(tune.Callback):
    """Hands each failed probe's error text to the searcher (Tune tells a searcher only *that* it failed)."""

    def __init__(self, searcher: MaxBatchSearcher):
        self.searcher = searcher

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error: BaseException | str | None = None
        try:
            error = trial.get_pickled_error()
        except Exception:  # unpicklable error: its text is in error.txt
            error = None
        if error is None:
            try:
                error = trial.get_error()
            except Exception:
                error = None
        self.searcher.errors[trial.trial_id] = error if error is not None else "trial failed"


def max_batch_targets(grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One base config per technique label (and window) of the grid; the batch size is the search's."""
    targets: dict[str, dict[str, Any]] = {}
    for point in grid:
        targets.setdefault(technique_label(point), point)
    return list(targets.values())


def run_max_batch_search(
    grid: list[dict[str, Any]],
    settings: MaxBatchSettings,
    *,
    storage: str,
    name: str,
    resources: dict[str, float],
    verbose: int = 1,
    hints: dict[str, dict[str, Any]] | None = None,
    callbacks: list | None = None,
) -> list[dict[str, Any]]:
    """Search every technique of the grid; returns (and writes) the Contract 3 records.

    `hints`: technique label -> {"max_batch": predicted answer, "budget_mib": ...}; a technique with a
    hint starts its search there (see `search.MaxBatchSearch`), one without grows from `settings.start`.
    """
    import logging

    # A scout's outcome list is not a scalar TensorBoard can plot: Tune would warn about it on every scout.
    logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.ERROR)
    out_file = f"{experiment_path(storage, name)}/{MAX_BATCH_FILE}"
    searcher_box: list[MaxBatchSearcher] = []

    def save(_record: dict[str, Any]) -> None:
        write_json_atomic(out_file, searcher_box[0].records)

    searcher = MaxBatchSearcher(max_batch_targets(grid), settings, on_record=save, hints=hints)
    searcher_box.append(searcher)
    tuner = tune.Tuner(
        tune.with_resources(probe_trainable, resources),
        param_space={},
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=settings.parallelism,
            reuse_actors=True,  # a worker keeps its probe server; every probe still trains in a fresh fork
            trial_name_creator=name_trial,
            trial_dirname_creator=name_trial,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[ProbeErrors(searcher), *(callbacks or [])],
            verbose=verbose,
        ),
    )
    tuner.fit()
    if not searcher.records:  # nothing ran (e.g. no targets): still leave a valid file
        write_json_atomic(out_file, [])
    return searcher.records
