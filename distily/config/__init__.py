"""Typed, self-validating configuration.

A run is described by five dataclasses, each validated in ``__post_init__`` with errors that say what to
change:

* :class:`TeacherArguments` -- which teacher and how to load it;
* :class:`StudentArguments` -- how to build the student from the teacher (or which pretrained student to use);
* :class:`PeftArguments` -- LoRA/DoRA adapters instead of training every student weight;
* :class:`DataArguments` -- the corpus and how to split it;
* :class:`DistillationConfig` -- a :class:`transformers.TrainingArguments` with the distillation fields.

Every field is a command-line flag of ``distily`` (same name) and a key of a ``--config run.yaml`` file.

The dataclasses live beside what they configure, one module each (``teacher``, ``student``, ``data``,
``objective``, ``training``, ``export``, ``eval``); ``namespace`` joins them into one flat set of flags and YAML
keys. This package imports only :mod:`distily.errors` and the registries it validates names against.
"""

from __future__ import annotations

from ..errors import ConfigError
from .data import DataArguments
from .eval import LM_EVAL_BACKENDS, EvalConfig, RunEvalArguments
from .export import EXPORT_FORMATS, ExportArguments, ExportConfig, parse_formats
from .namespace import (
    RUN_ARGUMENT_CLASSES,
    SECRET_FIELDS,
    TRAIN_ARGUMENT_NAMES,
    check_known_keys,
    config_to_dict,
    configs_from_dict,
    known_fields,
    load_yaml_file,
    run_parser,
    train_kwargs,
)
from .objective import (
    COMPONENT_DEFAULTS,
    COMPONENT_KEYS,
    DEFAULT_OBJECTIVE,
    SIGNALS,
    ObjectiveComponent,
    objective_components,
    parse_objective,
)
from .parsing import normalise_switch, parse_json_dict
from .student import STUDENT_INITS, PeftArguments, StudentArguments
from .teacher import TEACHER_DTYPES, TeacherArguments
from .training import CHUNKED_LOSS_CHOICES, TEACHER_SHARDINGS, DistillationConfig

__all__ = [
    "CHUNKED_LOSS_CHOICES",
    "COMPONENT_DEFAULTS",
    "COMPONENT_KEYS",
    "DEFAULT_OBJECTIVE",
    "EXPORT_FORMATS",
    "LM_EVAL_BACKENDS",
    "RUN_ARGUMENT_CLASSES",
    "SECRET_FIELDS",
    "SIGNALS",
    "STUDENT_INITS",
    "TEACHER_DTYPES",
    "TEACHER_SHARDINGS",
    "TRAIN_ARGUMENT_NAMES",
    "ConfigError",
    "DataArguments",
    "DistillationConfig",
    "EvalConfig",
    "ExportArguments",
    "ExportConfig",
    "ObjectiveComponent",
    "PeftArguments",
    "RunEvalArguments",
    "StudentArguments",
    "TeacherArguments",
    "check_known_keys",
    "config_to_dict",
    "configs_from_dict",
    "known_fields",
    "load_yaml_file",
    "normalise_switch",
    "objective_components",
    "parse_formats",
    "parse_json_dict",
    "parse_objective",
    "run_parser",
    "train_kwargs",
]
