"""``distily tokenizer train``: the vocabulary to learn and where it goes."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class TokenizerTrainArguments:
    """A byte-level BPE tokenizer trained on the train split of ``--dataset`` (see docs/tokenizers.md)."""

    vocab_size: int = field(
        default=16384,
        metadata={"help": "Tokens in the new vocabulary, special tokens and the 256 byte symbols included."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder to save the tokenizer in (required)."})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Carry over from this teacher's tokenizer its special tokens (same ids first), chat template, "
            "normaliser, pre-tokenizer and decoder. Unset: GPT-2 byte-level pre-tokenizer, one <|endoftext|> token."
        },
    )
    min_frequency: int = field(default=2, metadata={"help": "A pair is merged only if it occurs this often."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing tokenizer folder at --output_dir."}
    )

    def __post_init__(self):
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size <= 256:
            raise ConfigError(
                f"--vocab_size must be a whole number above 256 (the byte symbols come first), got {self.vocab_size!r}."
                " Try 16384."
            )
        if not self.output_dir or not str(self.output_dir).strip():
            raise ConfigError("--output_dir is required: the folder the tokenizer is saved in.")
        if self.teacher is not None and not str(self.teacher).strip():
            self.teacher = None
        if isinstance(self.min_frequency, bool) or not isinstance(self.min_frequency, int) or self.min_frequency < 1:
            raise ConfigError(f"--min_frequency must be a whole number ≥ 1, got {self.min_frequency!r}.")
