"""Losses and norms for intermediate signals (hidden states, attention maps), one value per token.

Every loss receives student and teacher features of the selected (real) tokens, ``(N, D)`` for hidden states
or ``(N, heads, keys)`` for attention probabilities, in float32, and returns ``(N,)``. The trainer sums over
tokens, averages over the mapped layer pairs and divides by the number of real tokens, like the logit losses.
A *norm* is applied to both sides first (after the projector): ``loss: mse, norm: layer_norm`` is the
normalised MSE.

Register your own with ``@distily.register_feature_loss("name")`` (or ``register_feature_norm``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

FEATURE_LOSSES: Registry = Registry("feature loss", "distily.register_feature_loss")
FEATURE_NORMS: Registry = Registry("feature norm", "distily.register_feature_norm")


def register_feature_loss(name: str, *, override: bool = False):
    """Register a per-token loss ``(student (N, ...), teacher (N, ...)) -> (N,)`` under ``name``."""
    return FEATURE_LOSSES.register(name, override=override)


def register_feature_norm(name: str, *, override: bool = False):
    """Register a parameter-free map ``(N, D) -> (N, D)`` applied to both sides before the loss."""
    return FEATURE_NORMS.register(name, override=override)


@register_feature_loss("mse")
def mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error per token: (1/D) Σ_d (s_d − t_d)²."""
    return (student - teacher).pow(2).flatten(1).mean(-1)


@register_feature_loss("cosine")
def cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Cosine distance per token: 1 − s·t / (‖s‖ ‖t‖)."""
    return 1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=-1, eps=1e-8)


@register_feature_loss("kl")
def kl(student: Tensor, teacher: Tensor) -> Tensor:
    """KL between attention distributions, averaged over heads: (1/H) Σ_h Σ_k p_hk (log p_hk − log q_hk).

    ``p`` (teacher) and ``q`` (student) are attention probabilities ``(N, heads, keys)`` (each row sums to 1;
    masked keys are 0 on both sides). Differing head counts are compared through their head-averaged maps.
    """
    if student.dim() == 2:
        student, teacher = student[:, None], teacher[:, None]
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    log_q = student.clamp(min=1e-12).log()
    log_p = teacher.clamp(min=1e-12).log()
    return (teacher * (log_p - log_q)).sum(-1).mean(-1)


@register_feature_norm("none")
def no_norm(x: Tensor) -> Tensor:
    """x unchanged."""
    return x


@register_feature_norm("layer_norm")
def layer_norm(x: Tensor) -> Tensor:
    """(x − mean(x)) / std(x) over the feature dimension (no learned scale): scale-free comparison."""
    return F.layer_norm(x, x.shape[-1:])


@register_feature_norm("l2")
def l2(x: Tensor) -> Tensor:
    """x / ‖x‖ over the feature dimension."""
    return F.normalize(x, dim=-1, eps=1e-8)
