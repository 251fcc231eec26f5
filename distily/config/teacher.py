"""The frozen teacher: which model and how to load it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
# The keys of one entry of ``teachers:`` (YAML) besides the teacher itself.
TEACHER_SPEC_KEYS = ("teacher", "weight", "device")


class RepeatedTeacher(argparse.Action):
    """``--teacher A --teacher B``: each flag adds a teacher; the first one given on the command line replaces a
    config file's ``teacher`` (flags override the file, as for every other flag)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, f"_{self.dest}_given", False)
        previous = getattr(namespace, self.dest) if given else None
        names = (previous if isinstance(previous, list) else [previous] if previous else []) + [values]
        setattr(namespace, self.dest, names[0] if len(names) == 1 else names)
        setattr(namespace, f"_{self.dest}_given", True)


def _split_list(value: Any, flag: str) -> list | None:
    """A comma-separated flag value (or a YAML list) as a list; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    raise ConfigError(f"--{flag} must be a comma-separated list, got {type(value).__name__}.")


@dataclass
class TeacherArguments:
    """The frozen teacher."""

    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher model: a Hub id, a local folder, a local .gguf file, or an embedded teacher "
            "('smollm2-135m-instruct'). Hub ids respect HF_HUB_OFFLINE. Give it several times to distil from "
            "several teachers at once (--teacher A --teacher B; docs/teachers.md).",
            "action": RepeatedTeacher,
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
    teacher_load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "Load the teacher's linear layers in 8-bit with bitsandbytes (about half the memory of "
            "bfloat16). CUDA GPUs only; needs pip install 'distily[gpu]'. Not for GGUF teachers."
        },
    )
    teacher_load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "Load the teacher in 4-bit NF4 with bitsandbytes (double quantisation, computing in "
            "--teacher_dtype). CUDA GPUs only; needs pip install 'distily[gpu]'. Not for GGUF teachers."
        },
    )

    teachers: Any = field(
        default=None,
        metadata={
            "help": "Several teachers, in a config file: a list of names or of {teacher: NAME, weight: W, device: D} "
            "(weights default to 1 and are normalised to sum to one). The first one is --teacher. On the command "
            "line, give --teacher once per teacher (with --teacher_weights, --teacher_devices).",
            "type": str,
        },
    )
    teacher_weights: str | None = field(
        default=None,
        metadata={
            "help": "Weights of the teachers, comma-separated in --teacher order (e.g. 0.7,0.3): each > 0, "
            "normalised to sum to one. Default: equal weights."
        },
    )
    teacher_devices: str | None = field(
        default=None,
        metadata={
            "help": "Device of each teacher, comma-separated in --teacher order (e.g. cuda:1,cuda:2); an empty "
            "entry means --teacher_device (or the student's device)."
        },
    )
    teacher_column: str | None = field(
        default=None,
        metadata={
            "help": "Route each example to one teacher: the dataset column that names it (a --teacher value as "
            "given). Without it the target is the weighted mixture of all teachers."
        },
    )
    feature_teacher: str | None = field(
        default=None,
        metadata={
            "help": "With several teachers: the one the hidden_states/attentions terms read (default: the first)."
        },
    )

    def __post_init__(self):
        self._normalise_teachers()
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"--teacher_dtype {self.teacher_dtype!r} is not one of {', '.join(TEACHER_DTYPES)}.")
        if self.teacher_load_in_8bit and self.teacher_load_in_4bit:
            raise ConfigError("--teacher_load_in_8bit and --teacher_load_in_4bit exclude each other: pick one.")

    @property
    def teacher_quantization_bits(self) -> int | None:
        """8 or 4 when the teacher is loaded with bitsandbytes, else None."""
        return 8 if self.teacher_load_in_8bit else 4 if self.teacher_load_in_4bit else None

    def _normalise_teachers(self) -> None:
        """Several teachers in one canonical form: ``teachers`` a list of ``{teacher, weight, device}`` (weights as
        given, checked > 0), ``teacher`` the first of them, ``teacher_weights``/``teacher_devices`` folded in.
        A single teacher stays exactly as before (``teachers`` None)."""
        names = self.teacher if isinstance(self.teacher, (list, tuple)) else None
        specs = self.teachers
        if isinstance(specs, str):
            specs = _split_list(specs, "teachers")
        if names is not None and specs is not None:
            raise ConfigError("Give several teachers either as --teacher A --teacher B or as teachers:, not both.")
        if names is not None:
            specs = list(names)
        weights = _split_list(self.teacher_weights, "teacher_weights")
        devices = _split_list(self.teacher_devices, "teacher_devices")
        if specs is None:  # one live teacher, or recorded ones (--teacher_cache A,B)
            for value in weights or []:
                _weight(value)
            one = self.teacher is not None
            if one and any(values is not None and len(values) != 1 for values in (weights, devices)):
                raise ConfigError("--teacher_weights/--teacher_devices list one entry per --teacher.")
            if one and self.teacher_column is not None:
                raise ConfigError("--teacher_column routes examples between several teachers: give --teacher twice.")
            return
        specs = [self._teacher_spec(spec) for spec in specs]
        for flag, values, key in (("teacher_weights", weights, "weight"), ("teacher_devices", devices, "device")):
            if values is None:
                continue
            if len(values) != len(specs):
                raise ConfigError(f"--{flag} lists {len(values)} entries for {len(specs)} teachers: give one each.")
            for spec, value in zip(specs, values, strict=True):
                spec[key] = value if key == "device" else _weight(value)
            self.__dict__[flag] = None
        for spec in specs:
            spec["weight"] = _weight(spec["weight"])
            if spec["device"] in ("", None):
                spec["device"] = None
        if self.teacher is not None and names is None and self.teacher != specs[0]["teacher"]:
            raise ConfigError(
                f"--teacher {self.teacher!r} is not the first entry of teachers: ({specs[0]['teacher']!r}). "
                "Give the teachers in one place."
            )
        listed = [spec["teacher"] for spec in specs]
        if len(set(listed)) != len(listed):
            raise ConfigError(f"A teacher is listed twice in {listed}: give each teacher once.")
        if self.feature_teacher is not None and self.feature_teacher not in listed:
            raise ConfigError(
                f"--feature_teacher {self.feature_teacher!r} is none of the teachers: {', '.join(listed)}."
            )
        self.teacher, self.teachers = specs[0]["teacher"], specs

    @staticmethod
    def _teacher_spec(spec: Any) -> dict:
        if isinstance(spec, str):
            spec = {"teacher": spec}
        if not isinstance(spec, dict) or not spec.get("teacher"):
            raise ConfigError(f"Each entry of teachers: is a name or a mapping with a teacher: key, got {spec!r}.")
        unknown = set(spec) - set(TEACHER_SPEC_KEYS)
        if unknown:
            raise ConfigError(
                f"teachers: entry {spec['teacher']!r} has unknown keys {sorted(unknown)}; "
                f"use {', '.join(TEACHER_SPEC_KEYS)}."
            )
        return {"teacher": str(spec["teacher"]), "weight": spec.get("weight", 1.0), "device": spec.get("device")}

    @property
    def teacher_names(self) -> list[str]:
        """Every teacher, in order (one for a single teacher; none without)."""
        if self.teachers:
            return [spec["teacher"] for spec in self.teachers]
        return [self.teacher] if self.teacher else []


def _weight(value: Any) -> float:
    """A teacher weight: a number > 0 (and finite)."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"Teacher weight {value!r} is not a number: --teacher_weights takes e.g. 0.7,0.3.") from None
    if not weight > 0 or weight == float("inf"):
        raise ConfigError(
            f"Teacher weight {value!r} must be > 0 (and finite): a teacher with no weight is no teacher; drop it "
            "from --teacher instead. Fix --teacher_weights (or weight: in teachers:)."
        )
    return weight
