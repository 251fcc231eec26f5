"""The cross-tokenizer distillation term of one batch, over the aligned positions of its blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..losses import LossFn
from .losses import CROSS_TOKENIZER_LOSSES, SharedVocabulary, exact_divergence, uld


@dataclass
class CrossTokenizerSums:
    """One batch's distillation term summed over its aligned positions, and what was aligned."""

    kd: Tensor  # T² · Σ D over the aligned positions (differentiable)
    kd_rows: Tensor  # (B,) the same per block, detached
    aligned: int  # aligned positions used
    exact: int  # of those, scored by the exact divergence (hybrid)
    unaligned_blocks: int  # blocks with no aligned position (skipped)


class CrossTokenizerObjective:
    """``T² · Σ_aligned D(student/T, teacher/T)``, D being ULD everywhere (``uld``) or, with ``hybrid``, the exact
    divergence ``loss_fn`` over the shared vocabulary where both tokenizers segment the next span identically (and
    name the same token) and ULD elsewhere (:mod:`distily.cross_tokenizer.losses`)."""

    def __init__(self, name: str, vocab: SharedVocabulary, loss_fn: LossFn | None = None, temperature: float = 1.0):
        if name not in CROSS_TOKENIZER_LOSSES:
            raise ConfigError(f"--cross_tokenizer_loss {name!r} is not one of {', '.join(CROSS_TOKENIZER_LOSSES)}.")
        if name == "hybrid" and loss_fn is None:
            raise ValueError("The hybrid cross-tokenizer loss needs loss_fn, the divergence used on exact spans.")
        self.name, self.vocab, self.loss_fn, self.temperature = name, vocab, loss_fn, temperature

    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor, inputs: dict[str, Tensor], mask: Tensor
    ) -> CrossTokenizerSums:
        """``student_logits`` (B, L, V_s) and ``teacher_logits`` (B, L_t, V_t) of the batch ``inputs`` (a
        :class:`distily.cross_tokenizer.PairedBlockCollator` batch); ``mask`` (B, L-1) the student's real
        next-token positions."""
        device = student_logits.device
        s_pos, t_pos = inputs["aligned_student"].to(device), inputs["aligned_teacher"].to(device)
        rows = torch.arange(s_pos.shape[0], device=device)[:, None].expand_as(s_pos)
        valid = (s_pos >= 0) & (t_pos >= 0)
        valid &= mask.to(device)[rows, s_pos.clamp(min=0).clamp(max=mask.shape[1] - 1)]
        b, s, t = rows[valid], s_pos[valid], t_pos[valid]
        student = student_logits[b, s] / self.temperature
        teacher = teacher_logits.to(device)[b, t] / self.temperature
        exact = torch.zeros(len(b), dtype=torch.bool, device=device)
        if self.name == "hybrid":
            vocab = self.vocab.to(device)
            student_next = inputs["input_ids"].to(device)[b, s + 1]
            teacher_next = inputs["teacher_input_ids"].to(device)[b, t + 1]
            exact = (inputs["aligned_exact"].to(device)[valid] == 1) & (vocab.to_teacher[student_next] == teacher_next)
        # Each aligned position is scored once: the exact divergence where it applies, ULD on the others.
        dtype = torch.promote_types(student.dtype, torch.float32)
        per_token = torch.zeros(len(b), dtype=dtype, device=device)
        if (~exact).any():
            per_token = per_token.masked_scatter(~exact, uld(student[~exact], teacher[~exact]).to(dtype))
        if exact.any():
            values = exact_divergence(student[exact], teacher[exact], self.vocab.to(device), self.loss_fn)
            per_token = per_token.masked_scatter(exact, values.to(dtype))
        per_token = per_token * self.temperature**2
        kd_rows = torch.zeros(s_pos.shape[0], device=device).index_add_(0, b, per_token.detach().float())
        return CrossTokenizerSums(
            kd=per_token.sum(),
            kd_rows=kd_rows,
            aligned=int(valid.sum()),
            exact=int(exact.sum()),
            unaligned_blocks=int((valid.sum(-1) == 0).sum()),
        )
