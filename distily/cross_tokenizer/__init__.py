"""Cross-tokenizer distillation: a student whose tokenizer is not the teacher's.

Each block is tokenised by both tokenizers and their positions are aligned by character offsets
(:mod:`.alignment`, :mod:`.data`); at the aligned positions the student's next-token distribution is pulled
toward the teacher's with ULD, or the hybrid of ULD and the exact divergence on identically segmented spans
(:mod:`.losses`, :mod:`.objective`). :func:`resolve_cross_tokenizer_loss` decides whether a run needs it.
See docs/tokenizers.md.
"""

from __future__ import annotations

from ..data import tokenizer_fingerprint
from ..errors import ConfigError
from .alignment import Alignment, align, boundaries
from .data import PAIRED_COLUMNS, PairedBlockCollator, pack_paired_dataset, prepare_paired_datasets
from .losses import (
    CROSS_TOKENIZER_LOSSES,
    DEFAULT_CROSS_TOKENIZER_LOSS,
    SharedVocabulary,
    exact_divergence,
    shared_log_probs,
    uld,
)
from .objective import CrossTokenizerObjective, CrossTokenizerSums


def same_tokenizer(tokenizer, other) -> bool:
    """Whether two tokenizers give the same ids for every text (:func:`distily.data.tokenizer_fingerprint`)."""
    return tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(other)


def resolve_cross_tokenizer_loss(requested: str | None, student_tokenizer, teacher_tokenizer, own_tokenizer: bool):
    """The cross-tokenizer loss a run uses: ``requested`` (``--cross_tokenizer_loss``) when given; else None when
    the student's tokenizer is the teacher's, the measured default for a student built with ``--student_tokenizer``
    (``own_tokenizer``), and an error for a pretrained student whose tokenizer differs."""
    if requested is not None or student_tokenizer is None or same_tokenizer(student_tokenizer, teacher_tokenizer):
        return requested
    if own_tokenizer:
        return DEFAULT_CROSS_TOKENIZER_LOSS
    raise ConfigError(
        f"The student's tokenizer ({len(student_tokenizer)} tokens) is not the teacher's ({len(teacher_tokenizer)} "
        "tokens), so their next-token distributions cannot be compared token by token. Pass --cross_tokenizer_loss "
        f"{'|'.join(CROSS_TOKENIZER_LOSSES)} to distil across tokenizers (text aligned by character offsets; see "
        "docs/tokenizers.md), or pick a student that shares the teacher's tokenizer."
    )


__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "DEFAULT_CROSS_TOKENIZER_LOSS",
    "PAIRED_COLUMNS",
    "Alignment",
    "CrossTokenizerObjective",
    "CrossTokenizerSums",
    "PairedBlockCollator",
    "SharedVocabulary",
    "align",
    "boundaries",
    "exact_divergence",
    "pack_paired_dataset",
    "prepare_paired_datasets",
    "resolve_cross_tokenizer_loss",
    "same_tokenizer",
    "shared_log_probs",
    "uld",
]
