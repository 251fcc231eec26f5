"""A recorded teacher: its top-k next-token distribution, computed once per dataset and trained from many times.

``distily record`` runs the teacher over the packed training (and eval) blocks and stores, per token, its top-k
token ids and log-probabilities, the log-mass of the rest (the tail) and tokens drawn from the tail;
``distily --teacher_cache DIR`` then trains without the teacher: the losses are computed on the top-k tokens plus
one tail bucket (:mod:`distily.sparse`). Three modules:

* :mod:`~distily.teacher.cache.format` -- the folder format (manifest, shard layout, checksums) and
  :class:`TeacherCache`, the one object that owns it: opening, compatibility checks, rows of a batch's blocks;
* :mod:`~distily.teacher.cache.writer` -- recording (:func:`record`, its two recorders), resumable;
* :mod:`~distily.teacher.cache.reader` -- a batch's recorded rows as the teacher signal the loss reads.
"""

from __future__ import annotations

from ...errors import CacheError
from .format import SPLIT_IDS, TeacherCache, bytes_per_token
from .reader import RecordedSignal, recorded_signal
from .writer import BlockTopK, RecordConfig, TransformersRecorder, VllmRecorder, record

__all__ = [
    "SPLIT_IDS",
    "BlockTopK",
    "CacheError",
    "RecordConfig",
    "RecordedSignal",
    "TeacherCache",
    "TransformersRecorder",
    "VllmRecorder",
    "bytes_per_token",
    "record",
    "recorded_signal",
]
