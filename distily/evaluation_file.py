"""``distily_eval.json``: one file per model folder that every evaluation adds to, none overwrites.

Perplexity and lm-eval results (:mod:`distily.evaluate`), HumanEval pass@k (:mod:`distily.code_eval`) and a
GGUF file's perplexity in llama.cpp each write part of it. A later evaluation replaces only what it measured:

* ``student`` / ``teacher``: the scalar results of each model (``eval_ppl``, ...) and ``tasks``, one entry per
  task (``{"hellaswag": {"acc": ...}, "humaneval": {"pass@1": ...}}``); a task measured again replaces its
  entry, the others stay;
* ``code_eval``: per code task, the details of its last run (every problem and sample, the sandbox's limits
  and isolation, how the completions were generated);
* ``gguf``: per GGUF file name, its perplexity in llama.cpp;
* ``tasks``: every task the file holds results of; any other key is the latest evaluation's.

The model card (``model-index``) and sweeps (``humaneval_pass@1``) read ``student.tasks``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .io import write_json_atomic

logger = logging.getLogger(__name__)

EVALUATION_FILE = "distily_eval.json"
MODEL_SECTIONS = ("student", "teacher")
KEYED_SECTIONS = ("code_eval", "gguf")


def merge_evaluations(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` written over ``old``: model sections and their tasks merged entry by entry (see the module)."""
    merged = {**old, **new}
    for section in MODEL_SECTIONS:
        if isinstance(old.get(section), dict) and isinstance(new.get(section), dict):
            merged[section] = {**old[section], **new[section]}
            tasks = {**old[section].get("tasks", {}), **new[section].get("tasks", {})}
            if tasks:
                merged[section]["tasks"] = tasks
    for section in KEYED_SECTIONS:
        if isinstance(old.get(section), dict) and isinstance(new.get(section), dict):
            merged[section] = {**old[section], **new[section]}
    names = [*old.get("tasks", []), *new.get("tasks", [])]
    if names:
        merged["tasks"] = list(dict.fromkeys(names))
    return merged


def read_evaluation(path: str | os.PathLike) -> dict[str, Any]:
    """The file's results, ``{}`` when there is none yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_evaluation(path: str | os.PathLike, new: dict[str, Any]) -> dict[str, Any]:
    """Merge ``new`` into the file at ``path`` (atomically) and return the whole of it."""
    path = Path(path)
    old = read_evaluation(path)
    replaced = sorted(set(_measured(old)) & set(_measured(new)))
    if replaced:
        logger.warning("Replacing the earlier results of %s in %s.", ", ".join(replaced), path)
    merged = merge_evaluations(old, new)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, merged)
    return merged


def _measured(evaluation: dict[str, Any]) -> list[str]:
    """What an evaluation measured, as names: ``student.eval_ppl``, ``student.tasks.humaneval``, ``gguf.x.gguf``."""
    names = []
    for section in MODEL_SECTIONS:
        for key, value in evaluation.get(section, {}).items():
            if key == "tasks" and isinstance(value, dict):
                names += [f"{section}.tasks.{task}" for task in value]
            else:
                names.append(f"{section}.{key}")
    for section in KEYED_SECTIONS:
        names += [f"{section}.{key}" for key in evaluation.get(section, {})]
    return names


def task_metrics(evaluation: dict[str, Any], section: str = "student") -> dict[str, float]:
    """``{"humaneval_pass@1": 0.12, "hellaswag_acc": 0.3}``: each task's metrics as flat names (for sweeps)."""
    return {
        f"{task}_{metric}": float(value)
        for task, metrics in evaluation.get(section, {}).get("tasks", {}).items()
        for metric, value in metrics.items()
        if isinstance(value, (int, float))
    }
