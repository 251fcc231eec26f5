"""A sweep definition: fixed run settings, a search space, the objective, the sampler and pruner, the storage.

A sweep is a YAML file whose top-level keys are the fields of :class:`SweepConfig`; ``distily sweep FILE``
flags override them, and any run flag (``--max_steps 20``) overrides a fixed setting. Everything is checked in
``__post_init__``, before any trial starts: unknown fields, bad ranges, unknown samplers or pruners, objective
settings that do not fit together, and every end of every range is built into a real run config once, so a
value the run would refuse (``alpha: {low: 0.5, high: 1.5}``) is reported now rather than in trial 7.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import math
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ConfigError, check_known_keys, known_fields, load_yaml_file, train_kwargs
from ..registry import Registry
from .space import SearchParam, config_from_params, parse_search_space, sample_config

DIRECTIONS = ("minimize", "maximize")
# Metrics a trial reports besides the eval_* / train_* metrics of its run: numbers from its run manifest.
MANIFEST_METRICS = ("student_parameters", "teacher_parameters", "wall_time_seconds", "global_step")
# Benchmarks a run evaluates when training ends (--eval_tasks, distily.run_eval), named <task>_pass@<k>. A pass
# rate is better higher: in a minimised geometric mean it enters as its failure rate, 1 - pass@k.
TASK_METRIC = re.compile(r"^(?P<task>humaneval)_pass@[1-9][0-9]*$")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (pass rates); every other metric is better lower."""
    return TASK_METRIC.match(metric) is not None


# Fields of a run that the sweep sets itself for each trial.
RESERVED_FIELDS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint")

SAMPLERS: Registry = Registry("sampler", "distily.sweep.SAMPLERS.register")
PRUNERS: Registry = Registry("pruner", "distily.sweep.PRUNERS.register")


@SAMPLERS.register("tpe")
def _tpe(seed: int | None, **kwargs):
    """Tree-structured Parzen estimator, Optuna's default Bayesian sampler (single and multi-objective)."""
    from optuna.samplers import TPESampler

    return TPESampler(seed=seed, **kwargs)


@SAMPLERS.register("random")
def _random(seed: int | None, **kwargs):
    """Uniform random search: a baseline for the Bayesian samplers."""
    from optuna.samplers import RandomSampler

    return RandomSampler(seed=seed, **kwargs)


@SAMPLERS.register("nsgaii")
def _nsgaii(seed: int | None, **kwargs):
    """NSGA-II genetic algorithm, for multi-objective sweeps (e.g. perplexity vs student size)."""
    from optuna.samplers import NSGAIISampler

    return NSGAIISampler(seed=seed, **kwargs)


@PRUNERS.register("none")
def _no_pruner(**kwargs):
    """Never prune: every trial trains to the end."""
    from optuna.pruners import NopPruner

    return NopPruner(**kwargs)


@PRUNERS.register("median")
def _median(**kwargs):
    """Stop a trial whose intermediate objective is worse than the median of earlier trials at the same step."""
    from optuna.pruners import MedianPruner

    return MedianPruner(**kwargs)


@PRUNERS.register("hyperband")
def _hyperband(**kwargs):
    """Hyperband: successive halving over several brackets of budgets (steps)."""
    from optuna.pruners import HyperbandPruner

    return HyperbandPruner(**kwargs)


@PRUNERS.register("successive_halving")
def _successive_halving(**kwargs):
    """Asynchronous successive halving: keep the top 1/reduction_factor of trials at each rung."""
    from optuna.pruners import SuccessiveHalvingPruner

    return SuccessiveHalvingPruner(**kwargs)


