"""The loss registry: divergences between the student's and the teacher's next-token distributions.

Every entry is a per-token divergence. It receives student and teacher logits of shape ``(N, V)``, already
divided by the temperature and cast to float32 (float64 stays float64), and returns a tensor of shape
``(N,)``: one value per token. It must not modify its inputs in place (at T = 1 in float32 they are the
caller's tensors). On the chunked path (:mod:`distily.chunked`) ``N`` is one chunk of the batch's tokens.
Masking padding, normalising by the number of real tokens and the T² factor are done once, for every loss,
by :func:`distillation_loss`, so a new loss only has to write its formula.

Notation in the docstrings: ``p`` is the teacher distribution ``softmax(t / T)``, ``q`` the student's
``softmax(s / T)``, sums run over the vocabulary.

Register your own::

    @distily.register_loss("my_kl")
    def my_kl(student_logits, teacher_logits, *, power: float = 1.0):
        ...  # return shape (N,)

Parameters (``power`` above) are set with ``DistillationConfig.loss_kwargs``; a class whose ``__init__``
takes them and whose ``forward(student_logits, teacher_logits)`` returns ``(N,)`` works the same way.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .registry import Registry

LossFn = Callable[[Tensor, Tensor], Tensor]

LOSSES: Registry = Registry("loss", "distily.register_loss")


def register_loss(name: str, *, override: bool = False):
    """Register a per-token divergence (function or ``nn.Module`` class) under ``name``."""
    return LOSSES.register(name, override=override)


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = Σ p (log p − log q), per row; zero-probability terms of p contribute 0."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) computed stably from log a and log b."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


class _ForwardKL(torch.autograd.Function):
    """KL(p || q) per row, with the closed-form gradient ∂/∂s = softmax(s) − p (p sums to 1).

    Same values as autograd through ``log_softmax`` and ``kl_div``, in fewer full-vocabulary passes and
    allocations. Used when only the student needs a gradient.
    """

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        log_q = student_logits.log_softmax(-1)
        log_p = teacher_logits.log_softmax(-1)
        p = log_p.exp()
        value = torch.linalg.vecdot(p, log_p.sub_(log_q))
        ctx.save_for_backward(log_q, p)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        log_q, p = ctx.saved_tensors
        return log_q.exp().sub_(p).mul_(grad.unsqueeze(-1)), None


@register_loss("forward_kl")
def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Forward KL, mean-seeking: KL(p || q) = Σ p (log p − log q)."""
    if student_logits.requires_grad and not teacher_logits.requires_grad and torch.is_grad_enabled():
        return _ForwardKL.apply(student_logits, teacher_logits)
    return _kl_from_log_probs(teacher_logits.log_softmax(-1), student_logits.log_softmax(-1))


@register_loss("reverse_kl")
def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Reverse KL, mode-seeking: KL(q || p) = Σ q (log q − log p)."""
    return _kl_from_log_probs(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1))


@register_loss("generalized_jsd")
def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence, as TRL's ``generalized_jsd_loss`` defines it.

    m = β·p + (1−β)·q;  JSD_β = β·KL(p || m) + (1−β)·KL(q || m).
    The end points are defined as the KLs (the formula itself vanishes there):
    β = 0 gives forward KL(p || q), β = 1 gives reverse KL(q || p). β = 0.5 is the symmetric JSD.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd needs 0 <= beta <= 1, got beta={beta}. Set loss_kwargs={{'beta': 0.5}}.")
    log_p = teacher_logits.log_softmax(-1)
    log_q = student_logits.log_softmax(-1)
    if beta == 0.0:
        return _kl_from_log_probs(log_p, log_q)
    if beta == 1.0:
        return _kl_from_log_probs(log_q, log_p)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)


@register_loss("skew_kl")
def skew_kl(student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024): KL(p || α·p + (1−α)·q).

    α = 0 is forward KL; a small α keeps the target finite where the student assigns ~0 probability.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_kl needs 0 <= alpha < 1, got alpha={alpha}. Set loss_kwargs={{'alpha': 0.1}}.")
    log_p = teacher_logits.log_softmax(-1)
    log_q = student_logits.log_softmax(-1)
    return _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, alpha))


@register_loss("skew_reverse_kl")
def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM, Ko et al. 2024): KL(q || α·q + (1−α)·p).

    α = 0 is reverse KL.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_reverse_kl needs 0 <= alpha < 1, got alpha={alpha}. Set loss_kwargs={{'alpha': 0.1}}.")
    log_p = teacher_logits.log_softmax(-1)
    log_q = student_logits.log_softmax(-1)
    return _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, alpha))


@register_loss("total_variation")
def total_variation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Total variation distance: TVD(p, q) = ½ Σ |p − q|, bounded in [0, 1]."""
    return 0.5 * (teacher_logits.softmax(-1) - student_logits.softmax(-1)).abs().sum(-1)


