"""Students with their own tokenizer: train a byte-level BPE vocabulary on a corpus (``distily tokenizer train``).

* :mod:`.train` -- the deterministic BPE trainer, carrying the teacher's special tokens and chat template;
* :mod:`.metrics` -- bits per byte and tokens per byte, the measures that compare across tokenizers;
* :mod:`.command` -- the ``distily tokenizer`` subcommand.

Distilling a teacher into such a student is :mod:`distily.cross_tokenizer`; its embeddings start from the
teacher's rows of shared token strings (:func:`distily.students.build_student_with_tokenizer`).
"""

from __future__ import annotations

from .metrics import bits_per_byte, tokens_per_byte
from .train import TOKENIZER_MANIFEST, train_tokenizer, train_tokenizer_on_texts

__all__ = ["TOKENIZER_MANIFEST", "bits_per_byte", "tokens_per_byte", "train_tokenizer", "train_tokenizer_on_texts"]
