"""8-bit and 4-bit teachers with bitsandbytes: the ``quantization_config`` for ``from_pretrained``.

A frozen teacher only runs forward passes, so its linear layers can live in 8-bit (LLM.int8) or 4-bit NF4 and
cost a half or a quarter of their bfloat16 memory. bitsandbytes needs a CUDA GPU; it is an optional extra
(``pip install 'distily[gpu]'``), imported only when a quantised teacher is asked for.
"""

from __future__ import annotations

from importlib.util import find_spec

import torch

from ..errors import ConfigError
from ..modeling import is_quantized  # noqa: F401  (re-exported)

GPU_EXTRA = "pip install 'distily[gpu]'"


def bitsandbytes_config(bits: int, compute_dtype: torch.dtype | None, teacher: str, gguf: bool = False):
    """A ``transformers.BitsAndBytesConfig`` for an 8- or 4-bit teacher, after checking it can work here.

    4-bit uses NF4 with double quantisation and computes in ``compute_dtype`` (None: bfloat16 where the GPU
    supports it, else float16). Refused, with the reason and
    the alternative: a GGUF teacher (already quantised in its own format and dequantised on load), a machine
    without CUDA, a missing bitsandbytes.
    """
    if bits not in (4, 8):
        raise ConfigError(f"bitsandbytes teachers are 8-bit or 4-bit, not {bits}-bit.")
    flag = f"--teacher_load_in_{bits}bit"
    if gguf:
        raise ConfigError(
            f"{flag} does not apply to the GGUF teacher {teacher!r}: GGUF files carry their own quantisation and "
            "are dequantised when loaded. Drop the flag; to halve the teacher's memory use --teacher_dtype bfloat16, "
            "or pass the teacher as a safetensors model folder or Hub id."
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{flag} needs a CUDA GPU (bitsandbytes), and this machine has none. On CPU use --teacher_dtype "
            "bfloat16 to halve the teacher's memory, or drop the flag."
        )
    if find_spec("bitsandbytes") is None:
        raise ImportError(f"{flag} needs bitsandbytes, which is not installed. Install it with: {GPU_EXTRA}")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