@register_loss("mse")
def mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean squared error on logits: (1/V) Σ (s − t)².

    With the T² factor applied by :func:`distillation_loss` the temperature cancels out.
    """
    return (student_logits - teacher_logits).pow(2).mean(-1)


@register_loss("cosine")
def cosine(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Cosine distance between logit vectors: 1 − s·t / (‖s‖ ‖t‖)."""
    return 1.0 - F.cosine_similarity(student_logits, teacher_logits, dim=-1, eps=1e-8)


def build_loss(name: str, loss_kwargs: dict | None = None) -> LossFn:
    """Resolve ``name`` in :data:`LOSSES` and bind its parameters.

    A function is bound with ``loss_kwargs``; a class is instantiated with them. Parameters the entry does not
    take are rejected with the list of those it does.
    """
    entry = LOSSES[name]
    loss_kwargs = dict(loss_kwargs or {})
    is_class = inspect.isclass(entry)
    params = list(inspect.signature(entry.__init__ if is_class else entry).parameters.values())
    # Skip `self` for a class; skip the two logit tensors for a function.
    params = params[1:] if is_class else params[2:]
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    tunable = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(loss_kwargs) - set(tunable))
    if unknown and not accepts_any:
        takes = ", ".join(tunable) if tunable else "no parameters"
        raise ValueError(f"Loss {name!r} got unknown loss_kwargs {unknown}; it takes: {takes}. Fix --loss_kwargs.")
    if is_class:
        module = entry(**loss_kwargs)
        if not callable(module):
            raise TypeError(f"Loss class {name!r} must be callable (an nn.Module with a forward method).")
        return module
    return functools.partial(entry, **loss_kwargs) if loss_kwargs else entry


def token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, loss_fn: LossFn, temperature: float = 1.0
) -> Tensor:
    """D(s/T, t/T) per token, shape ``(N,)``, for logits of shape ``(N, V)`` (no T² factor, no masking).

    The divergence is computed in float32 or wider (float64 inputs stay float64), so bf16 training stays
    stable. A vocabulary mismatch and a loss that does not return one value per token are errors.
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        raise ValueError(
            f"Student and teacher logits have different vocabulary sizes ({vocab} vs "
            f"{teacher_logits.shape[-1]}): distillation needs a shared tokenizer."
        )
    # Upcast half precision; never downcast float64 (it would silently lose precision and break gradcheck).
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    student_logits, teacher_logits = student_logits.to(dtype), teacher_logits.to(dtype)
    if temperature != 1.0:  # x / 1 == x exactly: skip two full-vocabulary passes (and one in backward)
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    per_token = loss_fn(student_logits, teacher_logits)
    if per_token.shape != student_logits.shape[:1]:
        raise ValueError(
            f"A loss must return one value per token, shape ({student_logits.shape[0]},); got {tuple(per_token.shape)}."
        )
    return per_token


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    temperature: float = 1.0,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """T² · Σ_{real tokens} D(s/T, t/T) / num_tokens.

    ``student_logits`` and ``teacher_logits`` have shape ``(..., V)``; ``mask`` (same leading shape, bool)
    selects the real tokens. The divergence is computed in float32 or wider (float64 inputs stay float64), so
    bf16 training stays stable. ``num_tokens`` defaults to the number of real tokens; pass a larger count
    (the tokens of the whole accumulated batch) to normalise across gradient-accumulation steps.
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        raise ValueError(
            f"Student and teacher logits have different vocabulary sizes ({vocab} vs "
            f"{teacher_logits.shape[-1]}): distillation needs a shared tokenizer."
        )
    student_logits = student_logits.reshape(-1, vocab)
    teacher_logits = teacher_logits.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).to(torch.bool)
        student_logits = student_logits[keep]
        teacher_logits = teacher_logits[keep]
    if num_tokens is None:
        num_tokens = student_logits.shape[0]
    per_token = token_divergence(student_logits, teacher_logits, loss_fn, temperature)
    total = per_token.sum() * (temperature**2)
    if isinstance(num_tokens, Tensor):
        return total / num_tokens.clamp(min=1).to(total.dtype)
    return total / max(float(num_tokens), 1.0)
