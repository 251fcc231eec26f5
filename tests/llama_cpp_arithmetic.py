"""llama.cpp's CPU arithmetic for a BitNet GGUF, emulated in PyTorch: the reference the GGUF tests compare with.

llama.cpp does not quantise activations the way BitLinear does (per token, absmax int8 over the whole row). Each
weight type has a "vec_dot type" that the CPU backend converts the activations to before the dot product:

* TQ2_0 / TQ1_0 (ternary) -> Q8_K: int8 blocks of 256 values along the row, one float32 scale per block
  (``quantize_row_q8_K``: scale 127 / max|x| of the block, round half to even);
* Q8_0 -> Q8_0: int8 blocks of 32, the scale ``max|x| / 127`` stored as float16 (``quantize_row_q8_0``: round
  half away from zero with the float32 scale, dequantise with the float16 one);
* F16 -> F16 (activations rounded to float16), F32 -> F32 (none).

The weights themselves: ternary codes are exact in every type (TQ2_0 and TQ1_0 store {-1, 0, 1} with block scale
1; Q8_0 stores them as ±127 with a float16 scale of 1/127; F16 exactly), and the per-tensor scale γ is an f32
``.scale`` tensor. The token embedding (tied with the LM head) is rounded to its storage type.

``llama_cpp_arithmetic(model, types)`` switches a BitNet student's forward to that arithmetic, so a test can
check that llama.cpp computes exactly this (up to float32 accumulation order, which can move an activation
across a rounding boundary now and then) and, separately, how far this is from the student's own BitLinear
forward (a property of the trained student, not of the export).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from distily.bitnet import BitLinear, absmean_quantize

GGUF_PROJECTIONS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"rows of {x.shape[-1]} values do not split into blocks of {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """``x`` after ggml's Q8_K round trip (blocks of 256, float32 scale, round half to even)."""
    b = _blocks(x.float(), 256)
    amax = b.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(b * scale).clamp(max=127)
    return torch.where(amax > 0, q / scale, torch.zeros_like(b)).reshape(x.shape)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x`` after ggml's Q8_0 round trip (blocks of 32, float16 scale, round half away from zero)."""
    b = _blocks(x.float(), 32)
    d = b.abs().amax(-1, keepdim=True) / 127.0
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    scaled = b * inverse
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return (q * d.half().float()).reshape(x.shape)


def f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


# What the CPU backend converts activations to, per weight type (ggml's vec_dot_type).
ACTIVATIONS = {"TQ2_0": q8_k, "TQ1_0": q8_k, "Q8_0": q8_0, "F16": f16, "BF16": lambda x: x.bfloat16().float()}
# The stored weight, per type, for a non-ternary tensor (the token embedding).
WEIGHTS = {"F32": lambda w: w, "F16": f16, "Q8_0": q8_0, "BF16": lambda w: w.bfloat16().float()}


def gguf_name(module_name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``blk.3.ffn_down.weight``."""
    layer = int(module_name.split("layers.")[1].split(".")[0])
    projection = next(gguf for hf, gguf in GGUF_PROJECTIONS.items() if module_name.endswith(hf))
    return f"blk.{layer}.{projection}.weight"


@contextlib.contextmanager
def llama_cpp_arithmetic(model: torch.nn.Module, types: dict[str, str]):
    """Within the block, ``model`` (a tied BitNet student, float32) computes what llama.cpp's CPU backend computes
    for its GGUF whose tensor types are ``types`` (GGUF tensor name -> type name)."""
    restore = []
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            activation = ACTIVATIONS.get(types[gguf_name(name)], lambda x: x)

            def forward(x, module=module, activation=activation):
                codes, gamma = absmean_quantize(module.weight)
                return F.linear(activation(x), codes.to(x.dtype)) * gamma

            module.forward = forward
            restore.append(module)
    embedding = model.get_input_embeddings()
    latent = embedding.weight.data
    embedding_type = types["token_embd.weight"]
    embedding.weight.data = WEIGHTS[embedding_type](latent)
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: (ACTIVATIONS.get(embedding_type, lambda x: x)(args[0]),)
    )
    try:
        yield model
    finally:
        for module in restore:
            del module.forward
        embedding.weight.data = latent
        hook.remove()
