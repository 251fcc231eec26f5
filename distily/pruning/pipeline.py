"""``distily.prune``: importance on calibration blocks, the units to keep, the cut. One call, no files."""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from ..config.prune import (
    AGGREGATIONS,
    DEFAULT_AGGREGATION,
    DEFAULT_LAYER_LOSS_BLOCKS,
    DEFAULT_LAYER_SCORE,
    LAYER_SCORES,
)
from ..errors import PruneError
from ..modeling import count_parameters, is_quantized
from .families import family_of
from .importance import check_calibration, measure_importance
from .plan import check_layers, choose, resolve_target
from .report import PruneReport
from .trim import trim

logger = logging.getLogger(__name__)


def check_prunable(teacher: PreTrainedModel, target, flag: str = "--target"):
    """The family and target shape, or the error naming what to change (before any work is done)."""
    if is_quantized(teacher):
        raise PruneError(
            "The teacher was loaded quantised (8-bit/4-bit), so its weights cannot be cut. Load it in float "
            "(drop --teacher_quantization_bits) to prune it."
        )
    family = family_of(teacher.config)
    return family, resolve_target(teacher.config, family, target, flag)


def prune(
    teacher: PreTrainedModel,
    target: dict,
    calibration_ids: torch.Tensor,
    *,
    aggregation: str = DEFAULT_AGGREGATION,
    layer_score: str = DEFAULT_LAYER_SCORE,
    layer_loss_blocks: int = DEFAULT_LAYER_LOSS_BLOCKS,
    batch_size: int = 4,
    teacher_layers: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    flag: str = "--target",
) -> tuple[PreTrainedModel, PruneReport]:
    """Prune ``teacher`` to ``target`` (a dict of :data:`~distily.config.prune.PRUNE_TARGET_KEYS`; missing keys
    stay the teacher's) by importance on ``calibration_ids`` (``(blocks, tokens)`` train-split token ids).

    Returns the pruned model (float32, train mode; ``config.distily_init["teacher_layers"]`` names the teacher
    layer each of its layers came from) and its :class:`PruneReport`. ``teacher_layers`` fixes the kept layers
    instead of ranking them. The teacher is not modified.
    """
    if aggregation not in AGGREGATIONS:
        raise PruneError(f"aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}.")
    if layer_score not in LAYER_SCORES:
        raise PruneError(f"layer_score {layer_score!r} is not one of {', '.join(LAYER_SCORES)}.")
    family, shape = check_prunable(teacher, target, flag)
    ids = check_calibration(calibration_ids)
    teacher_shape = family.shape(teacher.config)
    if teacher_layers is not None:
        teacher_layers = check_layers(teacher_layers, teacher_shape)
        if len(teacher_layers) != shape.num_hidden_layers:
            raise PruneError(
                f"teacher_layers names {len(teacher_layers)} layers but the target has {shape.num_hidden_layers}."
            )
    importance = measure_importance(
        teacher, family, ids, batch_size=batch_size, layer_loss_blocks=layer_loss_blocks, progress=progress
    )
    plan = choose(importance, shape, aggregation, layer_score, teacher_layers)
    model = trim(teacher, family, plan, dtype=dtype)
    report = PruneReport.build(
        teacher_shape.as_dict(),
        plan,
        importance,
        ids,
        aggregation,
        layer_score,
        family=family.name,
        teacher_parameters=count_parameters(teacher),
        parameters=count_parameters(model),
    )
    logger.info(
        "Pruned %s to %s (%d -> %d parameters) from %d calibration tokens in %.1f s; kept layers %s.",
        type(teacher).__name__, shape.as_dict(), report.data["teacher_parameters"], report.data["parameters"],
        importance.tokens, sum(importance.seconds.values()), plan.layers,
    )  # fmt: skip
    return model, report
