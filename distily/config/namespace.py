"""One flat namespace for flags and YAML files: every field of the run's dataclasses is a flag and a YAML key."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..errors import ConfigError
from .data import DataArguments
from .eval import RunEvalArguments
from .export import ExportArguments
from .student import PeftArguments, StudentArguments
from .teacher import TeacherArguments
from .training import DistillationConfig

RUN_ARGUMENT_CLASSES = (
    TeacherArguments,
    StudentArguments,
    PeftArguments,
    DataArguments,
    DistillationConfig,
    ExportArguments,
    RunEvalArguments,
)
# The keyword under which distily.run.train() takes each of them.
TRAIN_ARGUMENT_NAMES = {
    TeacherArguments: "teacher_args",
    StudentArguments: "student_args",
    PeftArguments: "peft_args",
    DataArguments: "data_args",
    DistillationConfig: "config",
    ExportArguments: "export_args",
    RunEvalArguments: "eval_args",
}
# Never written to a saved config: secrets stay out of files that get shared.
SECRET_FIELDS = ("hub_token",)


def train_kwargs(configs) -> dict[str, Any]:
    """Parsed run dataclasses (any order) as keyword arguments of :func:`distily.run.train`."""
    return {TRAIN_ARGUMENT_NAMES[type(config)]: config for config in configs}


def config_to_dict(*configs) -> dict[str, Any]:
    """The init fields of each dataclass as one flat, YAML-safe dict (enums as their values, no secrets)."""
    from enum import Enum

    flat: dict[str, Any] = {}
    for config in configs:
        for item in fields(config):
            if not item.init or item.name.startswith("_") or item.name in SECRET_FIELDS:
                continue
            value = getattr(config, item.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, list):
                value = [v.value if isinstance(v, Enum) else v for v in value]
            elif hasattr(value, "to_dict") and not isinstance(value, dict):
                value = value.to_dict()
            flat[item.name] = value
    return flat


def run_parser(classes=RUN_ARGUMENT_CLASSES):
    from transformers import HfArgumentParser

    return HfArgumentParser(classes)


def known_fields(classes=RUN_ARGUMENT_CLASSES) -> set[str]:
    return {item.name for cls in classes for item in fields(cls) if item.init}


def check_known_keys(values: dict, source: str, classes=RUN_ARGUMENT_CLASSES) -> None:
    """Unknown keys in a config file are an error that names the closest valid key."""
    import difflib

    valid = known_fields(classes)
    unknown = [key for key in values if key not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source} has unknown settings: {', '.join(hints)}. Every key must be a distily flag.")


def load_yaml_file(path) -> dict[str, Any]:
    """A YAML mapping of flag names to values; errors name the file and the problem."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"Config file {str(path)!r} does not exist.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of flag: value, not {type(values).__name__}.")
    return values


def configs_from_dict(values: dict[str, Any], classes=RUN_ARGUMENT_CLASSES, source: str = "config"):
    """Build every dataclass of ``classes`` from one flat dict (e.g. a run's saved config: see
    :meth:`distily.run_folder.RunFolder.configs`)."""
    check_known_keys(values, source, classes)
    return tuple(
        cls(**{item.name: values[item.name] for item in fields(cls) if item.init and item.name in values})
        for cls in classes
    )
