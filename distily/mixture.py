"""The target of several teachers: a weighted mixture of their distributions, dense or sparse.

Dense (live teachers): at temperature ``T`` the target is ``p_mix = Σ_j w_j softmax(t_j / T)`` with weights
``w_j`` summing to one, computed as a log-sum-exp, ``log p_mix = logsumexp_j(log w_j + log_softmax(t_j / T))``, one
chunk of tokens at a time (:func:`accumulate`). The mixture is handed to the divergence as logits ``T · log p_mix``,
which the divergence divides by ``T`` again: every registered loss works unchanged. Weights may be per token
(``(N, teachers)``): routing is the one-hot case (``log w`` is 0 for the named teacher and −inf for the others),
where the mixture is that teacher's own distribution.

Sparse (recorded teachers, :mod:`distily.sparse`): each teacher ``j`` is known by its top-k set ``K_j``, their
log-probabilities and its tail mass ``τ_j``. The merged target keeps the union ``U`` of the top-k sets as its
explicit tokens and one tail bucket. Inside ``U`` a teacher's probability of a token outside its own ``K_j`` is
unknown; it is taken as its tail mass spread evenly over its tail, ``τ_j / (V − k_j)`` (what
:func:`distily.sparse.dense_log_probs` assumes), and the tail bucket keeps the rest,
``τ_j (V − |U|) / (V − k_j)``, so every teacher's buckets still sum to one. The union has a fixed width
``Σ_j k_j``: where top-k sets overlap, the free slots hold other tokens of the tails (at the same even
estimate), never a token twice. With one teacher the merge returns its buckets unchanged (ids sorted). Tail samples
are not merged (only a single recorded teacher uses them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sparse import SparseTeacher


def _log_weight(log_weights: Tensor, index: int) -> Tensor:
    """Teacher ``index``'s log-weight: a scalar for global weights ``(T,)``, a column ``(N, 1)`` per token."""
    return log_weights[index] if log_weights.dim() == 1 else log_weights[:, index : index + 1]


def accumulate(
    acc: Tensor | None, logits: Tensor, log_weights: Tensor, index: int, temperature: float, size: int
) -> Tensor:
    """``logaddexp(acc, log w_index + log_softmax(logits[:, :size] / T))``: one more teacher added to a running
    mixture ``acc`` (``None`` before the first). Computed in float32 or wider."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits[..., :size].to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    term = logits.log_softmax(-1) + _log_weight(log_weights, index).to(device=logits.device, dtype=dtype)
    return term if acc is None else torch.logaddexp(acc, term)


def as_logits(acc: Tensor, temperature: float) -> Tensor:
    """The mixture's log-probabilities ``acc`` as logits at temperature ``T`` (``T · log p_mix``)."""
    return acc if temperature == 1.0 else acc * temperature


def mixture_logits(logits: list[Tensor | None], log_weights: Tensor, temperature: float, size: int) -> Tensor:
    """``T · log Σ_j w_j softmax(logits_j[:, :size] / T)`` for the teachers' logits ``(N, V_j)`` (``None``: a teacher
    with weight zero on every row, skipped)."""
    acc = None
    for index, member in enumerate(logits):
        if member is not None:
            acc = accumulate(acc, member, log_weights, index, temperature, size)
    if acc is None:
        raise ValueError("A mixture needs at least one teacher's logits.")
    return as_logits(acc, temperature)


