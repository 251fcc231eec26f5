"""Divergences between next-token distributions over two different vocabularies, per aligned position.

Both take the student's logits ``(N, V_s)`` and the teacher's ``(N, V_t)`` at the N aligned positions, already
divided by the temperature, and return ``(N,)``; masking, the T² factor and the normalisation are done once by
the caller (:class:`distily.cross_tokenizer.CrossTokenizerObjective`), as for :mod:`distily.losses`.

* **ULD** (Boizard et al. 2024, arXiv 2402.12030): the 1-Wasserstein distance between the two distributions
  with their tokens ranked by probability, ``Σ_r |p_(r) − q_(r)|`` over the ranks ``r`` of both sorted probability
  vectors, the shorter one padded with zeros. It needs no correspondence between the vocabularies.
* **Exact** (the hybrid's other half, after TRL's GOLD): where both tokenizers segment the next span identically,
  the registered ``--loss`` (e.g. forward KL) between the two distributions over the tokens both vocabularies
  share, plus one outcome "any other token" holding the rest of each side's probability. When every token is
  shared this is the plain divergence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config.training import CROSS_TOKENIZER_LOSS_CHOICES as CROSS_TOKENIZER_LOSSES  # noqa: F401 (re-exported)
from ..losses import LossFn

# Measured on python-stdlib (benchmarks/cross_tokenizer.py, RESULTS.md "Cross-tokenizer distillation").
DEFAULT_CROSS_TOKENIZER_LOSS = "hybrid"
# log(0) stand-in for an empty "any other token" outcome (exp(-1e4) is exactly 0 in float32 and float64).
LOG_ZERO = -1e4


def uld(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Σ_r |p_(r) − q_(r)|: the sorted probability vectors' L1 distance (ULD's Wasserstein distance)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    p = teacher_logits.to(dtype).softmax(-1).sort(-1, descending=True).values
    q = student_logits.to(dtype).softmax(-1).sort(-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def shared_log_probs(logits: Tensor, shared: Tensor, other: Tensor) -> Tensor:
    """Log-probabilities ``(N, len(shared) + 1)`` over the ``shared`` token ids and one outcome for all ``other``
    ids (the complement of ``shared`` in this vocabulary)."""
    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    if other.numel():
        rest = log_probs[:, other].logsumexp(-1, keepdim=True)
    else:
        rest = log_probs.new_full((len(logits), 1), LOG_ZERO)
    return torch.cat([log_probs[:, shared], rest.clamp(min=LOG_ZERO)], dim=-1)


def exact_divergence(
    student_logits: Tensor, teacher_logits: Tensor, vocab: SharedVocabulary, loss_fn: LossFn
) -> Tensor:
    """``loss_fn`` between the student's and the teacher's distributions over the shared tokens plus "other"."""
    student = shared_log_probs(student_logits, vocab.student_ids, vocab.student_other)
    teacher = shared_log_probs(teacher_logits, vocab.teacher_ids, vocab.teacher_other)
    return loss_fn(student, teacher)


class SharedVocabulary:
    """The tokens both vocabularies hold (by string), as index tensors on one device."""

    def __init__(self, student_ids: Tensor, teacher_ids: Tensor, student_size: int, teacher_size: int):
        self.student_ids, self.teacher_ids = student_ids.long(), teacher_ids.long()
        self.student_other = _complement(self.student_ids, student_size)
        self.teacher_other = _complement(self.teacher_ids, teacher_size)
        # The teacher id of each student id (-1 where the string is not in the teacher's vocabulary).
        self.to_teacher = torch.full((student_size,), -1, dtype=torch.long)
        self.to_teacher[self.student_ids] = self.teacher_ids

    def to(self, device) -> SharedVocabulary:
        for name in ("student_ids", "teacher_ids", "student_other", "teacher_other", "to_teacher"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def _complement(ids: Tensor, size: int) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[ids] = False
    return keep.nonzero().flatten()
