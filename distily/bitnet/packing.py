"""Ternary packing (four weights per byte, transformers' BitNet layout) and saving / loading BitNet students.

Two on-disk forms, both loadable with plain transformers:

* the latent (training) weights, as a BitNet model with ``quantization_config`` ``{"quant_method": "bitnet",
  "linear_class": "autobitlinear", "quantization_mode": "online"}`` (run folders and checkpoints; reloaded as
  distily's modules by :func:`load_bitnet_student`);
* the packed export (:func:`save_packed`): 2-bit codes, four weights per byte, plus one ``weight_scale`` per
  projection, with ``quantization_mode: "offline"``; its logits equal the training model's in eval mode.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..errors import ConfigError
from ..io import atomic_path, provenance, write_json_atomic
from ..modeling import directory_bytes, fp16_bytes
from .convert import CONFIG_KEY, bitnet_options_of, set_bitnet_metadata, swap_in_bitlinear
from .layers import VALUES_PER_BYTE, bitlinear_modules, is_bitnet_student
from .options import BitNetOptions

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Packing


def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """Pack ternary values (rows × ...) into uint8, four per byte, in transformers' BitNet layout.

    With ``R = rows / 4``, byte ``[r, ...]`` holds rows ``r, R + r, 2R + r, 3R + r`` in bits 0-1, 2-3, 4-5, 6-7,
    each stored as value + 1 (0, 1 or 2). ``rows`` must be a multiple of 4.
    """
    rows = values.shape[0]
    if rows % VALUES_PER_BYTE:
        raise ValueError(f"Cannot pack {rows} rows: the first dimension must be a multiple of {VALUES_PER_BYTE}.")
    ints = values.to(torch.int16)
    if ints.numel() and (ints.min() < -1 or ints.max() > 1 or not torch.equal(ints.to(values.dtype), values)):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}.")
    codes = (ints + 1).to(torch.uint8).reshape(VALUES_PER_BYTE, rows // VALUES_PER_BYTE, *values.shape[1:])
    packed = torch.zeros_like(codes[0])
    for index in range(VALUES_PER_BYTE):
        packed |= codes[index] << (2 * index)
    return packed


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``(rows / 4, ...)`` uint8 -> ``(rows, ...)`` values in {-1, 0, 1}."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"Packed ternary weights are uint8, got {packed.dtype}.")
    shifts = torch.arange(0, 2 * VALUES_PER_BYTE, 2, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(0) >> shifts.view(-1, *([1] * packed.dim()))) & 3
    if codes.numel() and int(codes.max()) == 3:
        raise ValueError("Packed ternary weights hold the unused code 3: this is not a BitNet-packed tensor.")
    return (codes.to(torch.int16) - 1).reshape(-1, *packed.shape[1:]).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def packed_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The export tensors: each BitLinear as ``weight`` (packed uint8) and ``weight_scale`` (shape ``(1,)``,
    γ), every other tensor cast to ``dtype`` (default: the model's). A tied LM head is stored once."""
    dtype = dtype or next(model.parameters()).dtype
    linears = bitlinear_modules(model)
    state = {}
    for name, module in linears.items():
        values, gamma = module.ternary()
        state[f"{name}.weight"] = pack_ternary(values).cpu().contiguous()
        state[f"{name}.weight_scale"] = gamma.reshape(1).to(dtype).cpu()
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in linears or (tied and name == "lm_head.weight"):
            continue
        state[name] = tensor.detach().to(dtype).cpu().contiguous()
    return state


def save_packed(
    model: nn.Module, path: str | Path, dtype: torch.dtype | None = None, tokenizer=None, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``model`` (a BitNet student) as a ternary-packed Hugging Face folder and return a size report.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(path)`` through transformers' BitNet integration
    (``quantization_config``: ``bitnet``, ``autobitlinear``, ``offline``); in eval mode its logits equal
    ``model``'s (exactly in float32). ``dtype`` is the precision of the non-ternary tensors (embeddings, norms,
    scales). The folder is written atomically; an existing folder is replaced only with ``overwrite``.
    """
    from safetensors.torch import save_file

    if not is_bitnet_student(model):
        raise ConfigError("save_packed needs a BitNet student (built with --student_config '{\"bitnet\": true}').")
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{str(path)!r} already exists and is not empty; pass overwrite=True to replace it.")
    dtype = dtype or next(model.parameters()).dtype
    config = copy.deepcopy(model.config)
    options = bitnet_options_of(model) or BitNetOptions()
    set_bitnet_metadata(config, options, packed=True)
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    state = packed_state_dict(model, dtype)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    linears = bitlinear_modules(model)
    report = {
        "format": "bitnet-packed",
        "dtype": str(dtype).removeprefix("torch."),
        "ternary_tensors": len(linears),
        "ternary_parameters": sum(m.weight.numel() for m in linears.values()),
        "bytes_on_disk": directory_bytes(path),
        "fp16_student_bytes": fp16_bytes(model),
    }
    report["size_ratio_vs_fp16"] = round(report["bytes_on_disk"] / report["fp16_student_bytes"], 4)
    write_json_atomic(path / "distily_export.json", {**provenance(), **report})
    logger.info(
        "Packed BitNet student written to %s: %s bytes on disk vs %s for the fp16 student (%.1f%%).",
        path, f"{report['bytes_on_disk']:,}", f"{report['fp16_student_bytes']:,}", 100 * report["size_ratio_vs_fp16"],
    )  # fmt: skip
    return report


def load_bitnet_student(path: str | Path, device: torch.device | str | None = None) -> PreTrainedModel:
    """Load a BitNet student saved by distily in its latent (training) format -- a run folder or a checkpoint --
    as the training-time model (:class:`BitLinear` projections, in eval mode).

    ``AutoModelForCausalLM.from_pretrained(path)`` loads the same folder through transformers' own BitNet
    integration (``AutoBitLinear``, online quantisation); this loader gives back distily's modules, whose logits
    are bitwise those of the model that was saved. Packed exports load with ``AutoModelForCausalLM``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a saved model folder.")
    config = AutoConfig.from_pretrained(path)
    recorded = getattr(config, CONFIG_KEY, None)
    if config.model_type != "bitnet" or not recorded:
        raise ConfigError(f"{str(path)!r} is not a distily BitNet student (no {CONFIG_KEY!r} in its config).")
    if recorded.get("format") == "packed":
        raise ConfigError(
            f"{str(path)!r} is a packed export; load it with transformers.AutoModelForCausalLM.from_pretrained."
        )
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    dtype = next(iter(state.values())).dtype if state else torch.float32
    # A plain BitNetForCausalLM (no quantizer: distily's BitLinear does the quantising), built in the saved dtype.
    model = swap_in_bitlinear(AutoModelForCausalLM.from_config(config, dtype=dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise ConfigError(f"{str(path)!r} does not match a BitNet student: missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    if device is not None:
        model.to(device)
    return model.eval()