def normalised_log_weights(weights) -> Tensor:
    """``log(w / Σ w)`` of positive weights, float64 (exact for one teacher: ``log 1 = 0``)."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.dim() != 1 or len(weights) == 0 or bool((weights <= 0).any()) or not bool(weights.isfinite().all()):
        raise ValueError(f"Teacher weights must be positive and finite, got {weights.tolist()}.")
    return (weights / weights.sum()).log()


def route_log_weights(route: Tensor, teachers: int) -> Tensor:
    """One-hot log-weights ``(N, teachers)`` for the teacher index of each token ``route`` ``(N,)``."""
    log_weights = torch.full((route.shape[0], teachers), float("-inf"), dtype=torch.float64, device=route.device)
    return log_weights.scatter_(1, route.long()[:, None], 0.0)


def merge_sparse(teachers: list[SparseTeacher], log_weights: Tensor | None, vocab_size: int) -> SparseTeacher:
    """The mixture of sparse teachers as one sparse teacher over the real vocabulary ``[0, vocab_size)`` (module
    docstring). ``log_weights``: ``(T,)``, ``(N, T)`` or ``None`` (equal weights). Ids at or past ``vocab_size``
    (padding rows) leave the top-k set and their mass is dropped (the buckets are renormalised by the divergence).
    """
    count = len(teachers)
    rows = teachers[0].ids.shape[0]
    device = teachers[0].ids.device
    if log_weights is None:
        log_weights = torch.full((count,), -math.log(count), dtype=torch.float64)
    log_weights = log_weights.to(device=device, dtype=torch.float64)
    if log_weights.dim() == 1:
        log_weights = log_weights.expand(rows, count)
    width = sum(teacher.ids.shape[1] for teacher in teachers)
    if vocab_size <= width:
        raise ValueError(f"A vocabulary of {vocab_size} tokens is too small to merge top-k sets of {width} ids.")
    ids = torch.cat([teacher.ids.long() for teacher in teachers], dim=-1)  # (N, M)
    valid = ids < vocab_size
    sorted_ids, _ = torch.where(valid, ids, vocab_size).sort(-1)
    first = torch.ones_like(valid)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    unique = first & (sorted_ids < vocab_size)  # the union's slots; the others get fillers
    # Each teacher's value at each slot: its recorded log-probability where the slot is in its top-k, else its
    # tail spread evenly; then its buckets' tail.
    members, tails = [], []
    for teacher in teachers:
        teacher_valid = teacher.ids.long() < vocab_size
        k_real = teacher_valid.sum(-1).to(torch.float64)  # (N,)
        log_tail = teacher.tail_logprob.to(torch.float64)
        even = log_tail - (vocab_size - k_real).log()  # (N,)
        match = (sorted_ids[:, :, None] == teacher.ids.long()[:, None, :]) & teacher_valid[:, None, :]
        recorded = torch.where(match, teacher.logprobs.to(torch.float64)[:, None, :], float("-inf"))
        members.append(torch.where(match.any(-1), recorded.logsumexp(-1), even[:, None]))
        tails.append(log_tail + (torch.full_like(k_real, vocab_size - width).log() - (vocab_size - k_real).log()))
        members[-1] = torch.where(unique, members[-1], even[:, None])  # fillers: not in any top-k set
    member_values = torch.stack(members, dim=-1)  # (N, M, T)
    logprobs = (member_values + log_weights[:, None, :]).logsumexp(-1)
    tail = (torch.stack(tails, dim=-1) + log_weights).logsumexp(-1)
    # Fillers: the smallest ids outside the union, in order, one per free slot (the tail of every teacher).
    candidates = torch.arange(min(vocab_size, 2 * width), device=device)
    taken = (candidates[None, :, None] == torch.where(unique, sorted_ids, -1)[:, None, :]).any(-1)
    free = torch.where(taken, candidates + vocab_size, candidates).sort(-1).values[:, :width]
    filler_rank = (~unique).long().cumsum(-1) - 1
    fillers = free.gather(1, filler_rank.clamp(min=0))
    merged_ids = torch.where(unique, sorted_ids, fillers)
    dtype = teachers[0].logprobs.dtype
    return SparseTeacher(merged_ids, logprobs.to(dtype), tail.to(teachers[0].tail_logprob.dtype))


def route_sparse(teachers: list[SparseTeacher | None], route: Tensor) -> SparseTeacher:
    """Per token, the sparse teacher that ``route`` ``(N,)`` names (teachers of equal top-k; ``None``: a teacher no
    token is routed to). Tail samples are not kept."""
    present = [teacher for teacher in teachers if teacher is not None]
    widths = {teacher.ids.shape[1] for teacher in present}
    if len(widths) != 1:
        raise ValueError(f"Routing between recorded teachers needs one top_k for all, got {sorted(widths)}.")
    first = present[0]
    out = SparseTeacher(first.ids.clone(), first.logprobs.clone(), first.tail_logprob.clone())
    for index, teacher in enumerate(teachers):
        if teacher is None:
            continue
        rows = route == index
        out.ids[rows], out.logprobs[rows], out.tail_logprob[rows] = (
            teacher.ids[rows],
            teacher.logprobs[rows],
            teacher.tail_logprob[rows],
        )
    return out
