"""Facts about a causal LM that several features need: a leaf over torch and transformers only.

Where its decoder layers are (one rule for student building, hidden-state objectives, BitNet conversion and
distributed wrapping), how many layers a config has, how many parameters a model has, whether its weights
stay quantised in memory, how many bytes it takes (on disk, or in float16), and how a saved PEFT adapter merges
into its base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

# Config attributes that count the transformer blocks, per architecture family.
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")
# Attributes of a decoder that hold its blocks: Llama-style `layers`, GPT-2's `h`, T5-style `block`, `blocks`.
LAYER_LISTS = ("layers", "h", "block", "blocks")


def layer_count(config) -> int:
    """Number of transformer blocks in a config, whichever attribute the architecture uses."""
    for name in LAYER_COUNT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"Cannot tell how many layers a {type(config).__name__} has (looked for {LAYER_COUNT_FIELDS}).")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (Llama-style ``model.layers``, GPT-2's ``transformer.h``, PEFT-wrapped)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in LAYER_LISTS:
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(
        f"Cannot find the decoder layers of {type(model).__name__} (looked for {', '.join(LAYER_LISTS)} on its "
        "decoder). Hidden-state and attention objectives need them; use logits only for this model."
    )


def decoder_layers_path(model: nn.Module) -> str:
    """The dotted name, within ``model``, of :func:`decoder_layers` (``model.layers``, ``transformer.h``): the
    prefix of the blocks' parameter names in ``model.state_dict()``."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ConfigError(f"The decoder layers of {type(model).__name__} are not among its submodules.")


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once; ZeRO-3 partitioned ones at their full size)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += getattr(parameter, "ds_numel", None) or parameter.numel()
    return total


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a model whose weights stay quantised in memory (bitsandbytes, GPTQ, AWQ, ...).

    Such weights can neither be copied into a float student nor moved with ``.to()``. GGUF teachers also load
    through a transformers quantizer, but their weights are dequantised to floats: they are not quantised here.
    """
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    if any(not parameter.is_floating_point() for parameter in model.parameters()):
        return True
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return False
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return str(getattr(method, "value", method)).lower() != "gguf"


def directory_bytes(path: str | Path) -> int:
    """Bytes on disk of the model files in a folder (weights and config, not tokenizer or logs)."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) + (path / "config.json").stat().st_size


def fp16_bytes(model: nn.Module) -> int:
    """Bytes of ``model`` stored in float16 (every unique floating-point parameter and buffer, 2 bytes each)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen and tensor.is_floating_point():
            seen.add(id(tensor))
            total += tensor.numel() * 2
    return total


def merge_adapter(adapter: str | Path, base: str | Path | None = None, dtype="auto"):
    """Load a base student and the PEFT adapters saved in ``adapter``, and merge them into a plain model.

    ``base`` defaults to the base model the adapter records (``base_model_name_or_path`` in its
    ``adapter_config.json``). The one function for merging saved adapters: a run's end when the trained weights
    are sharded across processes (FSDP, ZeRO-3: only the saved adapter is whole, and the base weights never
    changed, so the pretrained student on disk is the base), and loading a folder that holds only an adapter
    (:meth:`distily.run_folder.RunFolder.load_student`, in float32).
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    if base is None:
        base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
