"""A safetensors folder that ``AutoModelForCausalLM.from_pretrained`` loads with no distily import."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ExportError

SAFETENSORS_OUTTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def write_safetensors(model, tokenizer, folder: str | os.PathLike, outtype: str = "f32") -> list[Path]:
    """Save weights (``model.safetensors``), ``config.json``, generation config and tokenizer into ``folder``.

    ``outtype`` casts the weights (``f32`` keeps a float32-trained student exactly). Returns the files written.
    """
    if outtype not in SAFETENSORS_OUTTYPES:
        raise ExportError(
            f"--outtype {outtype!r} is not available for safetensors (choose {', '.join(SAFETENSORS_OUTTYPES)}); "
            "block-quantised types such as q8_0 are GGUF-only."
        )
    folder = Path(folder)
    before = set(folder.rglob("*")) if folder.exists() else set()
    model = model.to(SAFETENSORS_OUTTYPES[outtype])
    model.config.dtype = SAFETENSORS_OUTTYPES[outtype]
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return sorted(path for path in folder.rglob("*") if path.is_file() and path not in before)
