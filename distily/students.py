"""Build a student from the teacher's config plus overrides, initialised from a subset of teacher layers."""

from __future__ import annotations

import contextlib
import copy
import logging
import re

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .config import STUDENT_INITS
from .errors import ConfigError
from .layer_mappers import source_record
from .modeling import count_parameters, decoder_layers_path, layer_count  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

# Config attributes that fix the shape of every per-layer tensor; "width" in the docs means all of these.
WIDTH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_embd",
    "n_inner",
    "n_head",
)
# Config attributes naming the layer count, per architecture family.
# Attributes that describe how the teacher was stored, not what the student is.
LOADING_ONLY_FIELDS = ("quantization_config", "_name_or_path", "_commit_hash", "transformers_version")


def uniform_layer_subset(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Teacher layer indices for each student layer: evenly spaced, keeping the first and the last.

    ``⌊i · (N − 1) / (n − 1) + ½⌋`` (halves round up) for ``i = 0..n-1``, DistilBERT-style. With 30 teacher
    and 4 student layers: ``[0, 10, 19, 29]``. One student layer maps to the last teacher layer.
    """
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ConfigError(
            f"A student initialised from the teacher needs between 1 and {num_teacher_layers} layers, got "
            f"{num_student_layers}. Lower num_hidden_layers or use --student_init random."
        )
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [int(i * step + 0.5) for i in range(num_student_layers)]


def student_config_from_teacher(teacher_config: PretrainedConfig, overrides: dict | None) -> PretrainedConfig:
    """The teacher's config with ``overrides`` applied; unknown fields and vocabulary changes are errors."""
    overrides = dict(overrides or {})
    config = copy.deepcopy(teacher_config)
    for name in LOADING_ONLY_FIELDS:
        if hasattr(config, name):
            with contextlib.suppress(AttributeError):
                delattr(config, name)
    known = set(config.to_dict())
    unknown = sorted(key for key in overrides if key not in known and not hasattr(config, key))
    if unknown:
        fields = ", ".join(sorted(k for k in known if not k.startswith("_")))
        raise ConfigError(
            f"--student_config names fields the {type(config).__name__} does not have: {unknown}. "
            f"Valid fields: {fields}."
        )
    vocab = getattr(teacher_config, "vocab_size", None)
    if "vocab_size" in overrides and overrides["vocab_size"] != vocab:
        raise ConfigError(
            f"--student_config sets vocab_size={overrides['vocab_size']} but the teacher's vocabulary has "
            f"{vocab} tokens. Distillation needs a shared tokenizer: drop vocab_size from --student_config."
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    if "hidden_size" in overrides and "head_dim" in known and "head_dim" not in overrides:
        heads = getattr(config, "num_attention_heads", None)
        if heads and config.hidden_size % heads == 0:
            config.head_dim = config.hidden_size // heads
    return config


def _same_width(student_config: PretrainedConfig, teacher_config: PretrainedConfig) -> bool:
    return all(getattr(student_config, name, None) == getattr(teacher_config, name, None) for name in WIDTH_FIELDS)


def init_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel, layer_map: list[int]) -> list[str]:
    """Copy every teacher tensor whose shape fits into ``student``; block ``i`` comes from teacher block
    ``layer_map[i]``. Returns the names of student tensors left at their random init."""
    student_layers, teacher_layers = decoder_layers_path(student), decoder_layers_path(teacher)
    pattern = re.compile(rf"^{re.escape(student_layers)}\.(\d+)\.(.*)$")
    teacher_state = teacher.state_dict()
    missing = []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            match = pattern.match(name)
            source = f"{teacher_layers}.{layer_map[int(match.group(1))]}.{match.group(2)}" if match else name
            source_tensor = teacher_state.get(source)
            if source_tensor is None or source_tensor.shape != tensor.shape:
                missing.append(name)
                continue
            tensor.copy_(source_tensor.to(tensor.dtype))
    return missing


def build_student(
    teacher: PreTrainedModel,
    overrides: dict | None = None,
    init: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A causal LM built from ``teacher.config`` with ``overrides`` applied.

    ``init``: ``"auto"`` copies the teacher's weights when the width matches (embeddings, final norm, head
    and a uniform subset of blocks keeping the first and the last) and uses random init otherwise;
    ``"teacher"`` copies whatever tensors fit even when widths differ; ``"random"`` never copies.
    The student is float32 by default (mixed precision is TrainingArguments' job) and in train mode.

    ``overrides`` may also hold distily's ``"bitnet"`` key (``true`` or an object of
    :class:`distily.bitnet.BitNetOptions`): the student built as above is then converted into a BitNet b1.58
    student (:func:`distily.bitnet.convert_to_bitnet`).
    """
    from .bitnet import check_convertible, convert_to_bitnet, split_bitnet_overrides

    if init not in STUDENT_INITS:
        raise ConfigError(f"init={init!r} is not one of {', '.join(STUDENT_INITS)}.")
    if init == "prune":
        raise ConfigError(
            "init='prune' needs calibration data: call distily.prune(teacher, target, calibration_ids) instead."
        )
    overrides, bitnet = split_bitnet_overrides(overrides)
    config = student_config_from_teacher(teacher.config, overrides)
    if bitnet is not None:
        check_convertible(config)  # before building anything
    config.dtype = dtype
    n_teacher, n_student = layer_count(teacher.config), layer_count(config)
    copy_weights = init == "teacher" or (init == "auto" and _same_width(config, teacher.config))
    if copy_weights:
        _check_teacher_weights_readable(teacher)
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if copy_weights:
        layer_map = uniform_layer_subset(n_teacher, n_student)
        left_random = init_from_teacher(student, teacher, layer_map)
        student.config.distily_init = source_record(teacher.config, layer_map)
        if left_random:
            logger.warning("Student tensors left at random init (shape differs from the teacher): %s", left_random)
        logger.info("Student initialised from teacher layers %s of %d.", layer_map, n_teacher)
    else:
        student.config.distily_init = {"from": "random"}
        logger.info("Student randomly initialised (init=%s, width differs from the teacher).", init)
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    student.train()
    if bitnet is not None:
        student = convert_to_bitnet(student, bitnet)
    return student


def _check_teacher_weights_readable(teacher: nn.Module) -> None:
    """A student copies teacher tensors only when they hold plain float weights on this process."""
    from .modeling import is_quantized

    if is_quantized(teacher):
        raise ConfigError(
            "The teacher was loaded quantised (8-bit/4-bit), so a student cannot copy its weights. Pass a pretrained "
            "student with --student PATH, or build one with random weights (--student_init random)."
        )
    if any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in teacher.parameters()):
        raise ConfigError(
            "The teacher's weights are partitioned across processes (DeepSpeed ZeRO-3 loads them that way), so a "
            "student cannot copy them. Build the student once without ZeRO-3 (distily.build_student, then "
            "save_pretrained) and pass it with --student PATH; see docs/scaling.md."
        )


def load_pretrained_student(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A pretrained causal LM to distil into (``--student``), in float32 and train mode.

    It must share the teacher's tokenizer; :func:`distily.trainer.check_compatible` compares the vocabularies.
    (A finished run's student is loaded by :meth:`distily.run_folder.RunFolder.load_student`.)
    """
    from pathlib import Path

    path = Path(name_or_path).expanduser()
    if not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise FileNotFoundError(
            f"--student {name_or_path!r} does not exist. Pass a local model folder or a Hub id of a pretrained "
            "student that shares the teacher's tokenizer."
        )
    try:
        student = AutoModelForCausalLM.from_pretrained(
            str(path) if path.exists() else name_or_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
        )
    except (OSError, ValueError) as err:  # no model files, unreachable Hub, not a causal LM
        reason = str(err).strip().rstrip(".")
        raise ConfigError(
            f"Could not load --student {name_or_path!r}: {reason}. Pass a folder saved with save_pretrained (or a "
            "Hub id) of a causal LM that shares the teacher's tokenizer."
        ) from err
    student.config.distily_init = {"from": "pretrained", "source": name_or_path}
    student.train()
    logger.info("Loaded pretrained student %s (%s).", name_or_path, type(student).__name__)
    return student


load_student = load_pretrained_student  # its earlier name


def build_student_with_tokenizer(
    teacher: PreTrainedModel,
    teacher_tokenizer,
    tokenizer,
    overrides: dict | None = None,
    init: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A student like :func:`build_student`'s, with ``tokenizer``'s vocabulary instead of the teacher's
    (``--student_tokenizer``, distilled with :mod:`distily.cross_tokenizer`).

    The decoder blocks and the final norm are initialised as :func:`build_student` does (``init``); the
    embeddings (and an untied head) start random, then every token whose string is also in the teacher's
    vocabulary takes the teacher's row (:func:`copy_shared_token_rows`), when the widths match.
    """
    if init not in STUDENT_INITS:
        raise ConfigError(f"init={init!r} is not one of {', '.join(STUDENT_INITS)}.")
    config = student_config_from_teacher(teacher.config, overrides)
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, name, getattr(tokenizer, name, None))
    config.dtype = dtype
    copy_weights = init == "teacher" or (init == "auto" and _same_width(config, teacher.config))
    if copy_weights:
        _check_teacher_weights_readable(teacher)
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if copy_weights:
        layer_map = uniform_layer_subset(layer_count(teacher.config), layer_count(config))
        init_from_teacher(student, teacher, layer_map)  # the vocabulary-sized tensors do not fit: left random
        copied = copy_shared_token_rows(student, teacher, tokenizer, teacher_tokenizer)
        student.config.distily_init = source_record(teacher.config, layer_map, shared_token_rows=copied)
        logger.info(
            "Student initialised from teacher layers %s; %d of %d token rows copied from the teacher's vocabulary.",
            layer_map, copied, len(tokenizer),
        )  # fmt: skip
    else:
        student.config.distily_init = {"from": "random"}
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    student.train()
    return student


def shared_token_ids(tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student_ids, teacher_ids)`` of the tokens whose string is in both vocabularies (byte-level BPE
    strings spell the token's bytes, so equal strings are equal text), in the student's id order."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    vocab = tokenizer.get_vocab()
    pairs = sorted((sid, teacher_vocab[token]) for token, sid in vocab.items() if token in teacher_vocab)
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    student_ids, teacher_ids = zip(*pairs, strict=True)
    return torch.tensor(student_ids), torch.tensor(teacher_ids)


def copy_shared_token_rows(student: PreTrainedModel, teacher: PreTrainedModel, tokenizer, teacher_tokenizer) -> int:
    """Copy the teacher's input-embedding (and untied output) rows of every shared token string into the
    student's rows of the same string; returns how many tokens were copied (0 when the widths differ)."""
    student_ids, teacher_ids = shared_token_ids(tokenizer, teacher_tokenizer)
    pairs = [(student.get_input_embeddings(), teacher.get_input_embeddings())]
    student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    if student_head is not None and student_head.weight is not student.get_input_embeddings().weight:
        pairs.append((student_head, teacher_head))
    if any(s.weight.shape[1] != t.weight.shape[1] for s, t in pairs):
        return 0
    with torch.no_grad():
        for student_module, teacher_module in pairs:
            rows = teacher_module.weight.detach()[teacher_ids.to(teacher_module.weight.device)]
            student_module.weight[student_ids] = rows.to(student_module.weight)
    return len(student_ids)
