"""Typed, self-validating configuration.

A run is described by four dataclasses, each validated in ``__post_init__`` with errors that say what to
change:

* :class:`TeacherArguments` -- which teacher and how to load it;
* :class:`StudentArguments` -- how to build the student from the teacher;
* :class:`DataArguments` -- the corpus and how to split it;
* :class:`DistillationConfig` -- a :class:`transformers.TrainingArguments` with the distillation fields.

Every field is a command-line flag of ``distily`` (same name) and a key of a ``--config run.yaml`` file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

STUDENT_INITS = ("auto", "teacher", "random")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def parse_json_dict(value: Any, flag: str, example: str) -> dict | None:
    """Accept a dict, a JSON object string or None; anything else is a :class:`ConfigError`."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"--{flag} is not valid JSON ({err.msg} at character {err.pos}): {value!r}. "
                f"Pass a JSON object, for example --{flag} '{example}'."
            ) from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"--{flag} must be a JSON object like '{example}', got {type(parsed).__name__}.")
        return parsed
    raise ConfigError(f"--{flag} must be a dict or a JSON object string, got {type(value).__name__}.")


@dataclass
class TeacherArguments:
    """The frozen teacher."""

    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher model: a Hub id, a local folder, a local .gguf file, or an embedded teacher "
            "('smollm2-135m-instruct'). Hub ids respect HF_HUB_OFFLINE."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "Teacher weights dtype: auto (bfloat16 where the device supports it, else float32), "
            "float32, bfloat16 or float16.",
            "choices": list(TEACHER_DTYPES),
        },
    )
    teacher_revision: str | None = field(default=None, metadata={"help": "Hub revision of the teacher."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the Hub (off unless you ask)."}
    )

    def __post_init__(self):
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"--teacher_dtype {self.teacher_dtype!r} is not one of {', '.join(TEACHER_DTYPES)}.")


@dataclass
class StudentArguments:
    """How the student is built from the teacher."""

    student_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "JSON object of overrides applied to the teacher's config to make the student, "
            'e.g. \'{"num_hidden_layers": 4}\'. Add "bitnet": true (or {"warmup_steps": N}) for a BitNet '
            "b1.58 student with ternary weights (see docs/bitnet.md)."
        },
    )
    student_init: str = field(
        default="auto",
        metadata={
            "help": "auto: copy the teacher's weights (uniform layer subset keeping first and last) when the "
            "width matches, else random; teacher: always copy what fits; random: random init.",
            "choices": list(STUDENT_INITS),
        },
    )

    def __post_init__(self):
        self.student_config = parse_json_dict(self.student_config, "student_config", '{"num_hidden_layers": 4}')
        if self.student_config and "bitnet" in self.student_config:
            from .bitnet import parse_bitnet_option

            parse_bitnet_option(self.student_config["bitnet"])  # bad BitNet options fail here, before any work
        if self.student_init not in STUDENT_INITS:
            raise ConfigError(f"--student_init {self.student_init!r} is not one of {', '.join(STUDENT_INITS)}.")


