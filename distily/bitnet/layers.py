"""BitNet b1.58 arithmetic: the weight and activation quantisers, ``BitLinear`` and the SubLN ``SubLNorm``.

* **weights** -- absmean quantisation to {-1, 0, +1} with one scale per tensor:
  ``γ = mean|W|``, ``W_t = clamp(round(W / γ), -1, 1)``, ``W ≈ γ · W_t``;
* **activations** -- per-token absmax quantisation to 8 bits:
  ``s = 127 / max|x|`` over the features of each token, ``x_q = clamp(round(s · x), -128, 127)``, ``x ≈ x_q / s``;
* **straight-through estimator** (STE) -- ``round`` and ``clamp`` pass gradients through unchanged, so the
  latent full-precision weights keep training.

Every module here blends its quantisation in with ``quant_lambda`` (set by :mod:`distily.bitnet.schedule`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

from ..errors import ConfigError

# Ternary codes are stored as value + 1 in {0, 1, 2}, 2 bits each, four per byte (distily.bitnet.packing).
VALUES_PER_BYTE = 4
# Smallest scale denominator (mean|W| or max|x|), as in the BitNet reference code: keeps all-zero inputs finite.
SCALE_EPS = 1e-5
ACTIVATION_QMAX = 127  # symmetric int8: codes in [-128, 127], scale 127 / max|x|


# Quantisers (the exact arithmetic of the forward pass; golden-tested)


def absmean_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weights and their per-tensor scale: ``γ = max(mean|W|, eps)``, ``W_t = clamp(round(W / γ), -1, 1)``.

    Computed in float32 whatever the weight's dtype. Returns ``(W_t, γ)``: ``W_t`` float32 with values in
    {-1, 0, 1}, ``γ`` a float32 scalar tensor; ``γ · W_t`` is the dequantised weight.
    """
    w = weight.detach().float()
    gamma = w.abs().mean().clamp(min=SCALE_EPS)
    return (w * (1.0 / gamma)).round().clamp(-1, 1), gamma


def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 8-bit activations: ``s = 127 / max(max|x|, eps)`` over the last dimension,
    ``x_q = clamp(round(s · x), -128, 127)``. Returns ``(x_q, s)`` in float32; ``x_q / s`` dequantises."""
    xf = x.detach().float()
    scale = ACTIVATION_QMAX / xf.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS)
    return (xf * scale).round().clamp(-ACTIVATION_QMAX - 1, ACTIVATION_QMAX), scale


def straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass (bit for bit: ``source − source`` is exactly 0), the gradient of ``source``
    in the backward pass: the straight-through estimator."""
    return value + (source - source.detach())


def fake_quantize_activations(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``x + λ·(x_q/s − x)`` with the straight-through (identity) gradient; exactly ``x_q / s`` when λ = 1."""
    q, scale = absmax_quantize(x)
    dequantised = (q / scale).to(x.dtype)
    return straight_through(dequantised, x) if strength == 1.0 else x + strength * (dequantised - x).detach()


# ----------------------------------------------------------------------------------------------------------------
# BitLinear


class BitLinear(nn.Module):
    """A bias-free linear layer with ternary weights and 8-bit activations, trained through an STE.

    Holds the latent full-precision ``weight`` (a parameter, trained); the ternary weight and its scale are
    recomputed from it in every forward pass (:func:`absmean_quantize`), the activations are quantised per token
    (:func:`absmax_quantize`). With ``quant_lambda`` = 1 (the default, set by :class:`BitNetWarmup` during
    warm-up) the output is ``linear(x_q / s, W_t) · γ`` -- the same arithmetic as transformers'
    ``AutoBitLinear`` on the packed export, so the exported model reproduces these logits exactly. With
    ``quant_lambda`` = λ < 1 it is ``linear(x + λ(x̂ − x), W + λ(γW_t − W))``; λ = 0 is the plain linear layer.
    The gradient reaching ``weight`` and the input is the straight-through one in both cases.
    """

    def __init__(
        self, in_features: int, out_features: int, device=None, dtype=None, weight: nn.Parameter | None = None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(weight, a=5**0.5)  # nn.Linear's default
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {(out_features, in_features)}")
        self.weight = weight
        # Not a buffer: the warm-up callback recomputes it from global_step, so it is never saved or resumed.
        self.quant_lambda = 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitLinear:
        """A BitLinear that takes over ``linear``'s weight parameter (the same tensor, not a copy)."""
        if linear.bias is not None:
            raise ConfigError("BitLinear has no bias; this projection has one (attention_bias / mlp_bias).")
        return cls(linear.in_features, linear.out_features, weight=linear.weight)

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_t as int8, γ as a float32 scalar)``: what the packed export stores."""
        values, gamma = absmean_quantize(self.weight)
        return values.to(torch.int8), gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        strength = float(self.quant_lambda)
        weight = self.weight
        values, gamma = absmean_quantize(weight)
        if strength == 1.0:
            # W_t itself (integer-valued) in the product, γ applied to the output; the gradient reaching the latent
            # weight is d/dW of W/γ, so that d(out)/dW is the dequantised-activation one of the plain STE.
            ternary = straight_through(values.to(weight.dtype), weight * (1.0 / gamma).to(weight.dtype))
            out = F.linear(fake_quantize_activations(x), ternary)
            return out * gamma.to(out.dtype)
        dequantised = (values * gamma).to(weight.dtype)
        blended = weight + strength * (dequantised - weight).detach()
        return F.linear(fake_quantize_activations(x, strength), blended)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant_lambda={self.quant_lambda}"


class SubLNorm(BitNetRMSNorm):
    """BitNet's SubLN RMSNorm (``attn_sub_norm``, ``ffn_sub_norm``), blended in during the warm-up.

    ``x + λ·(RMSNorm(x) − x)``: with ``quant_lambda`` = 1 (the default) exactly transformers' ``BitNetRMSNorm``
    (same parameter name, same arithmetic), with λ = 0 the identity -- so a converted student at λ = 0 computes
    exactly what the full-precision student did. Unlike the quantisers, the blend is not detached: the gain trains.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight: nn.Parameter | None = None):
        super().__init__(hidden_size, eps=eps)
        if weight is not None:
            self.weight = weight
        self.quant_lambda = 1.0

    @classmethod
    def from_norm(cls, norm: nn.Module) -> SubLNorm:
        """A SubLNorm that takes over ``norm``'s gain parameter (the same tensor)."""
        return cls(norm.weight.shape[0], eps=norm.variance_epsilon, weight=norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        strength = float(self.quant_lambda)
        if strength == 1.0:
            return super().forward(x)
        return x if strength == 0.0 else x + strength * (super().forward(x) - x)


def bitlinear_modules(model: nn.Module) -> dict[str, BitLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, BitLinear)}


def is_bitnet_student(model: nn.Module) -> bool:
    return any(isinstance(module, BitLinear) for module in model.modules())


def set_quant_lambda(model: nn.Module, value: float) -> None:
    """Set the warm-up blend λ of every BitLinear and SubLN norm in ``model`` (1 = the BitNet model)."""
    for module in model.modules():
        if isinstance(module, (BitLinear, SubLNorm)):
            module.quant_lambda = float(value)
