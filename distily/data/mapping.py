"""The one way documents become blocks: a batched, fingerprinted ``datasets.map`` with typed columns.

Every packer (plain, routed, synthetic prompt/completion, cross-tokenizer pairs) writes only its per-batch
function and its columns; the map's settings (batch size, dropped source columns, the cache key) live here.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
from datasets import Dataset

MAP_BATCH_SIZE = 256  # documents per call of a packing function
INT32_SEQUENCE = datasets.Sequence(datasets.Value("int32"))
INT8_SEQUENCE = datasets.Sequence(datasets.Value("int8"))


def map_to_blocks(
    documents: Dataset,
    function: Callable[..., dict],
    columns: dict[str, datasets.Sequence],
    fingerprint: str,
    desc: str,
    num_proc: int | None = None,
    **fn_kwargs,
) -> Dataset:
    """``function(batch, **fn_kwargs)`` over ``documents`` in batches, keeping only the ``columns`` it returns
    (typed as given) and caching the result under ``fingerprint`` (a :func:`~distily.data.hashing.stable_hash`
    of everything the blocks depend on)."""
    return documents.map(
        function,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        remove_columns=documents.column_names,
        fn_kwargs=fn_kwargs,
        features=datasets.Features(columns),
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        desc=desc,
    )
