"""``DistillationConfig``: ``TrainingArguments`` plus the distillation fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from ..errors import ConfigError
from .objective import objective_components, parse_objective
from .on_policy import ON_POLICY_FIELDS, OnPolicyArguments
from .parsing import normalise_switch, parse_json_dict

TEACHER_SHARDINGS = ("auto", "replicate", "shard")
CHUNKED_LOSS_CHOICES = ("auto", "true", "false")
# distily.cross_tokenizer's losses (distily.cross_tokenizer.losses documents them).
CROSS_TOKENIZER_LOSS_CHOICES = ("uld", "hybrid")


@dataclass
class DistillationConfig(TrainingArguments, OnPolicyArguments):
    """``TrainingArguments`` plus the distillation fields (and the on-policy ones of ``OnPolicyArguments``).

    The training objective is ``alpha · T² · KD(student ‖ teacher; T) + (1 − alpha) · CE(student, labels)``,
    both terms averaged over the real (non-padding) next-token positions.
    """

    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*TrainingArguments._VALID_DICT_FIELDS, "loss_kwargs", "objective"]

    loss: str | None = field(
        default=None,
        metadata={
            "help": "Distillation loss, a name in distily.LOSSES (forward_kl, reverse_kl, generalized_jsd, ...). "
            "Default: forward_kl, also when the run samples its sequences (--lmbda > 0 or --seq_kd; measured, see "
            "docs/on_policy.md)."
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
    teacher_device: str | None = field(
        default=None,
        metadata={
            "help": "Device of the teacher, e.g. 'cuda:1' or 'cpu'. Default: the student's device (each process's "
            "own under DDP). The teacher's logits are moved to the student's device for the loss."
        },
    )
    teacher_sharding: str = field(
        default="auto",
        metadata={
            "help": "Under FSDP or DeepSpeed ZeRO-3: 'shard' splits the teacher's weights across processes too "
            "(FSDP: fully_shard; ZeRO-3: a ZeRO-3 inference engine), 'replicate' keeps a whole teacher on each "
            "process. 'auto': shard under ZeRO-3 (which loads the teacher partitioned), replicate otherwise.",
            "choices": list(TEACHER_SHARDINGS),
        },
    )
    chunked_loss: str = field(
        default="auto",
        metadata={
            "help": "Compute the LM heads and the logit losses a chunk of tokens at a time from the final hidden "
            "states, never holding full-vocabulary logits for the whole batch (same numbers, far less memory). "
            "auto: on wherever the models allow it; true: always (an error if a model cannot); false: off.",
            "choices": list(CHUNKED_LOSS_CHOICES),
        },
    )
    loss_chunk_size: int = field(
        default=0,
        metadata={
            "help": "Tokens per chunk of the chunked loss path; memory per chunk grows with tokens × vocabulary. "
            "0 (auto): a power of two with about 8M logits per chunk on CPU (128 tokens for a 49k vocabulary), "
            "64M on accelerators (1024 tokens)."
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Train from a recorded teacher (a folder written by `distily record`) instead of running the "
            "teacher: its top-k log-probabilities and tail mass per token. The teacher is not loaded (except once "
            "to initialise a student from its weights). Losses: forward_kl, reverse_kl, generalized_jsd, skew_kl, "
            "skew_reverse_kl, total_variation, on the top-k tokens plus one tail bucket (docs/recorded_teacher.md)."
        },
    )

    objective: dict | str | None = field(
        default=None,
        metadata={
            "help": "Terms of the objective by name: logits, hidden_states, attentions (see docs/objectives.md). "
            'A mapping (YAML) or JSON, e.g. \'{"hidden_states": {"weight": 1.0}}\', or one field per flag: '
            "--objective.hidden_states.weight 1.0 --objective.hidden_states.projector linear. Default: logits only "
            "(weight 1, divergence --loss)."
        },
    )
    projector_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the projectors' parameters (default: --learning_rate)."},
    )
    cross_tokenizer_loss: str | None = field(
        default=None,
        metadata={
            "help": "Distil across tokenizers (text aligned by character offsets): uld (Wasserstein distance of the "
            "sorted distributions) or hybrid (the exact --loss where both segment a span identically, ULD elsewhere). "
            "Default: unset for a shared tokenizer, the measured default (docs/tokenizers.md) with "
            "--student_tokenizer; a pretrained --student with another tokenizer needs it.",
            "choices": ["uld", "hybrid"],
        },
    )
    max_train_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget for training, in seconds: training stops at the end of the step after which "
            "the next step would pass it (a checkpoint is saved if the run saves any), then the run evaluates, "
            "saves and exports as usual. Counts from the start of training in this process; default: no budget."
        },
    )

    def __post_init__(self):
        # Distillation fields first: their errors are the ones a user is most likely to hit.
        from ..losses import LOSSES

        self.validate_on_policy()  # resolves an unset --loss too
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
        if self.teacher_sharding not in TEACHER_SHARDINGS:
            raise ConfigError(
                f"--teacher_sharding {self.teacher_sharding!r} is not one of {', '.join(TEACHER_SHARDINGS)}."
            )
        if self.teacher_device is not None and not str(self.teacher_device).strip():
            self.teacher_device = None
        if self.teacher_device is not None:
            try:
                torch.device(self.teacher_device)
            except (RuntimeError, TypeError):
                raise ConfigError(
                    f"--teacher_device {self.teacher_device!r} is not a device. Use e.g. 'cuda:1', 'cuda' or 'cpu'."
                ) from None
            if self.teacher_sharding == "shard":
                raise ConfigError(
                    "--teacher_device puts a whole teacher on one device; --teacher_sharding shard splits it across "
                    "processes. Drop one of them."
                )
        self.objective = parse_objective(self.objective)
        if self.projector_learning_rate is not None and not self.projector_learning_rate > 0:
            raise ConfigError(
                "--projector_learning_rate must be > 0 (or unset to use --learning_rate), got "
                f"{self.projector_learning_rate}."
            )
        if self.max_train_seconds is not None and not (
            isinstance(self.max_train_seconds, (int, float))
            and not isinstance(self.max_train_seconds, bool)
            and math.isfinite(self.max_train_seconds)
            and self.max_train_seconds > 0
        ):
            raise ConfigError(
                f"--max_train_seconds must be a number of seconds > 0, got {self.max_train_seconds!r}. "
                "Leave it unset for no budget."
            )
        self.chunked_loss = normalise_switch(self.chunked_loss, "chunked_loss", CHUNKED_LOSS_CHOICES)
        if self.teacher_cache is not None and not str(self.teacher_cache).strip():
            self.teacher_cache = None
        if self.teacher_cache is not None:
            from ..sparse import BUCKET_LOSSES, check_bucket_loss

            if self.loss not in BUCKET_LOSSES:
                try:
                    check_bucket_loss(self.loss)
                except ValueError as err:
                    raise ConfigError(f"--loss {self.loss}: {err}") from None
            intermediate = [c.name for c in objective_components(self.objective) if c.signal != "logits"]
            if intermediate:
                raise ConfigError(
                    f"--teacher_cache holds the teacher's logits only; the objective's {', '.join(intermediate)} "
                    "component(s) need a live teacher. Use --teacher instead of --teacher_cache, or drop them."
                )
            # The batches must keep their block_index/block_split columns (they name the recorded rows).
            self.remove_unused_columns = False
        self.check_cross_tokenizer()
        if (
            isinstance(self.loss_chunk_size, bool)
            or not isinstance(self.loss_chunk_size, int)
            or self.loss_chunk_size < 0
        ):
            raise ConfigError(
                f"--loss_chunk_size must be a whole number of tokens (0 for automatic), got {self.loss_chunk_size!r}. "
                "Leave it at 0, or try 128 on CPU and 1024 on a GPU; lower it to save memory."
            )
        # Validate the loss parameters now rather than at the first training step.
        from ..losses import build_loss

        try:
            # Calling the loss once on a dummy token checks parameter values too (e.g. beta in [0, 1]).
            build_loss(self.loss, self.loss_kwargs)(torch.zeros(1, 4), torch.zeros(1, 4))
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        super().__post_init__()

    def check_cross_tokenizer(self) -> None:
        """--cross_tokenizer_loss: a live teacher, logit terms only, full logits; the batches keep their columns."""
        if self.cross_tokenizer_loss is not None and not str(self.cross_tokenizer_loss).strip():
            self.cross_tokenizer_loss = None
        if self.cross_tokenizer_loss is None:
            return
        if self.cross_tokenizer_loss not in CROSS_TOKENIZER_LOSS_CHOICES:
            raise ConfigError(
                f"--cross_tokenizer_loss {self.cross_tokenizer_loss!r} is not one of "
                f"{', '.join(CROSS_TOKENIZER_LOSS_CHOICES)}."
            )
        if self.teacher_cache is not None:
            raise ConfigError(
                "--cross_tokenizer_loss needs a live teacher: a --teacher_cache holds the teacher's top-k over its own "
                "tokenisation of each block, without the character offsets that align it with the student's tokens. "
                "Use --teacher instead of --teacher_cache."
            )
        intermediate = [c.name for c in objective_components(self.objective) if c.signal != "logits"]
        if intermediate:
            raise ConfigError(
                f"--cross_tokenizer_loss compares next-token distributions only; the objective's "
                f"{', '.join(intermediate)} component(s) read positions the two tokenizers do not share. Drop them."
            )
        if self.chunked_loss == "true":
            raise ConfigError(
                "--cross_tokenizer_loss computes its terms from full logits at the aligned positions; drop "
                "--chunked_loss true."
            )
        if self.samples_sequences:
            raise ConfigError(
                "--cross_tokenizer_loss aligns the two tokenisations of fixed text by character offsets; --lmbda > 0 "
                "/ --seq_kd generate new sequences in one vocabulary, which the other tokenizer never saw. Use "
                "--lmbda 0 without --seq_kd with --cross_tokenizer_loss."
            )
        # The batches must keep their teacher_input_ids and aligned_* columns.
        self.remove_unused_columns = False

    @property
    def distillation_fields(self) -> dict[str, Any]:
        """The fields this class adds to ``TrainingArguments``."""
        return {
            name: getattr(self, name)
            for name in (
                "loss",
                "loss_kwargs",
                "temperature",
                "alpha",
                "seq_len",
                "eval_teacher",
                "teacher_device",
                "teacher_sharding",
                "chunked_loss",
                "loss_chunk_size",
                "teacher_cache",
                "objective",
                "projector_learning_rate",
                "max_train_seconds",
                *ON_POLICY_FIELDS,
                "cross_tokenizer_loss",
            )
        }
