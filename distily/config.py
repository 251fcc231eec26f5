"""Typed, self-validating configuration.

A run is described by five dataclasses, each validated in ``__post_init__`` with errors that say what to
change:

* :class:`TeacherArguments` -- which teacher and how to load it;
* :class:`StudentArguments` -- how to build the student from the teacher (or which pretrained student to use);
* :class:`PeftArguments` -- LoRA/DoRA adapters instead of training every student weight;
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

from .errors import ConfigError  # re-exported: `from distily.config import ConfigError` keeps working

STUDENT_INITS = ("auto", "teacher", "random")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
TEACHER_SHARDINGS = ("auto", "replicate", "shard")
CHUNKED_LOSS_CHOICES = ("auto", "true", "false")


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


def _normalise_switch(value: Any, flag: str, choices: tuple[str, ...]) -> str:
    """``auto``/``true``/``false`` from a string or a bool (YAML turns ``false`` into a bool)."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    text = str(value).strip().lower()
    text = {"on": "true", "yes": "true", "1": "true", "off": "false", "no": "false", "0": "false"}.get(text, text)
    if text not in choices:
        raise ConfigError(f"--{flag} must be one of {', '.join(choices)}, got {value!r}.")
    return text


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

    student: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained student to distil into instead of building one from the teacher: a Hub id or a "
            "local model folder whose vocabulary is the teacher's. Excludes --student_config and --student_init."
        },
    )

    def __post_init__(self):
        self.student_config = parse_json_dict(self.student_config, "student_config", '{"num_hidden_layers": 4}')
        if self.student_config and "bitnet" in self.student_config:
            from .bitnet.options import parse_bitnet_option

            parse_bitnet_option(self.student_config["bitnet"])  # bad BitNet options fail here, before any work
        if self.student_init not in STUDENT_INITS:
            raise ConfigError(f"--student_init {self.student_init!r} is not one of {', '.join(STUDENT_INITS)}.")
        if self.student is not None and not str(self.student).strip():
            self.student = None
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


