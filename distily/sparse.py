"""Divergences against a sparse teacher: its top-k tokens plus one bucket for the rest of the vocabulary.

A recorded teacher (:mod:`distily.teacher.recorded`) keeps, per token, the ``k`` most likely token ids, their
log-probabilities ``log p_i`` and the log of the remaining probability mass ``log τ = log(1 − Σ_{i∈K} p_i)``.
The full distribution is gone, so every divergence is computed between *coarse-grained* distributions over
``k + 1`` outcomes: the teacher's top-k tokens ``K``, and one tail bucket holding everything else.

* teacher: ``P = (p_1, ..., p_k, τ)`` as recorded (sums to one);
* student: ``Q = (q_1, ..., q_k, Q_τ)`` with ``q_i = softmax(s / T)_i`` at the teacher's ids and
  ``Q_τ = Σ_{j∉K} softmax(s / T)_j``, computed exactly from the student's full logits.

The registered distribution losses are then applied to ``log P`` and ``log Q`` (they only look at their
inputs through ``log_softmax``/``softmax``, which leave normalised log-probabilities unchanged):

* ``forward_kl``: ``Σ_{i∈K} p_i log(p_i / q_i) + τ log(τ / Q_τ)``;
* ``reverse_kl``: ``Σ_{i∈K} q_i log(q_i / p_i) + Q_τ log(Q_τ / τ)``;
* ``generalized_jsd`` (β): ``β KL(P ‖ M) + (1 − β) KL(Q ‖ M)`` with ``M = βP + (1 − β)Q`` bucket-wise;
* ``skew_kl``, ``skew_reverse_kl`` and ``total_variation`` likewise on the ``k + 1`` buckets.

How this approximates the full divergence: merging outcomes never increases an f-divergence (data processing
inequality), so each value is a lower bound of the full-vocabulary one. The gap is the tail's own divergence,
for forward KL exactly ``τ · KL(p_tail/τ ‖ q_tail/Q_τ)``: what the teacher says about how to spread the tail
mass among the other tokens, which the cache does not keep. The top-k part and the tail *mass* are matched
exactly; the gap vanishes as ``k`` grows or as the teacher's tail mass shrinks. Logit-space losses (``mse``,
``cosine``) have no sparse form (the teacher's logits are not recorded) and are refused.

**Tail samples** (forward KL). A recording can also keep ``S`` token ids ``t_1..t_S`` drawn, with replacement,
from the teacher's tail distribution ``p̃_j = p_j / τ`` (``j ∉ K``), with their log-probabilities. They estimate
the missing term without bias: with ``q̃_j = q_j / Q_τ``,

``KL(p ‖ q) = KL_buckets(P ‖ Q) + τ · E_{j∼p̃}[log p̃_j − log q̃_j]``
``          ≈ KL_buckets(P ‖ Q) + (τ / S) Σ_s (log p̃_{t_s} − log q̃_{t_s})``.

Its gradient with respect to the student's logits is ``q_i − p_i`` on the top-k ids and ``q_j − τ c_j / S``
elsewhere (``c_j``: how often ``j`` was drawn), whose expectation is the full-vocabulary ``q_j − p_j``. So the
student's distribution *inside* the tail is pulled towards the teacher's, which the buckets alone leave
untouched, at ``S · 4`` bytes per token. The other losses have no unbiased estimator from samples of ``p``
(reverse KL and JSD weigh the tail by the student's own probabilities) and use the buckets, ignoring samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .losses import LossFn, forward_kl

# Registered losses that depend on their inputs only through softmax: they accept bucket log-probabilities.
BUCKET_LOSSES: set[str] = {
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
}


@dataclass
class SparseTeacher:
    """A teacher's top-k distribution for ``N`` tokens (recorded at some temperature).

    ``ids`` ``(N, k)`` int64, ``logprobs`` ``(N, k)`` and ``tail_logprob`` ``(N,)`` (log of the mass outside
    the top k), both float32. Optionally ``sample_ids`` ``(N, S)``, tokens drawn from the teacher's tail
    distribution (see the module docstring), and their log-probabilities ``sample_logprobs`` ``(N, S)``.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor
    sample_ids: Tensor | None = None
    sample_logprobs: Tensor | None = None

    def __post_init__(self):
        if (self.sample_ids is None) != (self.sample_logprobs is None):
            raise ValueError("sample_ids and sample_logprobs come together: give both or neither.")

    def __getitem__(self, rows) -> SparseTeacher:
        """The same teacher for a subset of its tokens."""
        samples = (None, None) if self.sample_ids is None else (self.sample_ids[rows], self.sample_logprobs[rows])
        return SparseTeacher(self.ids[rows], self.logprobs[rows], self.tail_logprob[rows], *samples)

    def bucket_log_probs(self) -> Tensor:
        """``log P``: the top-k log-probabilities and the tail bucket's, shape ``(N, k + 1)``."""
        return torch.cat([self.logprobs, self.tail_logprob.unsqueeze(-1)], dim=-1)


