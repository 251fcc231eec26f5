"""What a run needs to know before it builds anything: the student's tokenizer and whether to distil across."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, DistillationConfig, StudentArguments

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_student_tokenizer(student_args: StudentArguments, trust_remote_code: bool = False):
    """``--student_tokenizer DIR``, or the tokenizer saved in a pretrained ``--student`` folder; None: the
    student uses the teacher's."""
    from transformers import AutoTokenizer

    if student_args.student_tokenizer:
        path = Path(student_args.student_tokenizer).expanduser()
        if not path.is_dir() or not any((path / name).exists() for name in TOKENIZER_FILES):
            raise ConfigError(
                f"--student_tokenizer {str(path)!r} is not a tokenizer folder (no {' or '.join(TOKENIZER_FILES[:2])}). "
                "Make one with `distily tokenizer train --dataset D --vocab_size N --output_dir DIR`."
            )
    elif student_args.student and any((Path(student_args.student).expanduser() / n).exists() for n in TOKENIZER_FILES):
        path = Path(student_args.student).expanduser()
    else:
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"The student's tokenizer at {str(path)!r} has no EOS token; packing joins documents with it. Give it "
            "one (distily tokenizer train does)."
        )
    return tokenizer


def configure_cross_tokenizer(
    config: DistillationConfig, student_args: StudentArguments, student_tokenizer, teacher_tokenizer
) -> str | None:
    """Resolve ``config.cross_tokenizer_loss`` for this run (:func:`resolve_cross_tokenizer_loss`) before
    anything is built or written; a resolved loss also keeps the batches' alignment columns. Returns it."""
    from . import resolve_cross_tokenizer_loss

    loss = resolve_cross_tokenizer_loss(
        config.cross_tokenizer_loss,
        student_tokenizer,
        teacher_tokenizer,
        own_tokenizer=student_args.student_tokenizer is not None,
    )
    if loss is not None and loss != config.cross_tokenizer_loss:
        config.cross_tokenizer_loss = loss
        config.check_cross_tokenizer()  # the same rules as a --cross_tokenizer_loss given on the command line
    return loss


def check_no_teacher_cache(config: DistillationConfig, student_args: StudentArguments) -> None:
    """A student with its own tokenizer needs a live teacher (a recorded one has no character offsets)."""
    if config.teacher_cache and student_args.student_tokenizer:
        raise ConfigError(
            "--student_tokenizer needs a live teacher: a --teacher_cache holds the teacher's top-k over its own "
            "tokenisation of each block, without the character offsets that align it with the student's tokens. "
            "Use --teacher instead of --teacher_cache."
        )
