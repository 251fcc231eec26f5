"""Run a sweep: open (or join, or resume) the study, run trials until it has ``n_trials`` results, report.

A worker's loop, repeated until the study has enough results:

1. mark provably dead trials failed (``storage.fail_dead_trials``);
2. stop if results (completed + pruned) plus other workers' running trials already reach ``n_trials``;
3. ask Optuna for a trial and admit it only if fewer than ``n_trials`` trials are finished or running ahead
   of it (trial numbers are handed out in order by the storage, so two workers racing for the last slot
   agree on who gets it; the loser hands its still-empty trial back to the queue, where a later worker or
   rerun picks it up);
4. sample its settings, train it in ``SWEEP_DIR/trials/trial-NNNN`` (reporting the objective at every
   evaluation so the pruner can stop it), and tell Optuna the result.

Each worker loads the teacher once and reuses it for every trial.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..config import train_kwargs
from ..errors import ConfigError, DistilyError
from ..io import provenance, write_json_atomic, write_yaml_atomic
from ..run_folder import FAILED, PRUNED, RunFolder, now
from .config import MANIFEST_METRICS, SweepConfig, run_configs
from .storage import Heartbeat, fail_dead_trials, mask_url, open_storage, update_run_manifest, worker_id

logger = logging.getLogger(__name__)

DEFINITION_ATTR = "distily_sweep"
TRIALS_DIR = "trials"


class TrialError(DistilyError, RuntimeError):
    """A trial produced no usable objective (a non-positive metric for the geometric mean, NaN)."""


class MetricsError(ConfigError):
    """The sweep asks for a metric its runs do not report: every trial would fail, so the sweep stops."""


class TooManyFailures(ConfigError):
    """``max_failures`` trials failed in a row: the sweep's settings need fixing before more trials run."""


# ----------------------------------------------------------------------------------------------------------------
# Objective


def combine(sweep: SweepConfig, metrics: dict[str, Any]) -> tuple[list[float], dict[str, float]]:
    """The objective value(s) of ``metrics`` and the numbers reported beside them.

    Single objective: the geometric mean of ``sweep.metrics`` (the metric itself when there is one), each
    turned the way of the direction first (:meth:`SweepConfig.oriented`: a pass rate in a minimised mean is
    its failure rate, ``1 - pass@k``); the arithmetic mean is reported too. Multi-objective: one value per
    metric (means of metrics in different units, like perplexity and parameters, would mean nothing, so none
    are reported).
    """
    missing = [m for m in sweep.metrics if m not in metrics]
    if missing:
        available = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float))))
        raise MetricsError(f"The trial's run reported no {missing}. Metrics it reported: {available}. Fix metrics.")
    values = [float(metrics[m]) for m in sweep.metrics]
    if not all(math.isfinite(v) for v in values):
        raise TrialError(f"non-finite objective metrics {dict(zip(sweep.metrics, values, strict=True))}")
    if sweep.multi_objective:
        return values, {}
    values = [sweep.oriented(metric, value) for metric, value in zip(sweep.metrics, values, strict=True)]
    if not all(v > 0 for v in values):
        raise TrialError(
            f"the geometric mean needs positive metrics, got {dict(zip(sweep.metrics, values, strict=True))}"
        )
    geometric = math.exp(sum(math.log(v) for v in values) / len(values))
    return [geometric], {"geometric_mean": geometric, "arithmetic_mean": sum(values) / len(values)}


