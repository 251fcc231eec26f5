"""The recorded teacher's former single module, kept so that ``from distily.teacher.recorded import X`` works.

The code lives in :mod:`distily.teacher.cache`: ``format`` (the folder format and :class:`TeacherCache`),
``writer`` (recording) and ``reader`` (serving a batch's rows to the loss). The recording backends are now
``TransformersRecorder`` and ``VllmRecorder``; ``TransformersBackend`` and ``VllmBackend`` remain as aliases.
"""

from __future__ import annotations

from ..errors import CacheError
from .cache.format import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    LOGPROB_DTYPES,
    MANIFEST,
    ROW_TENSORS,
    SAMPLE_TENSORS,
    SETTING_KEYS,
    SPLIT_IDS,
    TEACHER_CONFIG_DIR,
    TOKENIZER_DIR,
    TeacherCache,
    block_hash,
    bytes_per_token,
    sha256_file,
)
from .cache.reader import RecordedSignal
from .cache.writer import (
    BACKENDS,
    DEFAULT_TAIL_SAMPLES,
    TAIL_LOGPROB_FLOOR,
    BlockTopK,
    RecordConfig,
    TransformersBackend,
    TransformersRecorder,
    VllmBackend,
    VllmRecorder,
    record,
    sample_tail,
    top_k_of_logits,
    vllm_engine,
    weight_files_sha256,
    weights_sha256,
)

__all__ = [
    "BACKENDS",
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "DEFAULT_TAIL_SAMPLES",
    "LOGPROB_DTYPES",
    "MANIFEST",
    "ROW_TENSORS",
    "SAMPLE_TENSORS",
    "SETTING_KEYS",
    "SPLIT_IDS",
    "TAIL_LOGPROB_FLOOR",
    "TEACHER_CONFIG_DIR",
    "TOKENIZER_DIR",
    "BlockTopK",
    "CacheError",
    "RecordConfig",
    "RecordedSignal",
    "TeacherCache",
    "TransformersBackend",
    "TransformersRecorder",
    "VllmBackend",
    "VllmRecorder",
    "block_hash",
    "bytes_per_token",
    "record",
    "sample_tail",
    "sha256_file",
    "top_k_of_logits",
    "vllm_engine",
    "weight_files_sha256",
    "weights_sha256",
]
