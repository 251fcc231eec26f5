"""``distily_prune.json``: what a pruned model kept and why, written beside its weights.

One owner for the file: :class:`PruneReport` builds it from a pruning, writes it atomically and reads it back.
It holds the target and teacher shapes, the kept indices (layers; per kept layer its query heads, key/value
groups and neurons; the hidden channels), every importance score (per aggregation the chosen one; both layer
scores), the calibration data (blocks, tokens, fingerprint, seconds) and the command that made it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import provenance, write_json_atomic
from .importance import Importance
from .plan import KeepPlan

REPORT_VERSION = 1


def calibration_fingerprint(calibration_ids: torch.Tensor) -> str:
    """sha256 of the calibration blocks' token ids (int64, row-major) and their shape."""
    ids = torch.as_tensor(calibration_ids).long().contiguous().cpu()
    digest = hashlib.sha256(json.dumps(list(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def _rounded(tensor: torch.Tensor) -> list:
    return (
        [float(f"{value:.6g}") for value in tensor.flatten().tolist()]
        if tensor.dim() <= 1
        else [_rounded(row) for row in tensor]
    )


@dataclass
class PruneReport:
    """The content of ``distily_prune.json`` (``data``), and where it lives."""

    FILE = "distily_prune.json"
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        teacher_shape: dict,
        plan: KeepPlan,
        importance: Importance,
        calibration_ids: torch.Tensor,
        aggregation: str,
        layer_score: str,
        **extra: Any,
    ) -> PruneReport:
        ids = torch.as_tensor(calibration_ids)
        data = {
            "version": REPORT_VERSION,
            "teacher_shape": teacher_shape,
            "target_shape": plan.shape.as_dict(),
            "kept": plan.as_dict(),
            "aggregation": aggregation,
            "layer_score": layer_score,
            "scores": {
                "layers": {
                    "block_importance": _rounded(importance.block_importance),
                    "drop_loss": _rounded(importance.drop_loss),
                    "base_loss": importance.base_loss,
                },
                "heads": _rounded(importance.heads(aggregation)),
                "neurons": _rounded(importance.neurons(aggregation)),
                "channels": _rounded(importance.channels(aggregation, plan.layers)),
            },
            "calibration": {
                "blocks": int(ids.shape[0]),
                "seq_len": int(ids.shape[1]),
                "tokens": importance.tokens,
                "layer_loss_tokens": importance.layer_loss_tokens,
                "fingerprint": calibration_fingerprint(ids),
                "seconds": {key: round(value, 2) for key, value in importance.seconds.items()},
            },
            **extra,
        }
        return cls(data)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / self.FILE
        write_json_atomic(path, {**self.data, "provenance": provenance()})
        return path

    @classmethod
    def read(cls, folder: str | Path) -> PruneReport:
        return cls(json.loads((Path(folder) / cls.FILE).read_text()))

    @property
    def kept(self) -> dict:
        return self.data["kept"]