@contextlib.contextmanager
def quiet_experimental():
    """Optuna flags some of the arguments we pass as experimental; the warning is noise for sweep users."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def run_configs(flat: dict[str, Any], source: str = "The sweep's fixed settings") -> tuple:
    """The run's dataclasses from a flat dict, converting values the way flags and --config files are converted
    (YAML reads ``5e-4`` as text; the parser turns it into the float the field needs)."""
    from ..config import run_parser

    check_known_keys(flat, source)
    parser = run_parser()

    def error(message: str):
        raise ConfigError(f"{source}: {message}")

    parser.error = error
    parser.set_defaults(**flat)
    objects = parser.parse_args_into_dataclasses(args=[])
    return tuple(obj for obj in objects if not isinstance(obj, argparse.Namespace))


def mix_seed(seed: int, number: int) -> int:
    """A per-trial sampler seed: distinct for every trial, the same on every machine and in every rerun.

    Hashed through numpy's ``SeedSequence``: seeds that differ by a little (``seed + number``) give Mersenne
    Twister streams whose first draws are visibly correlated, and a sampler uses only a few draws per trial.
    """
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


@dataclass
class SweepConfig:
    """A hyper-parameter sweep over distillation runs (see ``docs/sweeps.md``)."""

    search_space: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Config path -> distribution: {low, high[, log, step]}, [choices] or {choices: [..]}."},
    )
    fixed: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Run settings shared by every trial (any distily flag)."}
    )
    study_name: str | None = field(default=None, metadata={"help": "Optuna study name (default: the file's name)."})
    sweep_dir: str | None = field(
        default=None, metadata={"help": "Folder for trials, summary and plots (default: runs/sweeps/STUDY_NAME)."}
    )
    storage: str | None = field(
        default=None,
        metadata={
            "help": "Where the study lives: a SQLAlchemy URL (sqlite:///file.db, postgresql://user:pw@host/db) "
            "shared by every worker, or journal:PATH for a journal file. Default: sqlite in the sweep folder."
        },
    )
    n_trials: int = field(
        default=20,
        metadata={"help": "Trials with a result (completed or pruned) the study should reach, over all workers."},
    )
    metrics: list[str] = field(
        default_factory=lambda: ["eval_student_ppl"],
        metadata={"help": "Metrics of a trial's run; several are combined by their geometric mean."},
    )
    direction: str | list[str] = field(
        default="minimize",
        metadata={"help": "minimize or maximize; with multi_objective, one per metric (or one for all)."},
    )
    multi_objective: bool = field(
        default=False, metadata={"help": "Optimise each metric as its own objective (a Pareto front)."}
    )
    sampler: str = field(default="tpe", metadata={"help": f"One of {', '.join(SAMPLERS)}."})
    sampler_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Arguments of the sampler."})
    sampler_seed: int | None = field(default=None, metadata={"help": "Seed for reproducible sampling."})
    pruner: str = field(default="none", metadata={"help": f"One of {', '.join(PRUNERS)}."})
    pruner_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Arguments of the pruner."})
    enqueue: list[dict[str, Any]] = field(
        default_factory=list, metadata={"help": "Parameter sets to try first (e.g. a known good config)."}
    )
    heartbeat_interval: float = field(
        default=10.0, metadata={"help": "Seconds between a running trial's heartbeats in the storage."}
    )
    grace_period: float = field(
        default=120.0,
        metadata={"help": "Seconds without a heartbeat after which a running trial counts as dead (failed)."},
    )
    max_failures: int = field(default=3, metadata={"help": "A worker stops after this many failed trials in a row."})
    keep_weights: bool = field(
        default=True, metadata={"help": "Keep each trial's student weights (false: keep only config and metrics)."}
    )
    source: str | None = field(default=None, metadata={"help": "The YAML file this sweep was read from."})

    def __post_init__(self):
        if not isinstance(self.fixed, dict):
            raise ConfigError(f"fixed must be a mapping of run settings, got {type(self.fixed).__name__}.")
        check_known_keys(self.fixed, "The sweep's fixed settings")
        reserved = [name for name in RESERVED_FIELDS if name in self.fixed]
        if reserved:
            raise ConfigError(
                f"fixed sets {reserved}, which the sweep sets for each trial (trials run in "
                "SWEEP_DIR/trials/trial-NNNN). Set sweep_dir instead."
            )
        if not self.fixed.get("teacher"):
            raise ConfigError("fixed needs a teacher (e.g. teacher: smollm2-135m-instruct).")
        self.params: list[SearchParam] = parse_search_space(self.search_space, self.fixed)
        for param in self.params:
            if param.path.split(".")[0] in RESERVED_FIELDS:
                raise ConfigError(f"search_space cannot sweep {param.path!r}: the sweep sets it for each trial.")

        if not isinstance(self.n_trials, int) or isinstance(self.n_trials, bool) or self.n_trials < 0:
            raise ConfigError(f"n_trials must be a whole number >= 0, got {self.n_trials!r}.")
        if isinstance(self.metrics, str):
            self.metrics = [m.strip() for m in self.metrics.split(",") if m.strip()]
        if not self.metrics or not all(isinstance(m, str) for m in self.metrics):
            raise ConfigError(f"metrics must be a non-empty list of metric names, got {self.metrics!r}.")
        if len(set(self.metrics)) != len(self.metrics):
            raise ConfigError(f"metrics {self.metrics} name a metric twice.")
        for metric in self.metrics:
            task_metric = TASK_METRIC.match(metric)
            if task_metric:
                self._check_task_metric(metric, task_metric["task"])
            elif not (metric.startswith(("eval_", "train_")) or metric in MANIFEST_METRICS):
                raise ConfigError(
                    f"metric {metric!r} is not something a run reports: use an eval_* metric (eval_student_ppl, "
                    f"eval_loss, ...), a train_* metric, humaneval_pass@K (with eval_tasks: humaneval), or one of "
                    f"{', '.join(MANIFEST_METRICS)}."
                )
        self.directions = self._directions()

        if self.sampler not in SAMPLERS:
            raise ConfigError(SAMPLERS.unknown_message(self.sampler) + " Fix sampler.")
        if self.pruner not in PRUNERS:
            raise ConfigError(PRUNERS.unknown_message(self.pruner) + " Fix pruner.")
        for name in ("sampler_kwargs", "pruner_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping, got {getattr(self, name)!r}.")
        if self.sampler_seed is not None and (
            not isinstance(self.sampler_seed, int) or isinstance(self.sampler_seed, bool) or self.sampler_seed < 0
        ):
            raise ConfigError(f"sampler_seed must be a whole number >= 0 (or unset), got {self.sampler_seed!r}.")
        self.make_sampler(0)
        self.make_pruner()
        for name in ("heartbeat_interval", "grace_period"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}.")
        if self.grace_period <= 2 * self.heartbeat_interval:
            raise ConfigError(
                f"grace_period ({self.grace_period} s) must exceed twice heartbeat_interval "
                f"({self.heartbeat_interval} s), or a live trial that is a little late would be marked failed."
            )
        if not isinstance(self.max_failures, int) or self.max_failures < 1:
            raise ConfigError(f"max_failures must be a whole number >= 1, got {self.max_failures!r}.")
        if not isinstance(self.enqueue, list) or not all(isinstance(e, dict) for e in self.enqueue):
            raise ConfigError("enqueue must be a list of {search_space path: value} mappings.")
        for index, values in enumerate(self.enqueue):
            self.encode_params(values, f"enqueue[{index}]")
        self._probe()

    # -- objective ---------------------------------------------------------------------------------------------

    def _check_task_metric(self, metric: str, task: str) -> None:
        """A benchmark metric needs every trial's run to evaluate that benchmark when its training ends."""
        tasks = [t.strip() for t in str(self.fixed.get("eval_tasks") or "").split(",")]
        if task not in tasks or self.fixed.get("allow_code_execution") is not True:
            raise ConfigError(
                f"metric {metric!r} is measured when a run evaluates {task} at the end of training: add "
                f"eval_tasks: {task} and allow_code_execution: true to fixed (and eval_tasks_limit: N for a "
                "quicker look)."
            )

    def oriented(self, metric: str, value: float) -> float:
        """``value`` as it enters a single objective: a pass rate in a minimised mean is its failure rate."""
        if higher_is_better(metric) and self.directions[0] == "minimize":
            return 1.0 - value
        return value

    def _directions(self) -> list[str]:
        given = self.direction if isinstance(self.direction, list) else [self.direction]
        bad = [d for d in given if d not in DIRECTIONS]
        if bad:
            raise ConfigError(f"direction {bad[0]!r} is not one of {', '.join(DIRECTIONS)}.")
        if not self.multi_objective:
            if len(given) != 1:
                raise ConfigError(
                    f"direction lists {len(given)} directions, but a single objective (the geometric mean of "
                    f"{self.metrics}) has one. Give one direction, or set multi_objective: true."
                )
            if self.pruner != "none" and not all(m.startswith("eval_") for m in self.metrics):
                raise ConfigError(
                    f"pruning reports the objective at each evaluation during training, but {self.metrics} are not "
                    "all eval_* metrics. Use eval_* metrics or pruner: none."
                )
            return given
        if len(self.metrics) < 2:
            raise ConfigError("multi_objective needs at least two metrics (one objective each).")
        if len(given) == 1:
            given = given * len(self.metrics)
        if len(given) != len(self.metrics):
            raise ConfigError(f"direction gives {len(given)} directions for {len(self.metrics)} metrics.")
        if self.pruner != "none":
            raise ConfigError("Optuna cannot prune multi-objective studies: set pruner: none with multi_objective.")
        return given

    # -- building samplers, pruners and trial configs ---------------------------------------------------------

    def make_sampler(self, trial_number: int | None = None):
        """The sampler for one trial: seeded per trial when ``sampler_seed`` is set (see docs/sweeps.md)."""
        seed = None if self.sampler_seed is None or trial_number is None else mix_seed(self.sampler_seed, trial_number)
        try:
            with quiet_experimental():
                return SAMPLERS[self.sampler](seed, **self.sampler_kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"sampler {self.sampler!r} does not accept sampler_kwargs {self.sampler_kwargs}: {err}"
            ) from None

    def make_pruner(self):
        try:
            with quiet_experimental():
                return PRUNERS[self.pruner](**self.pruner_kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"pruner {self.pruner!r} does not accept pruner_kwargs {self.pruner_kwargs}: {err}"
            ) from None

    def encode_params(self, values: dict[str, Any], where: str) -> dict[str, Any]:
        """Config values by search-space path -> the parameters Optuna stores (checked against the space)."""
        by_path = {param.path: param for param in self.params}
        encoded = {}
        for path, value in values.items():
            if path not in by_path:
                raise ConfigError(f"{where} names {path!r}, which is not a search_space entry ({list(by_path)}).")
            encoded[path] = by_path[path].encode(value, where)
        return encoded

    def trial_config(self, chosen: dict[str, Any], output_dir: str | Path) -> dict[str, Any]:
        """A trial's flat run config from config values by path (already decoded)."""
        flat, _ = sample_config(self.params, self.fixed, lambda param: chosen[param.path])
        flat["output_dir"] = str(output_dir)
        return flat

    def config_from_params(self, stored: dict[str, Any], output_dir: str | Path) -> dict[str, Any]:
        """A trial's flat run config from the parameters Optuna stored for it."""
        flat = config_from_params(self.params, self.fixed, stored)
        flat["output_dir"] = str(output_dir)
        return flat

    def _probe(self) -> None:
        """Build a real run config at every end of every range (and every choice) before any trial runs."""
        first = {param.path: param.extremes()[0] for param in self.params}
        probe_dir = "/nonexistent/distily-sweep-probe"
        checked_eval = False
        for param in self.params:
            for value in param.extremes():
                chosen = dict(first, **{param.path: value})
                for path, allowed in param.when:  # make this entry's condition hold
                    if path in chosen:
                        chosen[path] = allowed[0]
                flat = self.trial_config(chosen, probe_dir)
                try:
                    configs = run_configs(flat)
                except (TypeError, ValueError) as err:  # ConfigError is a ValueError
                    raise ConfigError(
                        f"search_space.{param.path} = {value!r} gives an invalid run config: {err}"
                    ) from None
                if not checked_eval:
                    self._check_pruning(train_kwargs(configs)["config"])
                    checked_eval = True

    def _check_pruning(self, config) -> None:
        strategy = getattr(config.eval_strategy, "value", config.eval_strategy)
        if self.pruner != "none" and strategy == "no":
            raise ConfigError(
                f"pruner {self.pruner!r} needs evaluations during training: add eval_strategy: steps and "
                "eval_steps: N to fixed (each evaluation reports the objective), or set pruner: none."
            )

    # -- names and places ----------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        if self.study_name:
            return self.study_name
        return Path(self.source).stem if self.source else "distily-sweep"

    @property
    def directory(self) -> Path:
        return Path(self.sweep_dir) if self.sweep_dir else Path("runs") / "sweeps" / self.name

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.directory / 'study.db').resolve()}"

    def definition(self) -> dict[str, Any]:
        """What makes trials comparable: a study refuses to continue under a different definition."""
        return {
            "search_space": copy.deepcopy(self.search_space),
            "fixed": copy.deepcopy(self.fixed),
            "metrics": list(self.metrics),
            "directions": list(self.directions),
            "multi_objective": self.multi_objective,
        }

    def to_dict(self) -> dict[str, Any]:
        return {item.name: copy.deepcopy(getattr(self, item.name)) for item in fields(self)}


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_sweep(path: str | Path, fixed_overrides: dict[str, Any] | None = None, **overrides) -> SweepConfig:
    """Read a sweep YAML file; ``overrides`` replace its top-level fields, ``fixed_overrides`` its run settings."""
    values = load_yaml_file(path)
    valid = {item.name for item in fields(SweepConfig)} - {"source"}
    unknown = [key for key in values if key not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            if not close and key in known_fields():
                close = [f"fixed: {{{key}: ...}}"]
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"Sweep file {str(path)!r} has unknown keys: {', '.join(hints)}.")
    values.update({key: value for key, value in overrides.items() if value is not None})
    if fixed_overrides:
        fixed = dict(values.get("fixed") or {})
        swept = [key for key in fixed_overrides if key in (values.get("search_space") or {})]
        if swept:
            raise ConfigError(f"{swept} are in the search_space of {str(path)!r}; they cannot also be fixed by a flag.")
        fixed.update(fixed_overrides)
        values["fixed"] = fixed
    return SweepConfig(**values, source=str(path))


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sweep_argv(argv: list[str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``distily sweep FILE [--sweep_field VALUE ...] [--run_flag VALUE ...]`` -> (file, overrides, fixed)."""
    parser = argparse.ArgumentParser(
        prog="distily sweep",
        allow_abbrev=False,  # a run flag must never be taken for an abbreviated sweep flag
        description="Run (or join, or resume) an Optuna sweep over distillation settings. Sweep fields as flags "
        "override the file; any other distily flag (e.g. --max_steps 20) overrides a fixed run setting.",
    )
    parser.add_argument("sweep_file", help="A sweep YAML file, e.g. sweeps/loss_and_temperature.yaml.")
    for item in fields(SweepConfig):
        if item.name in ("search_space", "fixed", "source"):
            continue
        parser.add_argument(f"--{item.name}", type=_yaml_value, default=None, help=item.metadata.get("help"))
    known, rest = parser.parse_known_args(argv)
    overrides = {key: value for key, value in vars(known).items() if key != "sweep_file" and value is not None}
    for key in ("study_name", "sweep_dir", "storage"):  # always text, even when YAML would read a number
        if key in overrides:
            overrides[key] = str(overrides[key])
    fixed: dict[str, Any] = {}
    valid = known_fields()
    index = 0
    while index < len(rest):
        flag = rest[index]
        name = flag[2:].split("=", 1)[0] if flag.startswith("--") else None
        if name is None or name not in valid:
            close = difflib.get_close_matches(str(name or flag).lstrip("-"), sorted(valid), n=1)
            hint = f" Did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"distily sweep: {flag!r} is neither a sweep flag nor a distily run flag.{hint}")
        if "=" in flag:
            fixed[name] = _yaml_value(flag.split("=", 1)[1])
            index += 1
        elif index + 1 < len(rest):
            fixed[name] = _yaml_value(rest[index + 1])
            index += 2
        else:
            raise ConfigError(f"distily sweep: {flag} needs a value.")
    return known.sweep_file, overrides, fixed