@dataclass
class DataArguments:
    """The training corpus. ``python-stdlib`` is built in and always available offline."""

    dataset: str = field(
        default="python-stdlib",
        metadata={
            "help": "'python-stdlib' (built in), a Hub dataset name, a folder saved with save_to_disk, data "
            "files (.json/.jsonl/.parquet/.csv/.txt, comma-separated or a glob; one .txt file is split into "
            "paragraphs), a folder of text/code files, or a `distily synth` output folder."
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
    prompt_loss: bool = field(
        default=False,
        metadata={
            "help": "For prompt/completion data (a `distily synth` folder): also train on the prompt tokens. "
            "Default: the loss covers only the teacher's completions."
        },
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


# ----------------------------------------------------------------------------------------------------------------
# The objective: logits plus intermediate signals

SIGNALS = ("logits", "hidden_states", "attentions")
# Per-signal defaults of a component's fields (logits take their divergence from --loss/--temperature/--alpha).
COMPONENT_DEFAULTS = {
    # layer_norm: a raw MSE between residual streams is in the thousands on SmolLM2 (massive activations) and
    # drowns the logit term; the normalised MSE is about 1 (notes.md).
    "hidden_states": {"loss": "mse", "layer_mapper": "uniform_last", "projector": "linear", "norm": "layer_norm"},
    "attentions": {"loss": "kl", "layer_mapper": "uniform_last", "projector": "identity", "norm": "none"},
}
COMPONENT_KEYS = (
    "signal",
    "weight",
    "loss",
    "layer_mapper",
    "layer_mapper_kwargs",
    "projector",
    "projector_kwargs",
    "norm",
)
DEFAULT_OBJECTIVE = {"logits": {"signal": "logits", "weight": 1.0}}


@dataclass
class ObjectiveComponent:
    """One term of the objective: ``weight · loss(projector(student features), teacher features)``.

    ``signal`` is ``logits`` (its divergence is ``--loss`` at ``--temperature``, mixed with CE by ``--alpha``),
    ``hidden_states`` (decoder layer outputs) or ``attentions`` (attention probabilities; needs eager
    attention). ``layer_mapper`` pairs student and teacher layers (:mod:`distily.layer_mappers`), ``projector``
    maps the student's width to the teacher's (:mod:`distily.projectors`), ``norm`` and ``loss`` come from
    :mod:`distily.feature_losses`.
    """

    name: str
    signal: str
    weight: float = 1.0
    loss: str | None = None
    layer_mapper: str | None = None
    layer_mapper_kwargs: dict = field(default_factory=dict)
    projector: str | None = None
    projector_kwargs: dict = field(default_factory=dict)
    norm: str | None = None

    def __post_init__(self):
        where = f"objective.{self.name}"
        if self.signal not in SIGNALS:
            raise ConfigError(f"{where}.signal {self.signal!r} is not one of {', '.join(SIGNALS)}.")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ConfigError(f"{where}.weight must be a number, got {self.weight!r}.")
        self.weight = float(self.weight)
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ConfigError(f"{where}.weight must be a finite number >= 0, got {self.weight}.")
        if self.signal == "logits":
            extra = [key for key in COMPONENT_KEYS[2:] if getattr(self, key) not in (None, {})]
            if extra:
                raise ConfigError(
                    f"{where} sets {', '.join(extra)}, but the logits term is configured by the top-level --loss, "
                    "--loss_kwargs, --temperature and --alpha; give it only a weight."
                )
            return
        for key, value in COMPONENT_DEFAULTS[self.signal].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key in ("layer_mapper_kwargs", "projector_kwargs"):
            value = getattr(self, key)
            value = parse_json_dict(value, f"{where}.{key}", "{}") if value is not None else {}
            setattr(self, key, value or {})
        from .feature_losses import FEATURE_LOSSES, FEATURE_NORMS
        from .layer_mappers import LAYER_MAPPERS, check_mapper_kwargs
        from .projectors import PROJECTORS, check_projector_kwargs

        for key, registry in (
            ("loss", FEATURE_LOSSES),
            ("layer_mapper", LAYER_MAPPERS),
            ("projector", PROJECTORS),
            ("norm", FEATURE_NORMS),
        ):
            if getattr(self, key) not in registry:
                raise ConfigError(registry.unknown_message(getattr(self, key)) + f" Fix {where}.{key}.")
        if self.signal == "attentions" and (self.projector != "identity" or self.norm != "none"):
            raise ConfigError(
                f"{where}: attention maps are probabilities compared head by head; they take no projector or norm. "
                "Drop projector and norm (or set projector: identity, norm: none)."
            )
        try:
            check_mapper_kwargs(self.layer_mapper, self.layer_mapper_kwargs)
            check_projector_kwargs(self.projector, self.projector_kwargs)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (no name: it is the key), without fields the signal does not use."""
        if self.signal == "logits":
            return {"signal": "logits", "weight": self.weight}
        return {key: getattr(self, key) for key in COMPONENT_KEYS}


def parse_objective(value: Any) -> dict[str, dict[str, Any]]:
    """The ``objective`` setting as a canonical ``{name: component dict}``, validated.

    Accepts ``None`` (logits only), a mapping ``{name: {field: value}}`` (the name is the signal unless
    ``signal`` is given), a list of component dicts (each with ``signal`` and optionally ``name``), or either
    as a JSON string. A logits term of weight 1 is implied unless one is given: write ``logits: {weight: 0}``
    for an objective without logits. Every weight is >= 0 and they do not all vanish.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            value = None
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"--objective is not valid JSON ({err.msg}): {value!r}. Example: --objective "
                    '\'{"hidden_states": {"weight": 1.0}}\' or --objective.hidden_states.weight 1.0.'
                ) from None
    if value is None:
        value = {}
    if isinstance(value, list):
        mapping: dict[str, Any] = {}
        for index, item in enumerate(value):
            if not isinstance(item, dict) or "signal" not in item:
                raise ConfigError(f"objective[{index}] must be a mapping with a signal ({', '.join(SIGNALS)}).")
            item = dict(item)
            name = str(item.pop("name", item["signal"]))
            if name in mapping:
                raise ConfigError(f"objective has two components named {name!r}: give one a distinct name:.")
            mapping[name] = item
        value = mapping
    if not isinstance(value, dict):
        raise ConfigError(f"objective must be a mapping of components or a list, got {type(value).__name__}.")
    components: dict[str, ObjectiveComponent] = {}
    for name, spec in value.items():
        if spec is None:
            spec = {}
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            spec = {"weight": spec}  # shorthand: `hidden_states: 0.5`
        if not isinstance(spec, dict):
            raise ConfigError(f"objective.{name} must be a mapping of fields (weight, loss, ...), got {spec!r}.")
        unknown = sorted(set(spec) - set(COMPONENT_KEYS))
        if unknown:
            raise ConfigError(f"objective.{name} has unknown fields {unknown}; valid: {', '.join(COMPONENT_KEYS)}.")
        signal = spec.get("signal", name)
        if signal not in SIGNALS:
            raise ConfigError(
                f"objective.{name}: {signal!r} is not a signal ({', '.join(SIGNALS)}). Name the component after its "
                f"signal, or set its signal: field."
            )
        components[str(name)] = ObjectiveComponent(name=str(name), **{**spec, "signal": signal})
    if not any(c.signal == "logits" for c in components.values()):
        components = {"logits": ObjectiveComponent(name="logits", signal="logits"), **components}
    if sum(c.weight for c in components.values()) <= 0:
        raise ConfigError(
            "objective weights sum to zero: nothing would be trained. Give at least one component a weight > 0, "
            "e.g. --objective.logits.weight 1.0."
        )
    return {name: component.to_dict() for name, component in components.items()}


def objective_components(objective: dict[str, dict[str, Any]]) -> list[ObjectiveComponent]:
    """The canonical objective dict (see :func:`parse_objective`) as component objects."""
    return [ObjectiveComponent(name=name, **spec) for name, spec in objective.items()]


@dataclass
class DistillationConfig(TrainingArguments):
    """``TrainingArguments`` plus the distillation fields.

    The training objective is ``alpha · T² · KD(student ‖ teacher; T) + (1 − alpha) · CE(student, labels)``,
    both terms averaged over the real (non-padding) next-token positions.
    """

    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*TrainingArguments._VALID_DICT_FIELDS, "loss_kwargs", "objective"]

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
        self.chunked_loss = _normalise_switch(self.chunked_loss, "chunked_loss", CHUNKED_LOSS_CHOICES)
        if self.teacher_cache is not None and not str(self.teacher_cache).strip():
            self.teacher_cache = None
        if self.teacher_cache is not None:
            from .sparse import BUCKET_LOSSES, check_bucket_loss

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
            )
        }