class PruningCallback(TrainerCallback):
    """Reports the objective at every evaluation during training; raises ``optuna.TrialPruned`` when told to.

    Evaluations before training starts and after it ends are not reported (they are not progress).
    """

    def __init__(self, trial, sweep: SweepConfig):
        self.trial, self.sweep = trial, sweep
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        import optuna

        if not self.training or not metrics or state.global_step == 0:
            return
        try:
            (value,), _ = combine(self.sweep, metrics)
        except TrialError:
            value = float("nan")  # a diverged trial: Optuna's pruners prune NaN
        self.trial.report(value, state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {state.global_step} (objective {value:.6g})")


# ----------------------------------------------------------------------------------------------------------------
# The worker


class TeacherCache:
    """One loaded teacher per worker, reused while trials ask for the same one."""

    def __init__(self):
        self.key: tuple | None = None
        self.value: tuple | None = None

    def get(self, teacher_args, config) -> tuple:
        from ..config import config_to_dict
        from ..run import load_run_teacher

        # Everything that changes what is loaded, or where: the teacher fields and its device.
        key = json.dumps([config_to_dict(teacher_args), str(config.teacher_device or config.device)], sort_keys=True)
        if key != self.key:
            self.key, self.value = None, None
            gc.collect()
            self.value = load_run_teacher(teacher_args, config)
            self.key = key
        return self.value


@dataclass
class SweepResult:
    """What a sweep (or this worker's part of it) left behind."""

    study_name: str
    storage: str
    directory: Path
    counts: dict[str, int] = field(default_factory=dict)
    best: list[dict[str, Any]] = field(default_factory=list)
    trials_run_here: list[int] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def open_study(sweep: SweepConfig, storage):
    """Create the study, or load it if it exists and was created from the same sweep definition."""
    import optuna

    exists = sweep.name in optuna.study.get_all_study_names(storage)
    trials_dir = sweep.directory / TRIALS_DIR
    if not exists and trials_dir.is_dir() and any(trials_dir.iterdir()):
        raise ConfigError(
            f"{str(trials_dir)!r} holds trials, but storage {mask_url(sweep.storage_url)!r} has no study "
            f"{sweep.name!r}: they belong to another study. Choose another --sweep_dir or --study_name, or pass "
            "the --storage those trials were run with."
        )
    study = optuna.create_study(
        storage=storage,
        study_name=sweep.name,
        directions=sweep.directions,
        sampler=sweep.make_sampler(None),
        pruner=sweep.make_pruner(),
        load_if_exists=True,
    )
    definition = json.loads(json.dumps(sweep.definition()))
    existing = study.user_attrs.get(DEFINITION_ATTR)
    if existing is None:
        study.set_user_attr(DEFINITION_ATTR, definition)
        for values in sweep.enqueue:
            study.enqueue_trial(sweep.encode_params(values, "enqueue"), skip_if_exists=True)
    elif existing != definition:
        changed = sorted(key for key in definition if existing.get(key) != definition[key])
        raise ConfigError(
            f"Study {sweep.name!r} in {mask_url(sweep.storage_url)!r} was created from a different sweep "
            f"definition (changed: {', '.join(changed)}); its trials would not be comparable. Pass a new "
            "--study_name, or undo the change. (n_trials, sampler, pruner and worker settings may change.)"
        )
    return study


class Worker:
    """One process's share of a sweep."""

    def __init__(self, sweep: SweepConfig, study, storage, command: list[str] | None):
        self.sweep, self.study, self.storage, self.command = sweep, study, storage, command
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.worker = worker_id()
        self.teachers = TeacherCache()
        self.ran: list[int] = []

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _counts(self, before: int | None = None) -> tuple[int, int]:
        """(results, running) where running counts only trials numbered below ``before`` when given."""
        from optuna.trial import TrialState

        results = running = 0
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                results += 1
            elif trial.state == TrialState.RUNNING and (before is None or trial.number < before):
                running += 1
        return results, running

    def run(self) -> None:
        from optuna.trial import TrialState

        failures = 0
        while True:
            fail_dead_trials(self.study, self.storage, self.sweep.grace_period)
            results, running = self._counts()
            if results + running >= self.sweep.n_trials:
                logger.info(
                    "Study %s has %d results and %d running trials (n_trials=%d): this worker stops.",
                    self.study.study_name, results, running, self.sweep.n_trials,
                )  # fmt: skip
                return
            trial = self.study.ask()
            results, ahead = self._counts(before=trial.number)
            if results + ahead >= self.sweep.n_trials:
                # Another worker took the last slot first: hand this (still empty) trial back to the queue.
                self.storage.set_trial_state_values(self._trial_id(trial.number), TrialState.WAITING)
                logger.info("Trial %d not needed (n_trials=%d reached): returned to the queue.", trial.number, results)
                return
            state = self.run_trial(trial)
            failures = failures + 1 if state == TrialState.FAIL else 0
            if failures >= self.sweep.max_failures:
                last_error = str(trial.user_attrs.get("error", "?"))[:300]
                raise TooManyFailures(
                    f"{failures} trials failed in a row (max_failures={self.sweep.max_failures}); the last, trial "
                    f"{trial.number}: {last_error}. See summary.md. Fix the sweep, then rerun the same command to "
                    "continue the study."
                )

    def run_trial(self, trial):
        """Sample, train, tell. Returns the trial's final state."""
        import optuna
        from optuna.trial import TrialState

        from ..run import train
        from .space import sample_config

        sweep = self.sweep
        self.study.sampler = sweep.make_sampler(trial.number)  # per-trial seed: see SweepConfig.make_sampler
        output_dir = (sweep.directory / TRIALS_DIR / f"trial-{trial.number:04d}").resolve()
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("output_dir", str(output_dir))
        trial.set_user_attr("heartbeat", time.time())
        self.ran.append(trial.number)
        started = time.time()
        with Heartbeat(self.storage, self._trial_id(trial.number), sweep.heartbeat_interval):
            try:
                flat, chosen = sample_config(sweep.params, sweep.fixed, lambda param: param.suggest(trial))
                flat["output_dir"] = str(output_dir)
                logger.info("Trial %d: %s", trial.number, json.dumps(chosen, default=str))
                run_args = train_kwargs(run_configs(flat, f"Trial {trial.number}'s config"))
                result = train(
                    **run_args,
                    command=self.command,
                    callbacks=[PruningCallback(trial, sweep)] if sweep.pruner != "none" else None,
                    # A recorded teacher (--teacher_cache) is never loaded.
                    loaded_teacher=None
                    if run_args["config"].teacher_cache
                    else self.teachers.get(run_args["teacher_args"], run_args["config"]),
                )
                metrics = self._metrics(result)
                del result
                values, reported = combine(sweep, metrics)
                trial.set_user_attr("metrics", {m: metrics[m] for m in sweep.metrics})
                for key, value in reported.items():
                    trial.set_user_attr(key, value)
                trial.set_user_attr("seconds", round(time.time() - started, 1))
                if not sweep.keep_weights:
                    _drop_weights(output_dir)
                update_run_manifest(output_dir, sweep=self._sweep_note(trial), objective=values)
            except optuna.TrialPruned as pruned:
                trial.set_user_attr("seconds", round(time.time() - started, 1))
                update_run_manifest(
                    output_dir,
                    status=PRUNED,
                    pruned_at=now(),
                    reason=str(pruned),
                    sweep=self._sweep_note(trial),
                )
                _drop_weights(output_dir)
                self.study.tell(trial, state=TrialState.PRUNED)
                logger.info("Trial %d %s.", trial.number, pruned)
                return TrialState.PRUNED
            except MetricsError as err:
                self._fail(trial, output_dir, err)
                raise
            except (Exception, KeyboardInterrupt) as err:
                self._fail(trial, output_dir, err)
                if isinstance(err, KeyboardInterrupt):
                    raise
                logger.exception("Trial %d failed.", trial.number)
                return TrialState.FAIL
            finally:
                gc.collect()
        self.study.tell(trial, values if sweep.multi_objective else values[0])
        logger.info("Trial %d: objective %s.", trial.number, values)
        return TrialState.COMPLETE

    def _metrics(self, result) -> dict[str, Any]:
        manifest = RunFolder(result.output_dir).manifest
        numbers = {key: manifest[key] for key in MANIFEST_METRICS if isinstance(manifest.get(key), (int, float))}
        return {**numbers, **result.train_metrics, **result.metrics_after, **result.task_metrics}

    def _sweep_note(self, trial) -> dict[str, Any]:
        return {"study": self.study.study_name, "trial": trial.number, "storage": mask_url(self.sweep.storage_url)}

    def _fail(self, trial, output_dir: Path, err: BaseException) -> None:
        from optuna.trial import TrialState

        if isinstance(err, KeyboardInterrupt):
            message = "interrupted (KeyboardInterrupt)"
        else:
            message = f"{type(err).__name__}: {err}"
        trial.set_user_attr("error", message[:2000])
        update_run_manifest(
            output_dir,
            status=FAILED,
            failed_at=now(),
            error=message[:2000],
            sweep=self._sweep_note(trial),
        )
        self.study.tell(trial, state=TrialState.FAIL)
        logger.warning("Trial %d failed: %s", trial.number, message)


def _drop_weights(output_dir: Path) -> None:
    """Remove a trial's model weights and checkpoints, keeping its config, metrics and logs."""
    RunFolder(output_dir).drop_weights()


def run_sweep(sweep: SweepConfig, command: list[str] | None = None) -> SweepResult:
    """Run this worker's share of ``sweep`` and write the study's summary and plots.

    Start as many workers as you like, on as many machines as reach the storage, with the same command: they
    share the study and stop once it has ``sweep.n_trials`` results. Rerunning a killed sweep continues it.
    """
    from .report import write_report

    storage = open_storage(sweep.storage_url, create_dirs=None if sweep.storage else sweep.directory)
    study = open_study(sweep, storage)
    sweep.directory.mkdir(parents=True, exist_ok=True)
    write_yaml_atomic(sweep.directory / "sweep.yaml", {k: v for k, v in sweep.to_dict().items() if k != "source"})
    write_json_atomic(
        sweep.directory / "sweep_run.json",
        {
            **provenance(),
            "study": sweep.name,
            "storage": mask_url(sweep.storage_url),
            "source": sweep.source,
            "command": " ".join(command) if command else None,
            "last_worker": worker_id(),
            "last_started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    worker = Worker(sweep, study, storage, command)
    try:
        worker.run()
    except BaseException:
        try:  # the summary of what did finish is still worth having; the original error is what matters
            write_report(sweep, study)
        except Exception:
            logger.exception("Could not write the sweep summary.")
        raise
    summary = write_report(sweep, study)
    return SweepResult(
        study_name=sweep.name,
        storage=mask_url(sweep.storage_url),
        directory=sweep.directory,
        counts=summary["counts"],
        best=summary["best"],
        trials_run_here=worker.ran,
        summary=summary,
    )
