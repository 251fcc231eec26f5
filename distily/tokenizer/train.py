"""A byte-level BPE tokenizer trained on a corpus with HF ``tokenizers``, saved so ``AutoTokenizer`` loads it.

Deterministic: the same documents in the same order give the same ``tokenizer.json`` byte for byte (tested).
Every one of the 256 byte symbols is in the vocabulary, so any text round-trips and llama.cpp can load the
exported GGUF. Given the teacher's tokenizer, the new one keeps the teacher's special tokens first, at the same
ids, its chat template, and its normaliser, pre-tokenizer and decoder: only the merges and the vocabulary are
learned, so the two split text at the same pre-token boundaries (more spans segment identically, which the
hybrid cross-tokenizer loss uses) and a GGUF export names the same llama.cpp pre-tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from ..config import DataArguments
from ..config.tokenizer import TokenizerTrainArguments
from ..errors import ConfigError
from ..io import atomic_path, provenance, write_json_atomic

logger = logging.getLogger(__name__)

TOKENIZER_MANIFEST = "distily_tokenizer.json"
DEFAULT_SPECIAL = "<|endoftext|>"
EMPTY_BPE = {
    "type": "BPE",
    "dropout": None,
    "unk_token": None,
    "continuing_subword_prefix": None,
    "end_of_word_suffix": None,
    "fuse_unk": False,
    "byte_fallback": False,
    "ignore_merges": False,
    "vocab": {},
    "merges": [],
}


def _pipeline(teacher_tokenizer) -> tuple[dict, list]:
    """The new tokenizer's definition before training (the teacher's pipeline with an empty BPE model, or GPT-2's
    byte-level layout) and its special tokens in id order."""
    from tokenizers import AddedToken

    if teacher_tokenizer is None:
        definition = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": EMPTY_BPE,
        }
        return definition, [AddedToken(DEFAULT_SPECIAL, special=True, normalized=False)]
    backend = getattr(teacher_tokenizer, "backend_tokenizer", None)
    definition = json.loads(backend.to_str()) if backend is not None else {}
    text = json.dumps(definition.get("pre_tokenizer"))
    if definition.get("model", {}).get("type") != "BPE" or '"ByteLevel"' not in text:
        raise ConfigError(
            "--teacher: only a byte-level BPE teacher tokenizer (GPT-2, Llama 3, SmolLM, Qwen style) can lend its "
            f"pipeline to the new tokenizer; this one is {definition.get('model', {}).get('type')!r} with "
            f"pre-tokenizer {text[:120]}. Train without --teacher."
        )
    definition.update(model=dict(EMPTY_BPE), added_tokens=[], truncation=None, padding=None)
    special = [
        AddedToken(token.content, special=True, normalized=False, lstrip=token.lstrip, rstrip=token.rstrip)
        for _, token in sorted(teacher_tokenizer.added_tokens_decoder.items())
    ]
    return definition, special


def train_tokenizer_on_texts(
    texts: Iterable[str],
    vocab_size: int,
    teacher_tokenizer=None,
    min_frequency: int = 2,
    show_progress: bool = False,
    length: int | None = None,
):
    """A ``PreTrainedTokenizerFast`` with ``vocab_size`` tokens learned from ``texts`` (see the module docstring)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    definition, special = _pipeline(teacher_tokenizer)
    if vocab_size < 256 + len(special):
        raise ConfigError(
            f"--vocab_size {vocab_size} leaves no room: the 256 byte symbols and {len(special)} special tokens come "
            "first. Raise --vocab_size."
        )
    tokenizer = Tokenizer.from_str(json.dumps(definition))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    if teacher_tokenizer is None:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token=DEFAULT_SPECIAL, eos_token=DEFAULT_SPECIAL, pad_token=DEFAULT_SPECIAL
        )
        return fast
    _check_post_processor(tokenizer, teacher_tokenizer)
    names = {
        name: getattr(teacher_tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{k: v for k, v in names.items() if v is not None})
    fast.chat_template = getattr(teacher_tokenizer, "chat_template", None)
    fast.clean_up_tokenization_spaces = getattr(teacher_tokenizer, "clean_up_tokenization_spaces", False)
    return fast


def _check_post_processor(tokenizer, teacher_tokenizer) -> None:
    """The teacher's post-processor names special tokens by id: they must have kept those ids."""
    processor = json.loads(tokenizer.to_str()).get("post_processor") or {}
    for name, spec in (processor.get("special_tokens") or {}).items():
        for token_id in spec.get("ids", []):
            if tokenizer.token_to_id(name) != token_id:
                raise ConfigError(
                    f"The teacher's post-processor adds {name!r} as id {token_id}, but it is id "
                    f"{tokenizer.token_to_id(name)} in the new tokenizer (the teacher's special tokens are not its "
                    "first ids). Train without --teacher."
                )


def check_tokenizer_output(args: TokenizerTrainArguments) -> Path:
    """``args.output_dir``, refused when it already holds something and --overwrite_output_dir is not set."""
    output = Path(args.output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite_output_dir:
        raise ConfigError(
            f"--output_dir {str(output)!r} already exists and is not empty. Pick another folder or pass "
            "--overwrite_output_dir true to replace it."
        )
    return output


def train_tokenizer(args: TokenizerTrainArguments, data_args: DataArguments, teacher_tokenizer=None) -> Path:
    """Train on the train split of ``data_args.dataset`` (the eval split is never read) and save the tokenizer
    with a manifest (``distily_tokenizer.json``) into ``args.output_dir``, atomically. Returns the folder.

    ``teacher_tokenizer`` (or ``args.teacher``, loaded here) lends its special tokens, chat template and pipeline.
    """
    from ..data import load_documents
    from ..version import __version__

    output = check_tokenizer_output(args)  # before any work
    if teacher_tokenizer is None and args.teacher:
        from ..teacher.loading import load_tokenizer

        teacher_tokenizer = load_tokenizer(args.teacher)
    documents = load_documents(data_args)["train"]
    text_field = "text" if "text" in documents.column_names else data_args.dataset_text_field
    column = documents[text_field]
    fast = train_tokenizer_on_texts(
        (text for text in column),
        args.vocab_size,
        teacher_tokenizer=teacher_tokenizer,
        min_frequency=args.min_frequency,
        show_progress=True,
        length=len(column),
    )
    if len(fast) != args.vocab_size:
        logger.warning(
            "The corpus yielded %d tokens, fewer than --vocab_size %d (no more pairs occur %d times).",
            len(fast), args.vocab_size, args.min_frequency,
        )  # fmt: skip
    manifest = {
        "producer": "distily tokenizer train",
        "distily_version": __version__,
        "vocab_size": len(fast),
        "requested_vocab_size": args.vocab_size,
        "min_frequency": args.min_frequency,
        "dataset": data_args.dataset,
        "split": "train",
        "documents": len(column),
        "bytes": sum(len(text.encode("utf-8")) for text in column),
        "teacher": args.teacher,
        "special_tokens": [str(token) for token in fast.all_special_tokens],
        "provenance": provenance(),
    }
    with atomic_path(output) as tmp:
        fast.save_pretrained(tmp)
        write_json_atomic(tmp / TOKENIZER_MANIFEST, manifest)
    logger.info("Tokenizer with %d tokens saved to %s.", len(fast), output)
    return output