EXPORT_FORMATS = ("safetensors", "gguf")
# Per-format outtypes; the GGUF list is extended by registering entries in distily.export.gguf.GGUF_OUTTYPES.
SAFETENSORS_OUTTYPES = ("f32", "f16", "bf16")


def parse_formats(value: str | list[str] | None, flag: str) -> list[str]:
    """``"safetensors,gguf"`` (or a list) as a checked list of export formats."""
    if value is None or value == "" or value == []:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    formats = [item.strip() for item in items if item.strip()]
    unknown = [item for item in formats if item not in EXPORT_FORMATS]
    if unknown:
        raise ConfigError(f"--{flag} {unknown} is not a known format; choose from {', '.join(EXPORT_FORMATS)}.")
    return list(dict.fromkeys(formats))


def check_outtype(outtype: str | None, formats: list[str], flag: str) -> None:
    """An outtype every requested format can store (q8_0 is GGUF-only)."""
    if outtype is None:
        return
    from .export.gguf import GGUF_OUTTYPES

    for fmt in formats:
        valid = SAFETENSORS_OUTTYPES if fmt == "safetensors" else tuple(GGUF_OUTTYPES)
        if outtype not in valid:
            raise ConfigError(
                f"--{flag} {outtype!r} is not available for {fmt} (choose {', '.join(valid)}). Block-quantised types "
                "such as q8_0 exist only in GGUF: export the formats separately."
            )


@dataclass
class ExportArguments:
    """Export at the end of training (``distily train --export safetensors,gguf``)."""

    export: str | None = field(
        default=None,
        metadata={"help": "Formats to export after training, comma-separated: safetensors, gguf. Default: none."},
    )
    export_outtype: str | None = field(
        default=None,
        metadata={
            "help": "Weight type of the export: f32, f16, bf16 or (GGUF only) q8_0, tq2_0, tq1_0 (BitNet). "
            "Default: f32 for safetensors, f16 for GGUF."
        },
    )
    export_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the export (weights, tokenizer, model card). Default: OUTPUT_DIR/export."},
    )
    export_push_to_hub: bool = field(
        default=False,
        metadata={
            "help": "Upload the export folder to the Hub as --hub_model_id (private unless --hub_private_repo "
            "false). Off by default: nothing leaves the machine unless asked. Trainer's own --push_to_hub "
            "(checkpoints) is a separate switch."
        },
    )
    export_license: str = field(
        default="openrail", metadata={"help": "License in the model card's metadata (a Hub license id)."}
    )

    def __post_init__(self):
        formats = parse_formats(self.export, "export")
        check_outtype(self.export_outtype, formats, "export_outtype")
        if self.export_push_to_hub and not formats:
            raise ConfigError("--export_push_to_hub needs something to push: add --export safetensors (and/or gguf).")

    @property
    def formats(self) -> list[str]:
        return parse_formats(self.export, "export")


