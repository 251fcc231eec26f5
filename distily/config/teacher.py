"""The frozen teacher: which model and how to load it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


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

    def __post_init__(self):
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"--teacher_dtype {self.teacher_dtype!r} is not one of {', '.join(TEACHER_DTYPES)}.")
        if self.teacher_load_in_8bit and self.teacher_load_in_4bit:
            raise ConfigError("--teacher_load_in_8bit and --teacher_load_in_4bit exclude each other: pick one.")

    @property
    def teacher_quantization_bits(self) -> int | None:
        """8 or 4 when the teacher is loaded with bitsandbytes, else None."""
        return 8 if self.teacher_load_in_8bit else 4 if self.teacher_load_in_4bit else None
