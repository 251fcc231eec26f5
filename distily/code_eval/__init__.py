"""Built-in code evaluation: HumanEval-style tasks scored offline by pass@k, each completion in a sandbox.

* :mod:`~distily.code_eval.schema` -- the records: :class:`Task`, :class:`Completion`;
* :mod:`~distily.code_eval.tasks` -- task and completions files (HumanEval's JSONL), validated line by line;
* :mod:`~distily.code_eval.metrics` -- the unbiased pass@k estimator;
* :mod:`~distily.code_eval.sandbox` -- one subprocess per completion with limits and namespaces (what is and is
  not isolated is in its docstring and in docs/code_eval.md);
* :mod:`~distily.code_eval.jail` -- the script that makes the filesystem read-only inside the namespaces;
* :mod:`~distily.code_eval.executors` -- one registry, language -> program (``python``, ``go``);
* :mod:`~distily.code_eval.generate` -- one registry of generation backends (``transformers``, ``llama_cpp``,
  ``vllm``) and the stop sequences of each language;
* :mod:`~distily.code_eval.score` -- :func:`score_completions`, what ``distily eval --completions`` runs, and
  :func:`generate_and_score`, what ``distily eval MODEL --tasks humaneval`` runs.
"""

from __future__ import annotations

from .executors import EXECUTORS, Program, register_executor
from .generate import (
    GENERATION_BACKENDS,
    STOP_SEQUENCES,
    register_generation_backend,
    truncate_at_stop,
)
from .metrics import mean_pass_at_k, pass_at_k
from .sandbox import FAILED, PASSED, TIMED_OUT, Isolation, Limits, SandboxResult, isolation, run_sandboxed
from .schema import Completion, Task
from .score import generate_and_score, score_completions, summary_table
from .tasks import CODE_TASKS, load_completions, load_tasks

__all__ = [
    "CODE_TASKS",
    "EXECUTORS",
    "FAILED",
    "GENERATION_BACKENDS",
    "PASSED",
    "STOP_SEQUENCES",
    "TIMED_OUT",
    "Completion",
    "Isolation",
    "Limits",
    "Program",
    "SandboxResult",
    "Task",
    "generate_and_score",
    "isolation",
    "load_completions",
    "load_tasks",
    "mean_pass_at_k",
    "pass_at_k",
    "register_executor",
    "register_generation_backend",
    "run_sandboxed",
    "score_completions",
    "summary_table",
    "truncate_at_stop",
]
