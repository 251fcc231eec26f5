"""Offset alignment of two tokenisations of the same text.

A tokenisation is given by the span ``(start, end)`` of each token in the text (in bytes:
:func:`distily.cross_tokenizer.data.byte_spans`; characters work the same). Position ``i`` of
the student and position ``j`` of the teacher are *aligned* when both tokens end at the same offset and that
offset is a real boundary on both sides: at such a position both models have read exactly the same text and
predict the same thing, the text that follows. A token is not a boundary when the next token overlaps it
(character offsets of byte-level tokens that split a multi-byte character all report the character's span).

An aligned pair is *exact* when the next token covers the same span on both sides as well: the two tokenizers
segment that span identically, so the two next-token distributions name the same token (the hybrid loss uses
the exact per-token divergence there, :mod:`distily.cross_tokenizer.losses`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def boundaries(spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each token ends at a real boundary: the next token starts at or after its end and ends after it."""
    return [
        index == len(spans) - 1 or (spans[index + 1][0] >= spans[index][1] and spans[index + 1][1] > spans[index][1])
        for index in range(len(spans))
    ]


@dataclass(frozen=True)
class Alignment:
    """The aligned positions of one block: ``student[k]`` and ``teacher[k]`` predict the same text; ``exact[k]``
    when their next tokens cover the same span."""

    student: list[int]
    teacher: list[int]
    exact: list[bool]


def align(student_spans: Sequence[tuple[int, int]], teacher_spans: Sequence[tuple[int, int]]) -> Alignment:
    """The aligned next-token positions of two tokenisations (see the module docstring).

    Only positions with a next token on both sides count (the last token of either side predicts nothing
    here). Linear in the two lengths: both span sequences are walked once, like a merge.
    """
    student_ok, teacher_ok = boundaries(student_spans), boundaries(teacher_spans)
    student, teacher, exact = [], [], []
    i = j = 0
    while i < len(student_spans) - 1 and j < len(teacher_spans) - 1:
        student_end, teacher_end = student_spans[i][1], teacher_spans[j][1]
        if student_end < teacher_end or not student_ok[i]:
            i += 1
        elif student_end > teacher_end or not teacher_ok[j]:
            j += 1
        else:
            student.append(i)
            teacher.append(j)
            exact.append(
                tuple(student_spans[i + 1]) == tuple(teacher_spans[j + 1]) and student_ok[i + 1] and teacher_ok[j + 1]
            )
            i += 1
            j += 1
    return Alignment(student, teacher, exact)