def check_bucket_loss(name: str) -> None:
    """Refuse a loss that cannot be computed from a sparse (top-k + tail) teacher."""
    if name not in BUCKET_LOSSES:
        raise ValueError(
            f"Loss {name!r} cannot be computed from a recorded teacher: it keeps only the top-k log-probabilities "
            f"and the tail mass, not the logits. Use one of {', '.join(sorted(BUCKET_LOSSES))}, or train with the "
            "live teacher (drop --teacher_cache). A loss of your own that depends on the logits only through "
            "softmax can be allowed with distily.sparse.BUCKET_LOSSES.add(name)."
        )


def student_bucket_log_probs(student_logits: Tensor, ids: Tensor) -> Tensor:
    """``log Q`` ``(N, k + 1)``: the student's log-probabilities at the teacher's top-k ids and of all other tokens.

    The tail bucket is a log-sum-exp over the tokens outside ``ids`` (exact, no ``1 − Σ q`` cancellation).
    """
    log_normaliser = student_logits.logsumexp(-1, keepdim=True)
    top = student_logits.gather(-1, ids) - log_normaliser
    outside = student_logits.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) - log_normaliser
    return torch.cat([top, outside], dim=-1)


def _sampled_tail_kl(log_tail: Tensor, sample_log_p: Tensor, log_tail_q: Tensor, log_q_samples: Tensor) -> Tensor:
    """``(τ / S) Σ_s (log p̃_{t_s} − log q̃_{t_s})`` per token ``(N,)``, the sampled estimate of the tail's own
    forward KL (module docstring), from ``log τ`` ``(N,)``, the samples' ``log p`` ``(N, S)``, the student's
    ``log Q_τ`` ``(N,)`` and its ``log q`` at the samples ``(N, S)``."""
    drawn = (sample_log_p - log_tail.unsqueeze(-1)) - (log_q_samples - log_tail_q.unsqueeze(-1))
    return log_tail.exp() * drawn.mean(-1)


