"""Tokenisation and packing into fixed-length blocks, and the collator that batches them.

Tokenised blocks are cached by ``datasets``: the fingerprint of each step is derived from its inputs (the
source documents, the tokenizer's full definition, ``seq_len``), so a second run with the same inputs reads
the cached Arrow file instead of tokenising again or writing a second copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from datasets import Dataset

from ..config import DataArguments
from ..errors import DataError
from .hashing import PACKING_VERSION, stable_hash, tokenizer_fingerprint
from .mapping import INT32_SEQUENCE, map_to_blocks
from .routing import ROUTE_COLUMN, pack_routed_dataset
from .sources import load_documents
from .synth_format import REQUEST_COLUMN, pack_synth_dataset

logger = logging.getLogger(__name__)

# Values of the block_split column (prepare_datasets(block_index=True)).
BLOCK_SPLITS = {"train": 0, "eval": 1}


def _pack(batch: dict, tokenizer, seq_len: int, separator: int | None) -> dict:
    """Tokenise documents, join them with the separator (EOS) and cut into ``seq_len`` blocks.

    The remainder shorter than a block at the end of each batch of documents is dropped.
    """
    stream: list[int] = []
    for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if separator is not None:
            stream.append(separator)
    usable = len(stream) - len(stream) % seq_len
    return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}


def pack_dataset(
    documents: Dataset,
    tokenizer,
    seq_len: int,
    num_proc: int | None = None,
    desc: str = "Tokenising and packing",
) -> Dataset:
    """``documents`` (a ``text`` column) as ``seq_len``-token blocks in an ``input_ids`` column (int32)."""
    separator = tokenizer.eos_token_id
    fingerprint = stable_hash(documents._fingerprint, tokenizer_fingerprint(tokenizer), seq_len, PACKING_VERSION)
    return map_to_blocks(
        documents, _pack, {"input_ids": INT32_SEQUENCE}, fingerprint, desc, num_proc,
        tokenizer=tokenizer, seq_len=seq_len, separator=separator,
    )  # fmt: skip


@dataclass
class PreparedData:
    """Packed training and evaluation blocks, ready for the Trainer."""

    train: Dataset
    eval: Dataset
    train_documents: int
    eval_documents: int
    # datasets fingerprints of the packed splits before any block selection (a recorded teacher checks them).
    source_fingerprints: dict[str, str] | None = None

    @property
    def train_tokens(self) -> int:
        return len(self.train) * len(self.train[0]["input_ids"]) if len(self.train) else 0


def prepare_datasets(
    args: DataArguments, tokenizer, seq_len: int, seed: int = 42, block_index: bool = False, routing=None
) -> PreparedData:
    """Load, split, tokenise and pack; errors name the problem (empty data, text too short, ...).

    ``block_index=True`` adds a ``block_index`` column (the block's row in its packed split, before any
    selection) and a ``block_split`` column (0 train, 1 eval): they name the rows of a recorded teacher.
    ``routing=(column, teacher names)`` adds each token's teacher index (:mod:`distily.data.routing`).
    """
    documents = load_documents(args)
    packed = {}
    # Prompt/completion samples (a synth folder, default text field): chat-rendered, prompt tokens masked.
    structured = REQUEST_COLUMN in documents["train"].column_names and args.dataset_text_field == "text"
    for split in ("train", "eval"):
        if structured:
            blocks = pack_synth_dataset(
                documents[split], tokenizer, seq_len, args.prompt_loss, args.preprocessing_num_workers,
                desc=f"Packing {split} samples",
            )  # fmt: skip
        elif routing is not None:
            column, names = routing
            blocks = pack_routed_dataset(
                documents[split], tokenizer, seq_len, column, names, args.preprocessing_num_workers, f"Packing {split}"
            )
        else:
            blocks = pack_dataset(
                documents[split], tokenizer, seq_len, args.preprocessing_num_workers, desc=f"Packing {split} blocks"
            )
        if len(blocks) == 0:
            raise DataError(
                f"The {split} split of {args.dataset!r} holds fewer than seq_len={seq_len} tokens, so no block "
                "could be packed. Use more text or a smaller --seq_len."
            )
        if block_index:
            blocks = blocks.add_column("block_index", list(range(len(blocks))))
            blocks = blocks.add_column("block_split", [BLOCK_SPLITS[split]] * len(blocks))
        packed[split] = blocks
    source_fingerprints = {split: blocks._fingerprint for split, blocks in packed.items()}
    train, evaluation = packed["train"], packed["eval"]
    if args.max_train_blocks is not None and len(train) > args.max_train_blocks:
        train = train.shuffle(seed=seed).select(range(args.max_train_blocks))
    if args.max_eval_blocks is not None and len(evaluation) > args.max_eval_blocks:
        # A fixed seed: the same eval blocks for every run, so perplexities are comparable across runs.
        evaluation = evaluation.shuffle(seed=0).select(range(args.max_eval_blocks))
    return PreparedData(train, evaluation, len(documents["train"]), len(documents["eval"]), source_fingerprints)


class BlockCollator:
    """Batches token blocks: pads to the longest, ``labels`` = ids with padding as -100.

    A ``labels`` column in the dataset (e.g. prompts masked with -100 in synthetic data) is kept as given;
    ``block_index``/``block_split`` columns (rows of a recorded teacher) are passed through as tensors.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            given = feature.get("labels")
            labels[row, : len(ids)] = ids if given is None else torch.as_tensor(given, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for name in BLOCK_COLUMNS:
            if name in features[0]:
                batch[name] = torch.tensor([f[name] for f in features], dtype=torch.long)
        if ROUTE_COLUMN in features[0]:  # each token's teacher (distily.data.routing); padding: teacher 0
            batch[ROUTE_COLUMN] = torch.zeros((len(features), length), dtype=torch.long)
            for row, feature in enumerate(features):
                batch[ROUTE_COLUMN][row, : len(feature[ROUTE_COLUMN])] = torch.as_tensor(feature[ROUTE_COLUMN])
        return batch


BLOCK_COLUMNS = ("block_index", "block_split")
