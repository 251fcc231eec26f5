"""Built-in code evaluation: HumanEval-style tasks scored offline by pass@k, each completion in a sandbox.

* :mod:`~distily.code_eval.schema` -- the records: :class:`Task`, :class:`Completion`;
* :mod:`~distily.code_eval.tasks` -- task and completions files (HumanEval's JSONL), validated line by line;
* :mod:`~distily.code_eval.metrics` -- the unbiased pass@k estimator;
* :mod:`~distily.code_eval.sandbox` -- one subprocess per completion with limits and namespaces (what is and is
  not isolated is in its docstring and in docs/code_eval.md);
* :mod:`~distily.code_eval.jail` -- the script that makes the filesystem read-only inside the namespaces;
* :mod:`~distily.code_eval.executors` -- one registry, language -> program (``python``, ``go``);
* :mod:`~distily.code_eval.score` -- :func:`score_completions`, what ``distily eval --completions`` runs.
"""

from __future__ import annotations

from .executors import EXECUTORS, Program, register_executor
from .metrics import mean_pass_at_k, pass_at_k
from .sandbox import FAILED, PASSED, TIMED_OUT, Isolation, Limits, SandboxResult, isolation, run_sandboxed
from .schema import Completion, Task
from .score import score_completions, summary_table
from .tasks import CODE_TASKS, load_completions, load_tasks

__all__ = [
    "CODE_TASKS",
    "EXECUTORS",
    "FAILED",
    "PASSED",
    "TIMED_OUT",
    "Completion",
    "Isolation",
    "Limits",
    "Program",
    "SandboxResult",
    "Task",
    "isolation",
    "load_completions",
    "load_tasks",
    "mean_pass_at_k",
    "pass_at_k",
    "register_executor",
    "run_sandboxed",
    "score_completions",
    "summary_table",
]