class _BucketForwardKL(torch.autograd.Function):
    """Forward KL on the buckets, plus the tail-sample term when there are samples, with its closed-form gradient
    (the default loss, so worth the shortcut).

    ``value = Σ_K p_i (log p_i − log q_i) + τ (log τ − log Q_τ) [+ (τ / S) Σ_s (log p̃_{t_s} − log q̃_{t_s})]``;
    with ``Σ_K p_i + τ = 1`` its gradient with respect to the student's logits is ``q_i − p_i`` on the top-k ids
    and ``q_j (1 − τ / Q_τ)`` elsewhere, or with samples ``q_j − τ c_j / S``. One softmax, one full-vocabulary
    reduction and in-place updates, instead of autograd through a log-sum-exp over a masked copy of the logits.
    """

    @staticmethod
    def forward(ctx, student_logits, ids, log_p, log_tail, sample_ids, sample_log_p):
        log_normaliser = student_logits.logsumexp(-1, keepdim=True)
        q = (student_logits - log_normaliser).exp_()
        q_top = q.gather(-1, ids)
        tail_q = q.scatter_(-1, ids, 0.0).sum(-1)  # Σ over the tokens outside the top k: no 1 − Σ cancellation
        tail_q = tail_q.clamp_(min=torch.finfo(q.dtype).tiny)  # a zero tail mass would give log 0 and τ / 0
        log_tail_q = tail_q.log()
        log_q_top = student_logits.gather(-1, ids) - log_normaliser
        p, tau = log_p.exp(), log_tail.exp()
        value = (p * (log_p - log_q_top)).sum(-1) + tau * (log_tail - log_tail_q)
        if sample_ids is None:
            grad = q.mul_((1.0 - tau / tail_q).unsqueeze(-1))
        else:
            log_q_samples = student_logits.gather(-1, sample_ids) - log_normaliser
            value = value + _sampled_tail_kl(log_tail, sample_log_p, log_tail_q, log_q_samples)
            weight = (tau / sample_ids.shape[-1]).unsqueeze(-1).expand_as(sample_ids)
            grad = q.scatter_add_(-1, sample_ids, -weight)  # q_j − τ c_j / S outside the top k (zero inside yet)
        grad = grad.scatter_(-1, ids, q_top - p)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_value.unsqueeze(-1), None, None, None, None, None


def sparse_token_divergence(
    student_logits: Tensor, teacher: SparseTeacher, loss_fn: LossFn, temperature: float = 1.0
) -> Tensor:
    """D(Q, P) per token, shape ``(N,)``: ``loss_fn`` on the ``k + 1`` buckets (see the module docstring).

    ``student_logits`` ``(N, V)`` are divided by ``temperature``; the teacher was recorded at that temperature
    already. Computed in float32 or wider.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_logits = student_logits.to(dtype)
    if temperature != 1.0:
        student_logits = student_logits / temperature
    device = student_logits.device
    ids = teacher.ids.to(device)
    # Renormalised: float16 storage leaves the recorded buckets summing to 1 only within ~1e-3.
    target = teacher.bucket_log_probs().to(device=device, dtype=dtype).log_softmax(-1)
    samples = None
    if loss_fn is forward_kl and teacher.sample_ids is not None:
        # The stored log p of the samples, shifted like the buckets so that log p̃ = log p − log τ is unchanged.
        shift = target[:, -1] - teacher.tail_logprob.to(device=device, dtype=dtype)
        sample_log_p = teacher.sample_logprobs.to(device=device, dtype=dtype) + shift[:, None]
        samples = teacher.sample_ids.to(device), sample_log_p
    if loss_fn is forward_kl and student_logits.requires_grad and torch.is_grad_enabled():
        per_token = _BucketForwardKL.apply(
            student_logits, ids, target[:, :-1], target[:, -1], *(samples or (None, None))
        )
    else:
        student_buckets = student_bucket_log_probs(student_logits, ids)
        per_token = loss_fn(student_buckets, target)
        if samples is not None:
            sample_ids, sample_log_p = samples
            log_q_samples = student_logits.gather(-1, sample_ids) - student_logits.logsumexp(-1, keepdim=True)
            per_token = per_token + _sampled_tail_kl(target[:, -1], sample_log_p, student_buckets[:, -1], log_q_samples)
    if per_token.shape != student_logits.shape[:1]:
        raise ValueError(
            f"A loss must return one value per token, shape ({student_logits.shape[0]},); got {tuple(per_token.shape)}."
        )
    return per_token


def dense_log_probs(teacher: SparseTeacher, vocab_size: int) -> Tensor:
    """The sparse teacher as full log-probabilities ``(N, V)``: top-k as recorded, the tail mass spread evenly
    over the other ``V − k`` tokens. For inspection and tests; the losses use the buckets."""
    k = teacher.ids.shape[-1]
    spread = teacher.tail_logprob - torch.log(torch.tensor(float(max(vocab_size - k, 1))))
    full = spread.unsqueeze(-1).expand(-1, vocab_size).clone()
    return full.scatter_(-1, teacher.ids, teacher.logprobs)
