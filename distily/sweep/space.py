"""A search space over any field of a run's config, addressed by name.

Each entry of a sweep's ``search_space`` maps a *path* to a distribution::

    learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}          # float, log-uniform
    student_config.num_hidden_layers: {low: 2, high: 8, step: 2}    # int (both ends are ints)
    loss: [forward_kl, reverse_kl, generalized_jsd]                 # categorical (short form)
    loss_kwargs.beta: {low: 0.1, high: 0.9, when: {loss: generalized_jsd}}   # only for that loss
    student_config: {choices: [{num_hidden_layers: 4}, {num_hidden_layers: 6, intermediate_size: 1024}]}

A path is a config field name (any field of ``distily.config.RUN_ARGUMENT_CLASSES``: the distillation, data,
teacher and student fields and every ``TrainingArguments`` field), optionally followed by ``.key`` segments
that reach into a dict-valued field (``student_config``, ``loss_kwargs``, ``lr_scheduler_kwargs``, ...) or,
with an integer segment, into a list. Fields are checked against the dataclasses themselves, so fields added
to the config later can be swept without touching this code.

``when`` makes an entry conditional on earlier entries (or fixed settings): it is sampled only in trials where
every named path has the given value (or one of a list of values); otherwise the field keeps its fixed value.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from ..config import RUN_ARGUMENT_CLASSES, ConfigError, known_fields

SPEC_KEYS = {"low", "high", "log", "step", "type", "choices", "when"}
TYPES = ("float", "int", "categorical")
# Optuna stores categorical choices of these types as they are; others (dicts, lists) travel as JSON strings.
PRIMITIVES = (str, int, float, bool, type(None))


def _field_types(classes=RUN_ARGUMENT_CLASSES) -> dict[str, str]:
    """Each field's annotation as written (``"dict | str | None"``), to tell which fields hold dicts or lists.

    Read from the classes' ``__annotations__``: ``HfArgumentParser`` rewrites ``Field.type`` in place (a
    ``dict | str`` field becomes ``str``), so the dataclass fields no longer tell.
    """
    annotations: dict[str, str] = {}
    for cls in classes:
        for klass in reversed(cls.__mro__):
            annotations.update({name: str(kind) for name, kind in vars(klass).get("__annotations__", {}).items()})
    return annotations


def split_path(path: str) -> list[str]:
    parts = path.split(".")
    if not path or any(not part for part in parts):
        raise ConfigError(f"search_space key {path!r} is not a valid path: use 'field' or 'field.key.subkey'.")
    return parts


def check_path(path: str, where: str, classes=RUN_ARGUMENT_CLASSES) -> list[str]:
    """Split ``path`` and check that its first segment is a config field that can hold nested keys if needed."""
    parts = split_path(path)
    valid = known_fields(classes)
    if parts[0] not in valid:
        close = difflib.get_close_matches(parts[0], sorted(valid), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{where}: {parts[0]!r} is not a config field.{hint} Every key must be a distily flag (a field of "
            "TeacherArguments, StudentArguments, DataArguments or DistillationConfig), optionally followed by "
            ".key to reach into a dict field, e.g. 'student_config.num_hidden_layers' or 'loss_kwargs.beta'."
        )
    if len(parts) > 1:
        annotation = _field_types(classes)[parts[0]]
        if "dict" not in annotation and "list" not in annotation:
            raise ConfigError(
                f"{where}: {path!r} reaches into {parts[0]!r}, which is not a dict or list field "
                f"(its type is {annotation}). Use {parts[0]!r} on its own."
            )
    return parts


def _container(value: Any, field_name: str) -> Any:
    """A dict/list field's value as a fresh container (JSON strings are parsed, None becomes {})."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{field_name} is not valid JSON ({err.msg}): {value!r}.") from None
    return copy.deepcopy(value)


def get_path(values: dict[str, Any], path: str) -> tuple[bool, Any]:
    """``(found, value)`` of ``path`` in a flat config dict."""
    parts = split_path(path)
    if parts[0] not in values:
        return False, None
    current = values[parts[0]]
    if len(parts) > 1:
        current = _container(current, parts[0])
    for part in parts[1:]:
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return False, None
    return True, current


