"""Serving a recorded teacher to the loss: a batch's recorded rows become the sparse teacher signal it reads.

:meth:`TeacherCache.signal <distily.teacher.cache.format.TeacherCache.signal>` finds and checks the rows of a
batch's blocks; :func:`recorded_signal` keeps the real next-token positions of those rows, on the student's
device, as a :class:`RecordedSignal` (a :class:`distily.chunked.SparseTeacherSignal`: top-k ids, log-probabilities,
tail log-mass, tail samples, and the teacher's cross-entropy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...chunked import SparseTeacherSignal
from ...sparse import SparseTeacher


class RecordedSignal(SparseTeacherSignal):
    """The recorded teacher for one batch's selected tokens.

    ``teacher_nll`` spreads each block's recorded NLL evenly over its selected tokens: sums per sequence (what
    evaluation adds up) are the recorded, full-logit values; single tokens are not.
    """

    def __init__(self, teacher: SparseTeacher, nll: Tensor):
        self.teacher, self.nll = teacher, nll

    def top_k(self, rows: slice) -> SparseTeacher:
        return self.teacher[rows]

    def teacher_nll(self, rows: slice) -> Tensor:
        return self.nll[rows]


def recorded_signal(data: dict[str, Tensor], mask: Tensor, device: torch.device | str) -> RecordedSignal:
    """The signal of a batch's recorded rows ``data`` (:meth:`TeacherCache.read_rows`, one row per sequence) at
    its real next-token positions ``mask`` (B, L-1), on ``device``."""
    mask_cpu = mask.to("cpu")
    counts = mask_cpu.sum(-1).clamp(min=1).to(torch.float64)
    per_token_nll = (data["teacher_nll"].double() / counts)[:, None].expand_as(mask_cpu)[mask_cpu]
    samples = {}
    if "tail_sample_ids" in data:  # recorded with tail samples
        samples = {
            "sample_ids": data["tail_sample_ids"][mask_cpu].to(device),
            "sample_logprobs": data["tail_sample_logprobs"][mask_cpu].to(device),
        }
    return RecordedSignal(
        SparseTeacher(
            ids=data["top_ids"][mask_cpu].to(device),
            logprobs=data["top_logprobs"][mask_cpu].to(device),
            tail_logprob=data["tail_logprob"][mask_cpu].to(device),
            **samples,
        ),
        per_token_nll.float().to(device),
    )
