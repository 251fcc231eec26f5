"""Wall-clock accounting of a run: a training time budget and the seconds each phase took.

``TrainTimeBudget`` stops training cleanly at a step boundary once the next step would pass
``--max_train_seconds``, so a run on a machine rented by the hour (or ``make demo`` on a slow CPU) ends inside
its budget with its final evaluation, save and export, instead of being killed mid-step. ``PhaseTimes`` records
how long loading, data preparation, evaluation, training and export took, for the summary and the run manifest.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class TrainTimeBudget(TrainerCallback):
    """Stops training at the end of the step after which the next step would pass ``max_seconds``.

    Time counts from the start of ``Trainer.train`` in this process (a resumed run gets the budget afresh). The
    next step is predicted to take as long as the mean of the steps so far. When the budget ends training, a
    checkpoint is saved (if the run saves checkpoints at all), so the run can be resumed to its full length.
    Under several processes the main process decides and the others follow, so every process stops at the same
    step.
    """

    clock = staticmethod(time.monotonic)  # seconds; a test replaces it with a fake clock

    def __init__(self, max_seconds: float):
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        self.max_seconds = float(max_seconds)
        self.stopped_at_step: int | None = None
        self._start: float | None = None
        self._steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self.clock()
        self._steps = 0
        self.stopped_at_step = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is None or control.should_training_stop:
            return
        self._steps += 1
        elapsed = self.clock() - self._start
        stop = _agree(elapsed + elapsed / self._steps > self.max_seconds, args.device)
        if stop and state.global_step < state.max_steps:
            control.should_training_stop = True
            if args.save_strategy != "no":
                control.should_save = True
            self.stopped_at_step = state.global_step
            logger.warning(
                "Stopping at step %d of %d: %.0f s of training so far, and another step would pass "
                "--max_train_seconds %g.",
                state.global_step, state.max_steps, elapsed, self.max_seconds,
            )  # fmt: skip


def _agree(decision: bool, device: torch.device) -> bool:
    """The main process's decision, the same in every process of a distributed run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return decision
    flag = torch.tensor([1.0 if decision else 0.0], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


class PhaseTimes:
    """Seconds spent in each named phase of a run, in the order the phases ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - start, 1)

    def table(self) -> str:
        """One line per phase and the total, as printed at the end of a run."""
        width = max((len(name) for name in self.seconds), default=5)
        lines = [f"{name:<{width}} {seconds:>8.1f} s" for name, seconds in self.seconds.items()]
        lines.append(f"{'total':<{width}} {sum(self.seconds.values()):>8.1f} s")
        return "\n".join(lines)
