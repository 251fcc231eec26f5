"""The replay buffer: the last student samples, reused by later on-policy batches (DistiLLM's off-policy replay).

Each process keeps its own buffer of ``(prompt, completion)`` token lists, first in first out. It is part of the
training state: :meth:`ReplayBuffer.save` writes it into every checkpoint (one file per process) and a resumed run
loads it back, so resumed training replays the same samples as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import torch

from ..io import atomic_path

Sample = tuple[list[int], list[int]]  # (prompt token ids, completion token ids)
FORMAT = "distily replay buffer v1"


class ReplayBuffer:
    """At most ``capacity`` samples, the oldest dropped first; :meth:`sample` draws with a given generator."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"A replay buffer holds at least one sample, got capacity={capacity}.")
        self.capacity = capacity
        self._samples: deque[Sample] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, prompts: list[list[int]], completions: list[list[int]]) -> None:
        for prompt, completion in zip(prompts, completions, strict=True):
            self._samples.append((list(prompt), list(completion)))

    def sample(self, count: int, generator: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
        """``count`` distinct samples (``count <= len(self)``), chosen uniformly by ``generator``."""
        if count > len(self._samples):
            raise ValueError(f"The replay buffer holds {len(self._samples)} samples, {count} were asked for.")
        picks = torch.randperm(len(self._samples), generator=generator)[:count].tolist()
        chosen = [self._samples[i] for i in picks]
        return [list(p) for p, _ in chosen], [list(c) for _, c in chosen]

    def state_dict(self) -> dict:
        return {"format": FORMAT, "capacity": self.capacity, "samples": [[p, c] for p, c in self._samples]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise ValueError(f"Not a replay buffer state ({state.get('format')!r}, expected {FORMAT!r}).")
        self._samples = deque(((list(p), list(c)) for p, c in state["samples"]), maxlen=self.capacity)

    def save(self, path: Path) -> None:
        """The buffer as JSON, written atomically."""
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.state_dict()), encoding="utf-8")

    def load(self, path: Path) -> None:
        self.load_state_dict(json.loads(Path(path).read_text(encoding="utf-8")))