@dataclass
class ExportConfig:
    """``distily export RUN_DIR``: formats, weight type, destination and the opt-in Hub upload."""

    format: str = field(
        default="safetensors", metadata={"help": "Comma-separated formats: safetensors, gguf (e.g. safetensors,gguf)."}
    )
    outtype: str | None = field(
        default=None,
        metadata={
            "help": "Weight type: f32, f16, bf16 or (GGUF only) q8_0, tq2_0, tq1_0 (BitNet students). Default: f32 for "
            "safetensors, f16 for GGUF."
        },
    )
    output: str | None = field(
        default=None,
        metadata={"help": "Export folder (default RUN_DIR/export), or a .gguf file path for a lone GGUF file."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing export at --output."})
    name: str | None = field(
        default=None, metadata={"help": "Model name (card title, GGUF name). Default: folder name."}
    )
    license: str = field(default="openrail", metadata={"help": "License in the model card's metadata."})
    gguf_tokenizer_pre: str | None = field(
        default=None,
        metadata={"help": "llama.cpp pre-tokenizer name to write (gpt-2, llama-bpe, smollm, ...). Default: detected."},
    )
    model_card: bool = field(default=True, metadata={"help": "Write README.md (model card) and loss_curve.png."})
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Upload the export folder to the Hub (opt-in; nothing leaves the machine otherwise)."},
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub: user/name."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub repository as private (default)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})

    def __post_init__(self):
        formats = parse_formats(self.format, "format")
        if not formats:
            raise ConfigError("--format is empty; choose safetensors, gguf or safetensors,gguf.")
        check_outtype(self.outtype, formats, "outtype")
        if self.output and str(self.output).endswith(".gguf") and formats != ["gguf"]:
            raise ConfigError(f"--output {self.output!r} is a .gguf file: use --format gguf, or give a folder.")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id user/name.")
        if self.push_to_hub and self.output and str(self.output).endswith(".gguf"):
            raise ConfigError("--push_to_hub uploads an export folder: give --output a folder, not a .gguf file.")

    @property
    def formats(self) -> list[str]:
        return parse_formats(self.format, "format")


LM_EVAL_BACKENDS = ("auto", "hf", "vllm")


@dataclass
class EvalConfig:
    """``distily eval MODEL``: perplexity on a local corpus and (with ``distily[eval]``) harness tasks.

    Unset data fields default to the values of the run in MODEL (its ``distily_config.yaml``), so a run is
    evaluated on exactly the split it was trained against.
    """

    tasks: str = field(
        default="perplexity",
        metadata={
            "help": "Comma-separated: 'perplexity' (on --dataset's eval split) and lm-evaluation-harness "
            "task names (need pip install 'distily[eval]'), e.g. perplexity,hellaswag,arc_easy."
        },
    )
    dataset: str | None = field(default=None, metadata={"help": "Corpus for perplexity (default: the run's)."})
    dataset_text_field: str | None = field(default=None, metadata={"help": "Text column (default: the run's)."})
    seq_len: int | None = field(default=None, metadata={"help": "Tokens per block (default: the run's, else 512)."})
    max_eval_blocks: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many blocks (default: the run's, else 64)."}
    )
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})
    include_teacher: bool = field(
        default=True, metadata={"help": "Also evaluate the run's teacher, for the model card's comparison."}
    )
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."})
    lm_eval_backend: str = field(
        default="auto",
        metadata={
            "help": "lm-eval model backend: auto (vllm on a CUDA machine with vllm installed, else hf), hf, vllm.",
            "choices": list(LM_EVAL_BACKENDS),
        },
    )
    lm_eval_limit: int | None = field(default=None, metadata={"help": "At most this many examples per task."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples for harness tasks."})
    output: str | None = field(default=None, metadata={"help": "Results file (default: MODEL/distily_eval.json)."})

    def __post_init__(self):
        if not self.task_list:
            raise ConfigError("--tasks is empty; pass perplexity and/or lm-eval task names.")
        if self.lm_eval_backend not in LM_EVAL_BACKENDS:
            raise ConfigError(
                f"--lm_eval_backend {self.lm_eval_backend!r} is not one of {', '.join(LM_EVAL_BACKENDS)}."
            )
        for name in ("seq_len", "max_eval_blocks", "batch_size", "lm_eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}.")

    @property
    def task_list(self) -> list[str]:
        return [task.strip() for task in str(self.tasks).split(",") if task.strip()]


# ----------------------------------------------------------------------------------------------------------------
# One flat namespace for flags and YAML files

RUN_ARGUMENT_CLASSES = (
    TeacherArguments,
    StudentArguments,
    PeftArguments,
    DataArguments,
    DistillationConfig,
    ExportArguments,
)
# The keyword under which distily.run.train() takes each of them.
TRAIN_ARGUMENT_NAMES = {
    TeacherArguments: "teacher_args",
    StudentArguments: "student_args",
    PeftArguments: "peft_args",
    DataArguments: "data_args",
    DistillationConfig: "config",
    ExportArguments: "export_args",
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
    """Build every dataclass of ``classes`` from one flat dict (e.g. a saved ``distily_config.yaml``)."""
    check_known_keys(values, source, classes)
    return tuple(
        cls(**{item.name: values[item.name] for item in fields(cls) if item.init and item.name in values})
        for cls in classes
    )
