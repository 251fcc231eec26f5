"""Real-vocabulary alignment: a teacher and a student that share one tokenizer but pad their embeddings differently.

Models of one family often share a tokenizer while their embedding matrices have different row counts (Qwen2.5:
151,936 rows in some sizes, 152,064 in others). The rows past the tokenizer's last id are never produced by the
tokenizer, so both distributions can be compared exactly on the *real* vocabulary ``[0, size)``: every logit is
cut to its first ``size`` columns before any softmax, which gives the unused rows probability zero on both sides
(the softmax over the real columns is the distribution conditioned on a real token).

The cut happens in one place, :class:`RealVocabObjective` (the per-token objective of every path: live head per
chunk, live logits, recorded top-k), so the chunked and full-logit paths stay one path each. A recorded teacher's
top-k ids past ``size`` are moved out of the top-k set and their mass dropped
(:func:`distily.mixture.merge_sparse` with ``vocab_size``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from torch import Tensor

from .chunked import SparseTeacherSignal, TeacherSignal, TokenObjective
from .errors import ConfigError
from .mixture import merge_sparse
from .sparse import SparseTeacher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabAlignment:
    """Student and teacher(s) compared on the token ids ``[0, size)``; ``rows`` are each model's embedding rows."""

    size: int
    student_rows: int
    teacher_rows: tuple[int, ...]

    @property
    def dropped(self) -> dict[str, int]:
        """Padding rows left out, per side (``student``, ``teacher``, ``teacher 2``, ...)."""
        dropped = {"student": self.student_rows - self.size}
        for index, rows in enumerate(self.teacher_rows):
            dropped["teacher" if index == 0 else f"teacher {index + 1}"] = rows - self.size
        return dropped

    def objective(self, objective: TokenObjective) -> RealVocabObjective:
        """``objective`` computed on the real vocabulary (its teacher signal cut to it as well)."""
        values = {item.name: getattr(objective, item.name) for item in dataclasses.fields(objective)}
        values["teacher"] = real_vocab_signal(objective.teacher, self.size)
        return RealVocabObjective(**values, vocab_size=self.size)


def vocab_alignment(student_rows: int | None, teacher_rows, real_size: int | None) -> VocabAlignment | None:
    """The alignment of a student with ``student_rows`` embedding rows and teachers with ``teacher_rows`` (one
    count or a sequence), all sharing a tokenizer of ``real_size`` tokens; ``None`` when every count is the same
    (nothing to align). Raises :class:`ConfigError` when the counts differ and the tokenizer does not fit in every
    model (then the vocabularies really differ)."""
    rows = tuple(teacher_rows) if isinstance(teacher_rows, (list, tuple)) else (teacher_rows,)
    if student_rows is None or any(count is None for count in rows) or len({student_rows, *rows}) == 1:
        return None
    smallest = min(student_rows, *rows)
    if real_size is None or real_size > smallest:
        known = "unknown" if real_size is None else f"{real_size} tokens"
        teachers = ", ".join(map(str, rows))
        raise ConfigError(
            f"The student's vocabulary ({student_rows} tokens) differs from the teacher's ({teachers}) "
            f"and no shared tokenizer ({known}) fits in {smallest} rows, so the difference is not padding. "
            "Logit distillation compares distributions over the same tokens: build the student from the teacher "
            "(distily.build_student) or pick a student that shares the teacher's tokenizer, or distil across "
            "tokenizers with --cross_tokenizer_loss uld|hybrid (docs/tokenizers.md)."
        )
    alignment = VocabAlignment(size=real_size, student_rows=student_rows, teacher_rows=rows)
    logger.info(
        "Embedding rows differ only by padding: comparing distributions on the tokenizer's %d real tokens "
        "(padding rows dropped: %s).",
        real_size,
        ", ".join(f"{side} {count}" for side, count in alignment.dropped.items()),
    )
    return alignment


class RealVocabSignal(TeacherSignal):
    """A dense teacher signal cut to its first ``size`` columns."""

    def __init__(self, signal: TeacherSignal, size: int):
        self.signal, self.size = signal, size

    def logits(self, rows: slice) -> Tensor:
        return self.signal.logits(rows)[..., : self.size]


class RealVocabSparseSignal(SparseTeacherSignal):
    """A sparse (top-k) teacher signal whose ids past ``size`` are dropped (see
    :func:`distily.mixture.merge_sparse`)."""

    def __init__(self, signal: SparseTeacherSignal, size: int):
        self.signal, self.size = signal, size

    def top_k(self, rows: slice) -> SparseTeacher:
        teacher = self.signal.top_k(rows)
        if bool((teacher.ids < self.size).all()):
            return teacher  # the common case: the teacher's top-k never names a padding row
        return merge_sparse([teacher], None, self.size)

    def teacher_nll(self, rows: slice) -> Tensor:
        return self.signal.teacher_nll(rows)


def real_vocab_signal(signal: TeacherSignal | None, size: int) -> TeacherSignal | None:
    """``signal`` cut to the real vocabulary ``[0, size)``."""
    if signal is None:
        return None
    if isinstance(signal, SparseTeacherSignal):
        return RealVocabSparseSignal(signal, size)
    return RealVocabSignal(signal, size)


@dataclass
class RealVocabObjective(TokenObjective):
    """:class:`~distily.chunked.TokenObjective` on the student's first ``vocab_size`` logits (the real vocabulary).

    The gradient of the student's padding columns is zero: they take no part in the objective.
    """

    vocab_size: int = 0

    def __call__(self, student_logits: Tensor, rows: slice):
        return super().__call__(student_logits[..., : self.vocab_size], rows)
