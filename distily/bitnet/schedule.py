"""How a BitNet student trains: the quantisation warm-up and the learning rate of its latent ternary weights.

Quantisation warm-up (Hugging Face, "Fine-tuning LLMs to 1.58bit", 2024): the forward pass blends
``x + λ·(Q(x) − x)`` and ``W + λ·(Q(W) − W)`` with ``λ`` rising linearly from 0 to 1 over ``warmup_steps``
optimizer steps (:class:`BitNetWarmup`, driven by ``state.global_step`` so it survives resume).

``bitnet.learning_rate`` gives the ternary projections' latent weights their own peak rate:
:func:`latent_learning_rate` and :func:`latent_weights` are what ``DistillationTrainer.create_optimizer`` declares
their parameter groups from.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers import TrainerCallback

from .convert import bitnet_options_of
from .layers import bitlinear_modules, set_quant_lambda

logger = logging.getLogger(__name__)


def warmup_lambda(step: int, warmup_steps: int) -> float:
    """``min(1, step / warmup_steps)``; 1 from the start when ``warmup_steps`` is 0."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


class BitNetWarmup(TrainerCallback):
    """Sets every BitLinear's ``quant_lambda`` from ``state.global_step`` before each optimizer step.

    The schedule is a function of the step count alone, so a resumed run continues it exactly. When training
    ends λ is set back to 1, so the evaluation after training and the saved model are the fully ternary student.
    """

    def __init__(self, model: nn.Module, warmup_steps: int):
        self.model = model
        self.warmup_steps = warmup_steps

    def on_step_begin(self, args, state, control, **kwargs):
        set_quant_lambda(self.model, warmup_lambda(state.global_step, self.warmup_steps))

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step < self.warmup_steps:
            logger.warning(
                "Training stopped at step %d, before the BitNet warm-up (%d steps) reached full quantisation; "
                "the saved model is the fully ternary one.",
                state.global_step,
                self.warmup_steps,
            )
        set_quant_lambda(self.model, 1.0)


def warmup_callback(model: nn.Module) -> BitNetWarmup | None:
    """The warm-up callback a trainer needs for ``model``, or None (not a BitNet student, or no warm-up)."""
    options = bitnet_options_of(model)
    if options is None or options.warmup_steps == 0:
        return None
    return BitNetWarmup(model, options.warmup_steps)


def latent_learning_rate(model: nn.Module) -> float | None:
    """The peak learning rate of a BitNet student's latent ternary weights (``bitnet.learning_rate``), or None: not
    a BitNet student, or its latent weights train at ``--learning_rate`` with everything else."""
    options = bitnet_options_of(model)
    return None if options is None or options.learning_rate is None else float(options.learning_rate)


def latent_weights(model: nn.Module) -> list[nn.Parameter]:
    """The latent full-precision weights of the ternary projections (every :class:`BitLinear`'s ``weight``)."""
    return [module.weight for module in bitlinear_modules(model).values()]
