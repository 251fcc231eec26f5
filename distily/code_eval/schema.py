"""The records of code evaluation: a task (HumanEval's fields plus ``language``) and one completion of it."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_LANGUAGE = "python"


@dataclass(frozen=True)
class Task:
    """One problem: the prompt the model continued, the test code, the function the test checks."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    language: str = DEFAULT_LANGUAGE


@dataclass(frozen=True)
class Completion:
    """One sample: a completion of ``task_id``'s prompt, from line ``line`` of its file."""

    task_id: str
    completion: str
    line: int
