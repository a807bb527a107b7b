"""The OOM-aware max-batch-size search on Ray Tune: every probe is its own trial process.

One Tune experiment holds every probe (so the dashboard and `analysis.load` see them as trials);
a Tune `Searcher` drives `search.MaxBatchSearch` for each technique in turn: it hands out one round
of k probes (k = GPUs), waits for all of them, classifies each (fits / OOM / error) and asks the
search for the next round. `reuse_actors=False` gives every probe a fresh process, so allocator
state after an OOM never biases the next probe. Records go to STORAGE/NAME/max_batch.json
(Contract 3), rewritten after every finished technique.

A probe costs a whole trial process (worker start, CUDA init, a few steps: ~12-15 s on an H200),
so each search is seeded with the memory model's predicted max batch (`hints`) and starts next to
the answer. Every record also says what the unseeded search would have cost, replayed against the
outcomes the found answer implies (no extra probe), so the saving is measured, not assumed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from contract.experiment import GRID_KEY, KIND_KEY, MAX_BATCH_FILE
from contract.io import write_json_atomic
from contract.techniques import technique_label

from .grid import trial_name
from .probe import MaxBatchSettings, classify_probe, probe_config
from .search import MaxBatchSearch, Outcome, SearchResult, replay_search
from .tuning import experiment_path, name_trial, sweep_trainable

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
        self._next_target()

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its searcher with the experiment; a running search (a generator) is not resumable."""
        state = dict(self.__dict__)
        state.pop("_steps", None)
        return state

    # -- search driving --------------------------------------------------------------------------
    def _next_target(self) -> None:
        """Start the next technique's search (skipping ones that need no probe)."""
        while True:
            self._index += 1
            if self._index >= len(self.targets):
                self._steps = None
                return
            hint = self.targets[self._index].hint
            self._search = MaxBatchSearch(**self._search_settings(),
                                          hint=hint["max_batch"] if hint else None)
            self._steps = self._search.steps()
            try:
                self._pending = list(next(self._steps))
                return
            except StopIteration as done:
                self._finish(done.value)

    def _search_settings(self) -> dict[str, int]:
        s = self.settings
        return dict(start=s.start, max_batch_size=s.max_batch_size, granularity=s.granularity,
                    parallelism=s.parallelism)

    def _finish(self, res: SearchResult) -> None:
        target = self.targets[self._index]
        unseeded = (replay_search(res.max_batch_size, **self._search_settings())
                    if res.status == "ok" and res.max_batch_size is not None else None)
        record = {
            "label": target.label,
            "technique": target.preset,
            "window": target.window,
            "max_batch_size": res.max_batch_size,
            "peak_mem_mib": res.peak_mem_mib,
            "probes": res.probes,
            "rounds": res.rounds,
            "wall_time_s": round(res.wall_time_s, 3),
            "gpu_memory_gb": target.base.get("gpu_memory_gb"),
            "status": res.status,
            "error": res.error,
            "hit_upper_bound": res.hit_upper_bound,
            "granularity": self.settings.granularity,
            "parallelism": self.settings.parallelism,
            "probe_steps": self.settings.probe_steps,
            "start": self.settings.start,
            "max_bound": self.settings.max_batch_size,
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
    out_file = f"{experiment_path(storage, name)}/{MAX_BATCH_FILE}"
    searcher_box: list[MaxBatchSearcher] = []

    def save(_record: dict[str, Any]) -> None:
        write_json_atomic(out_file, searcher_box[0].records)

    searcher = MaxBatchSearcher(max_batch_targets(grid), settings, on_record=save, hints=hints)
    searcher_box.append(searcher)
    tuner = tune.Tuner(
        tune.with_resources(sweep_trainable, resources),
        param_space={},
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=settings.parallelism,
            reuse_actors=False,
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
