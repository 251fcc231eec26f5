"""Routing examples to teachers: packing that keeps, for every token, the index of the teacher its document names.

With several teachers and ``--teacher_column COL``, each document names its teacher in column ``COL`` (a
``--teacher`` value as given). Documents are packed into ``seq_len`` blocks exactly as
:func:`distily.data.packing.pack_dataset` packs them (the same token stream, the same blocks), with a second column
``teacher_ids`` of the same shape: the teacher index of each token (the separator after a document belongs to that
document). A block may span documents of different teachers; each token's target is its own document's teacher.
A name that is none of the teachers is a :class:`~distily.errors.DataError` while packing, before any run writes.
"""

from __future__ import annotations

from datasets import Dataset

from ..errors import DataError
from .hashing import PACKING_VERSION, stable_hash, tokenizer_fingerprint
from .mapping import INT8_SEQUENCE, INT32_SEQUENCE, map_to_blocks

ROUTE_COLUMN = "teacher_ids"


def _pack_routed(batch: dict, tokenizer, seq_len: int, separator: int | None, column: str, names: list[str]) -> dict:
    stream: list[int] = []
    route: list[int] = []
    index = {name: position for position, name in enumerate(names)}
    encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    for ids, name in zip(encoded, batch[column], strict=True):
        if name not in index:
            raise DataError(
                f"A document's --teacher_column {column!r} names teacher {name!r}, which is none of the teachers: "
                f"{', '.join(names)}. Use one of those names (as given to --teacher) in that column."
            )
        length = len(ids) + (separator is not None)
        stream.extend(ids)
        if separator is not None:
            stream.append(separator)
        route.extend([index[name]] * length)
    usable = len(stream) - len(stream) % seq_len
    return {
        "input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)],
        ROUTE_COLUMN: [route[i : i + seq_len] for i in range(0, usable, seq_len)],
    }


def pack_routed_dataset(
    documents: Dataset, tokenizer, seq_len: int, column: str, names: list[str], num_proc=None, desc: str = "Packing"
) -> Dataset:
    """``documents`` (``text`` and ``column``) as ``seq_len``-token blocks with each token's teacher index."""
    if column not in documents.column_names:
        raise DataError(
            f"--teacher_column {column!r} is not a column of the dataset; its columns are {documents.column_names}."
        )
    separator = tokenizer.eos_token_id
    fingerprint = stable_hash(
        documents._fingerprint, tokenizer_fingerprint(tokenizer), seq_len, PACKING_VERSION, "routed", column, names
    )
    return map_to_blocks(
        documents, _pack_routed, {"input_ids": INT32_SEQUENCE, ROUTE_COLUMN: INT8_SEQUENCE}, fingerprint, desc,
        num_proc, tokenizer=tokenizer, seq_len=seq_len, separator=separator, column=column, names=names,
    )  # fmt: skip