def set_path(values: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` in a flat config dict, creating intermediate dict keys; dict fields given as JSON are parsed."""
    parts = split_path(path)
    if len(parts) == 1:
        values[path] = copy.deepcopy(value)
        return
    root = _container(values.get(parts[0]), parts[0])
    current = root
    for depth, part in enumerate(parts[1:], start=1):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth])
        if isinstance(current, list):
            if not part.isdigit() or int(part) >= len(current):
                raise ConfigError(f"{path!r}: {where} is a list of {len(current)} items; {part!r} is not an index.")
            index = int(part)
            if last:
                current[index] = copy.deepcopy(value)
            else:
                current = current[index]
        elif isinstance(current, dict):
            if last:
                current[part] = copy.deepcopy(value)
            else:
                current = current.setdefault(part, {})
        else:
            raise ConfigError(f"{path!r}: {where} holds {current!r}, not a dict or list.")
    values[parts[0]] = root


def _number(value: Any, where: str) -> float | int:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: accept numeric strings, refuse anything else."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}.")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}.") from None
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    raise ConfigError(f"{where} must be a number, got {value!r}.")


def _encode(choice: Any) -> Any:
    return choice if isinstance(choice, PRIMITIVES) else json.dumps(choice, sort_keys=True)


@dataclass(frozen=True)
class SearchParam:
    """One entry of a search space: a path, its distribution, and the condition under which it is sampled."""

    path: str
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()

    @property
    def encoded_choices(self) -> tuple:
        """Choices as Optuna stores them (dicts and lists as JSON strings)."""
        return tuple(_encode(choice) for choice in self.choices)

    def decode(self, stored: Any) -> Any:
        """A value as Optuna stored it, turned back into the config value."""
        if self.kind == "categorical":
            for choice in self.choices:
                if _encode(choice) == stored:
                    return copy.deepcopy(choice)
            raise ConfigError(f"{self.path}: {stored!r} is not one of the choices {list(self.choices)}.")
        if self.kind == "int":
            return int(stored)
        return float(stored)

    def suggest(self, trial) -> Any:
        """Sample this entry in an Optuna trial; returns the config value (decoded)."""
        if self.kind == "categorical":
            return self.decode(trial.suggest_categorical(self.path, list(self.encoded_choices)))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def encode(self, value: Any, where: str) -> Any:
        """A config value as Optuna stores it, checked to lie in this entry's range or choices."""
        if self.kind == "categorical":
            if value not in self.choices:
                raise ConfigError(f"{where}: {self.path}={value!r} is not one of the choices {list(self.choices)}.")
            return _encode(value)
        number = _number(value, f"{where}: {self.path}")
        if not self.low <= number <= self.high or (self.kind == "int" and not float(number).is_integer()):
            raise ConfigError(f"{where}: {self.path}={value!r} is outside [{self.low}, {self.high}] ({self.kind}).")
        return int(number) if self.kind == "int" else float(number)

    def extremes(self) -> list[Any]:
        """The values probed before a sweep starts: both ends of a range, every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def active(self, values: dict[str, Any]) -> bool:
        """Whether every ``when`` condition holds for ``values`` (a flat config being built)."""
        for path, allowed in self.when:
            found, value = get_path(values, path)
            if not found or value not in allowed:
                return False
        return True


def parse_param(path: str, spec: Any, earlier: list[str], fixed: dict[str, Any]) -> SearchParam:
    """Check one ``search_space`` entry and turn it into a :class:`SearchParam`."""
    where = f"search_space.{path}"
    check_path(path, f"search_space key {path!r}")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where} must be a range {{low: .., high: ..}}, a list of choices or {{choices: [..]}}, got {spec!r}. "
            "To fix a value for every trial, put it under 'fixed:' instead."
        )
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; allowed: {sorted(SPEC_KEYS)}.")
    kind = spec.get("type")
    if kind is not None and kind not in TYPES:
        raise ConfigError(f"{where}: type {kind!r} is not one of {', '.join(TYPES)}.")
    when = _parse_when(spec.get("when"), where, earlier, fixed)

    if "choices" in spec:
        if kind not in (None, "categorical") or any(key in spec for key in ("low", "high", "log", "step")):
            raise ConfigError(f"{where}: give either choices or a low/high range, not both.")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}.")
        encoded = [_encode(choice) for choice in choices]
        if len(set(map(json.dumps, encoded))) != len(encoded):
            raise ConfigError(f"{where}: choices {choices} contain duplicates.")
        return SearchParam(path, "categorical", choices=tuple(choices), when=when)

    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where} needs both low and high (or a list of choices), got {spec!r}.")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    step = _number(spec["step"], f"{where}.step") if spec.get("step") is not None else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log must be true or false, got {log!r}.")
    if kind is None:
        kind = "int" if all(isinstance(v, int) for v in (low, high, step) if v is not None) else "float"
    if kind == "categorical":
        raise ConfigError(f"{where}: type categorical needs choices, not low/high.")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step) if v is not None):
        raise ConfigError(f"{where}: an int range needs whole numbers, got low={low}, high={high}, step={step}.")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{where}: low must be less than high (both finite), got low={low}, high={high}.")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got low={low}.")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: step must be > 0, got {step}.")
    if step is not None and log:
        raise ConfigError(f"{where}: step and log cannot be combined (Optuna samples either a grid or a log scale).")
    if step is not None and step > high - low:
        raise ConfigError(f"{where}: step {step} is larger than the range [{low}, {high}].")
    if kind == "int":
        low, high, step = int(low), int(high), int(step) if step is not None else None
    else:
        low, high, step = float(low), float(high), float(step) if step is not None else None
    return SearchParam(path, kind, low=low, high=high, log=log, step=step, when=when)


def _parse_when(when: Any, where: str, earlier: list[str], fixed: dict[str, Any]) -> tuple:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{where}.when must be a mapping of path: value(s), e.g. {{loss: generalized_jsd}}.")
    conditions = []
    for path, allowed in when.items():
        if path not in earlier and not get_path(fixed, path)[0]:
            raise ConfigError(
                f"{where}.when refers to {path!r}, which is neither an earlier search_space entry nor a fixed "
                f"setting. Earlier entries: {earlier or 'none'}."
            )
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if path not in earlier and get_path(fixed, path)[1] not in allowed:
            raise ConfigError(
                f"{where}.when: {path} is fixed to {get_path(fixed, path)[1]!r}, not {list(allowed)}, so this entry "
                "would never be sampled. Fix the condition or remove the entry."
            )
        conditions.append((path, allowed))
    return tuple(conditions)


def parse_search_space(space: Any, fixed: dict[str, Any]) -> list[SearchParam]:
    """Every entry of a ``search_space`` mapping, in order; errors name the entry and the fix."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            "search_space must be a non-empty mapping of config field -> distribution, e.g. "
            "{temperature: {low: 0.5, high: 4.0}}."
        )
    params: list[SearchParam] = []
    for path, spec in space.items():
        if not isinstance(path, str):
            raise ConfigError(f"search_space key {path!r} must be a field name (a string).")
        params.append(parse_param(path, spec, [p.path for p in params], fixed))
    paths = [p.path for p in params]
    for param in params:
        if get_path(fixed, param.path)[0]:
            raise ConfigError(
                f"{param.path!r} is both fixed and in search_space. Remove it from one of them (a fixed value "
                "is used for every trial; a search_space entry is sampled per trial)."
            )
        prefixes = [other for other in paths if param.path.startswith(other + ".")]
        for other in prefixes:
            whole = next(p for p in params if p.path == other)
            if whole.kind != "categorical" or paths.index(other) > paths.index(param.path):
                raise ConfigError(
                    f"search_space: {param.path!r} is inside {other!r}; sweep the whole field as choices of dicts "
                    "listed before it, or only its parts."
                )
    return params


def sample_config(params: list[SearchParam], fixed: dict[str, Any], choose) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flat config of one trial: ``fixed`` with each active entry set to ``choose(param)``.

    Returns ``(flat_config, chosen)`` where ``chosen`` maps each sampled path to its config value.
    """
    flat = copy.deepcopy(fixed)
    chosen: dict[str, Any] = {}
    for param in params:
        if not param.active(flat):
            continue
        value = choose(param)
        chosen[param.path] = value
        set_path(flat, param.path, value)
    return flat, chosen


def config_from_params(params: list[SearchParam], fixed: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a trial's flat config from the parameters Optuna stored for it (e.g. the best trial's)."""
    by_path = {param.path: param for param in params}
    unknown = sorted(set(stored) - set(by_path))
    if unknown:
        raise ConfigError(f"Trial parameters {unknown} are not in this sweep's search_space.")

    def choose(param: SearchParam) -> Any:
        if param.path not in stored:
            raise ConfigError(f"The trial has no value for {param.path!r}, yet its condition holds.")
        return param.decode(stored[param.path])

    flat, _ = sample_config(params, fixed, choose)
    return flat