@dataclass
class DataArguments:
    """The training corpus. ``python-stdlib`` is built in and always available offline."""

    dataset: str = field(
        default="python-stdlib",
        metadata={
            "help": "'python-stdlib' (built in), a Hub dataset name, a folder saved with save_to_disk, data "
            "files (.json/.jsonl/.parquet/.csv/.txt, comma-separated or a glob; one .txt file is split into "
            "paragraphs), or a folder of text/code files."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    dataset_eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split used for evaluation. Default: 'validation', 'eval' or 'test' if the dataset has "
            "one, else a deterministic hold-out of --eval_fraction of the documents (by content hash)."
        },
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Share of documents held out for evaluation when there is no eval split."}
    )
    max_train_blocks: int | None = field(
        default=None, metadata={"help": "Use at most this many packed training blocks (after a seeded shuffle)."}
    )
    max_eval_blocks: int | None = field(
        default=64,
        metadata={"help": "Evaluate on at most this many packed blocks (a fixed sample, the same in every run)."},
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "Where datasets caches tokenised blocks (default: HF_DATASETS_CACHE)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to tokenise (default: one)."}
    )

    def __post_init__(self):
        if not self.dataset or not str(self.dataset).strip():
            raise ConfigError("--dataset is empty. Name a dataset, e.g. --dataset python-stdlib.")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"--eval_fraction must be in (0, 1), got {self.eval_fraction}.")
        for name in ("max_train_blocks", "max_eval_blocks", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1 (or unset), got {value}.")


@dataclass
class DistillationConfig(TrainingArguments):
    """``TrainingArguments`` plus the distillation fields.

    The training objective is ``alpha · T² · KD(student ‖ teacher; T) + (1 − alpha) · CE(student, labels)``,
    both terms averaged over the real (non-padding) next-token positions.
    """

    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*TrainingArguments._VALID_DICT_FIELDS, "loss_kwargs"]

    loss: str = field(
        default="forward_kl",
        metadata={
            "help": "Distillation loss, a name in distily.LOSSES (forward_kl, reverse_kl, generalized_jsd, ...)."
        },
    )
    loss_kwargs: dict | str | None = field(
        default=None, metadata={"help": "JSON object of loss parameters, e.g. '{\"beta\": 0.5}'."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature T > 0 for both models; the KD term is scaled by T²."}
    )
    alpha: float = field(
        default=1.0,
        metadata={"help": "Weight of the KD term in [0, 1]; 1 - alpha weights plain cross-entropy on the labels."},
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per packed training block."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output folder that holds a finished run."}
    )
    eval_teacher: bool = field(
        default=True,
        metadata={"help": "Report the teacher's perplexity on the eval split (computed once, reused)."},
    )

    def __post_init__(self):
        # Distillation fields first: their errors are the ones a user is most likely to hit.
        from .losses import LOSSES

        if self.loss not in LOSSES:
            raise ConfigError(LOSSES.unknown_message(self.loss) + " Fix --loss.")
        self.loss_kwargs = parse_json_dict(self.loss_kwargs, "loss_kwargs", '{"beta": 0.5}') or {}
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or (
            self.temperature <= 0
        ):
            raise ConfigError(f"--temperature must be a finite number > 0, got {self.temperature}. Try 1.0 or 2.0.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"--alpha must be in [0, 1] (the weight of the KD term), got {self.alpha}. "
                "Use 1.0 for pure distillation, 0.5 to mix equally with cross-entropy."
            )
        if self.seq_len < 2:
            raise ConfigError(f"--seq_len must be at least 2 tokens, got {self.seq_len}.")
        # Validate the loss parameters now rather than at the first training step.
        from .losses import build_loss

        try:
            # Calling the loss once on a dummy token checks parameter values too (e.g. beta in [0, 1]).
            build_loss(self.loss, self.loss_kwargs)(torch.zeros(1, 4), torch.zeros(1, 4))
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        super().__post_init__()

    @property
    def distillation_fields(self) -> dict[str, Any]:
        """The fields this class adds to ``TrainingArguments``."""
        return {
            name: getattr(self, name)
            for name in ("loss", "loss_kwargs", "temperature", "alpha", "seq_len", "eval_teacher")
        }


# ----------------------------------------------------------------------------------------------------------------
# One flat namespace for flags and YAML files

RUN_ARGUMENT_CLASSES = (TeacherArguments, StudentArguments, DataArguments, DistillationConfig)
# Never written to a saved config: secrets stay out of files that get shared.
SECRET_FIELDS = ("hub_token",)


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
    """Build every dataclass of ``classes`` from one flat dict (e.g. a saved ``distily_config.yaml``)."""
    check_known_keys(values, source, classes)
    return tuple(
        cls(**{item.name: values[item.name] for item in fields(cls) if item.init and item.name in values})
        for cls in classes
    )
