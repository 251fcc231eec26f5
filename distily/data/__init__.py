"""The data layer: where documents come from, how they are split, tokenised and packed into blocks.

* :mod:`.hashing` -- content hashes, the deterministic train/eval hold-out, tokenizer fingerprints;
* :mod:`.sources` -- python-stdlib, folders, data files, saved/Hub datasets; train/eval documents;
* :mod:`.packing` -- tokenising, packing into ``seq_len`` blocks, the collator;
* :mod:`.synth_format` -- the ``distily synth`` folder format and its prompt/completion packing.
"""

from __future__ import annotations

from ..errors import DataError
from .hashing import PACKING_VERSION, eval_bucket, is_eval_key, stable_hash, tokenizer_fingerprint
from .packing import (  # noqa: F401  (_pack: tests call the packing function itself)
    BLOCK_COLUMNS,
    BLOCK_SPLITS,
    BlockCollator,
    PreparedData,
    _pack,
    pack_dataset,
    prepare_datasets,
)
from .sources import (
    DATA_FILE_BUILDERS,
    EVAL_SPLIT_NAMES,
    PYTHON_STDLIB,
    SKIPPED_DIRS,
    files_dataset,
    list_text_files,
    load_documents,
    python_stdlib_root,
)

__all__ = [
    "BLOCK_COLUMNS",
    "BLOCK_SPLITS",
    "DATA_FILE_BUILDERS",
    "EVAL_SPLIT_NAMES",
    "PACKING_VERSION",
    "PYTHON_STDLIB",
    "SKIPPED_DIRS",
    "BlockCollator",
    "DataError",
    "PreparedData",
    "eval_bucket",
    "files_dataset",
    "is_eval_key",
    "list_text_files",
    "load_documents",
    "pack_dataset",
    "prepare_datasets",
    "python_stdlib_root",
    "stable_hash",
    "tokenizer_fingerprint",
]
