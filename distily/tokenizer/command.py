"""``distily tokenizer train --dataset D --vocab_size N --output_dir DIR [--teacher T]``."""

from __future__ import annotations

from ..config import ConfigError, DataArguments
from ..config.tokenizer import TokenizerTrainArguments

ACTIONS = ("train",)


def tokenizer_command(argv: list[str]) -> int:
    """Parse the flags of ``distily tokenizer train`` and train (:func:`distily.tokenizer.train_tokenizer`)."""
    from ..cli import parse_with_yaml
    from .train import TOKENIZER_MANIFEST, train_tokenizer

    usage = "distily tokenizer train --dataset D --vocab_size N --output_dir DIR [--teacher T]"
    if not argv or argv[0] not in ACTIONS:
        if argv[:1] in (["-h"], ["--help"]):
            print(f"usage: {usage}")
            return 0
        raise ConfigError(f"distily tokenizer needs an action, one of {', '.join(ACTIONS)}. Usage: {usage}")
    data_args, args = parse_with_yaml(
        argv[1:], classes=(DataArguments, TokenizerTrainArguments), prog="distily tokenizer train"
    )
    output = train_tokenizer(args, data_args)
    print(f"Tokenizer saved to {output} ({TOKENIZER_MANIFEST} says how it was made). Use it with "
          f"--student_tokenizer {output}.", flush=True)  # fmt: skip
    return 0
