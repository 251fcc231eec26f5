"""The student: how it is built from the teacher (or which pretrained model), and LoRA/DoRA adapters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from .parsing import parse_json_dict
from .prune import DEFAULT_CALIBRATION_BLOCKS, PRUNE_TARGET_KEYS, check_prune_student_config  # noqa: F401

STUDENT_INITS = ("auto", "teacher", "random", "prune")


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
            "width matches, else random; teacher: always copy what fits; random: random init; prune: prune the "
            "teacher to the --student_config shape by importance on --calibration_blocks (docs/pruning.md).",
            "choices": list(STUDENT_INITS),
        },
    )

    calibration_blocks: int = field(
        default=DEFAULT_CALIBRATION_BLOCKS,
        metadata={"help": "--student_init prune: train-split blocks the importance scores are measured on."},
    )

    student: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained student to distil into instead of building one from the teacher: a Hub id or a "
            "local model folder whose vocabulary is the teacher's. Excludes --student_config and --student_init."
        },
    )
    student_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer folder (e.g. from `distily tokenizer train`) for a student built from the teacher "
            "with that vocabulary; tokens whose strings the teacher's vocabulary holds start from its embedding "
            "rows. Distilled across tokenizers (--cross_tokenizer_loss, see docs/tokenizers.md)."
        },
    )

    def __post_init__(self):
        self.student_config = parse_json_dict(self.student_config, "student_config", '{"num_hidden_layers": 4}')
        if self.student_config and "bitnet" in self.student_config:
            from ..bitnet.options import parse_bitnet_option

            parse_bitnet_option(self.student_config["bitnet"])  # bad BitNet options fail here, before any work
        if self.student_init not in STUDENT_INITS:
            raise ConfigError(f"--student_init {self.student_init!r} is not one of {', '.join(STUDENT_INITS)}.")
        if self.student_init == "prune":
            check_prune_student_config(self.student_config, self.calibration_blocks)
        if self.student is not None and not str(self.student).strip():
            self.student = None
        if self.student_tokenizer is not None and not str(self.student_tokenizer).strip():
            self.student_tokenizer = None
        if self.student_tokenizer is not None and self.student is not None:
            raise ConfigError(
                "--student_tokenizer builds a student from the teacher with a new vocabulary; --student "
                f"{self.student!r} is a pretrained student with its own tokenizer already. Drop one of them (a "
                "pretrained student whose tokenizer differs from the teacher's needs --cross_tokenizer_loss)."
            )
        if self.student_tokenizer is not None and self.student_init == "prune":
            raise ConfigError(
                "--student_init prune keeps a subset of the teacher's own embedding rows; --student_tokenizer "
                "replaces the vocabulary. Use one of them (prune with the teacher's tokenizer, or a new tokenizer "
                "with --student_init auto)."
            )
        if self.student is not None and (self.student_config or self.student_init != "auto"):
            raise ConfigError(
                f"--student {self.student!r} loads a pretrained student as it is; --student_config and "
                "--student_init only apply to a student built from the teacher. Drop one or the other."
            )


@dataclass
class PeftArguments:
    """Parameter-efficient students: train LoRA (or DoRA) adapters on a frozen student instead of every weight.

    The run folder still holds a plain model (adapters merged) that ``AutoModelForCausalLM`` loads; the adapters
    alone are kept in its ``adapter/`` folder.
    """

    lora_r: int | None = field(
        default=None,
        metadata={"help": "Rank of the LoRA adapters on the student. Unset: train every student weight."},
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA scale numerator: updates are scaled by alpha / r. Default: 2 × lora_r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path, in [0, 1)."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Comma-separated names of the modules that get adapters (e.g. 'q_proj,v_proj'), or 'all-linear' "
            "(every linear layer except the output head)."
        },
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "Weight-decomposed LoRA (DoRA): adapters learn a magnitude and a direction. Needs --lora_r."},
    )

    def __post_init__(self):
        if isinstance(self.lora_target_modules, (list, tuple)):
            self.lora_target_modules = ",".join(str(name).strip() for name in self.lora_target_modules)
        if self.lora_r is None:
            asked = [
                flag
                for flag, changed in (
                    ("--lora_alpha", self.lora_alpha is not None),
                    ("--lora_dropout", self.lora_dropout != 0.0),
                    ("--lora_target_modules", self.lora_target_modules != "all-linear"),
                    ("--use_dora", self.use_dora),
                )
                if changed
            ]
            if asked:
                raise ConfigError(
                    f"{', '.join(asked)} only apply to a LoRA student. Set its rank too, e.g. --lora_r 16."
                )
            return
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ConfigError(f"--lora_r must be a whole number ≥ 1 (typical: 8 to 64), got {self.lora_r!r}.")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"--lora_alpha must be a number > 0 (default 2 × lora_r), got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not self.target_modules:
            raise ConfigError("--lora_target_modules is empty. Name modules ('q_proj,v_proj') or pass 'all-linear'.")

    @property
    def enabled(self) -> bool:
        """True when the student trains LoRA/DoRA adapters rather than all of its weights."""
        return self.lora_r is not None

    @property
    def target_modules(self) -> str | list[str]:
        """``'all-linear'`` or the list of module names, as ``peft.LoraConfig`` takes them."""
        names = [name.strip() for name in str(self.lora_target_modules).split(",") if name.strip()]
        return "all-linear" if names == ["all-linear"] else names

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * float(self.lora_r or 0)
