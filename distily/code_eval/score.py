"""Score completions made elsewhere: run each in the sandbox against its task's tests, then pass@k.

``distily eval --tasks humaneval --completions samples.jsonl --allow_code_execution true`` calls
:func:`score_completions`; no model is loaded. Results go to ``distily_eval.json`` in ``--output_dir``, or beside
the completions file when no ``--output_dir`` is given: its ``code_eval.<task>`` entry holds every problem's
results (:mod:`distily.evaluation_file`; the file's other results stay). When distily generated the completions
with a model, the scores are also that model's ``student.tasks.<task>``, which the model card and sweeps read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config.eval import EXECUTION_REFUSED, EvalConfig
from ..errors import ConfigError, TaskFileError
from ..evaluation_file import EVALUATION_FILE, write_evaluation
from ..io import provenance, write_text_atomic
from .executors import EXECUTORS, Program
from .generate import GENERATION_BACKENDS, resolve_generation_backend
from .metrics import default_ks, mean_pass_at_k
from .sandbox import FAILED, PASSED, TIMED_OUT, Limits, SandboxResult, isolation, run_sandboxed
from .schema import Completion, Task
from .tasks import load_completions, load_tasks, task_file

logger = logging.getLogger(__name__)

EVAL_FILE = EVALUATION_FILE
COMPLETIONS_FILE = "completions.jsonl"


def select(tasks: dict[str, Task], completions: list[Completion], limit: int | None):
    """The first ``limit`` tasks (all without a limit) and their completions; each selected task needs one."""
    chosen = dict(list(tasks.items())[:limit]) if limit else tasks
    samples = [completion for completion in completions if completion.task_id in chosen]
    attempted = {completion.task_id for completion in samples}
    missing = [task_id for task_id in chosen if task_id not in attempted]
    if missing:
        raise TaskFileError(
            f"{len(missing)} of the {len(chosen)} tasks have no completion (e.g. {', '.join(missing[:3])}). Add "
            "completions for them, or pass --limit N to score only the first N tasks of the task file."
        )
    return chosen, samples


def score_completions(
    completions: str | os.PathLike,
    *,
    task: str = "humaneval",
    task_file_path: str | os.PathLike | None = None,
    allow_code_execution: bool = False,
    limit: int | None = None,
    timeout: float = 10.0,
    memory_mb: int | None = 1024,
    ks: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    generation: dict[str, Any] | None = None,
    model_section: str | None = None,
) -> dict[str, Any]:
    """Run every completion against its task's tests; write and return the results (``distily_eval.json``).

    ``model_section`` (``"student"``): the completions are that model's, so its scores go into the file's
    ``<model_section>.tasks`` too.

    Everything is checked before any code runs: the consent, the files, each completion's task, the executors
    (a missing toolchain) and that every task has at least ``max(ks)`` samples.
    """
    if not allow_code_execution:
        raise ConfigError(EXECUTION_REFUSED)
    path = task_file(task, task_file_path)
    every_task = load_tasks(path)
    tasks, samples = select(every_task, load_completions(completions, every_task), limit)
    counts_n = {task_id: 0 for task_id in tasks}
    for sample in samples:
        counts_n[sample.task_id] += 1
    fewest = min(counts_n.values())
    ks = list(ks) if ks else default_ks([(n, 0) for n in counts_n.values()])
    too_many = [k for k in ks if k > fewest]
    if too_many:
        raise ConfigError(
            f"pass@{too_many[0]} needs at least {too_many[0]} samples of every task; the fewest any task has is "
            f"{fewest}. Lower --pass_at_k or add samples."
        )
    limits = Limits(timeout=timeout, memory_mb=memory_mb)
    programs = [EXECUTORS[tasks[s.task_id].language](tasks[s.task_id], s.completion) for s in samples]
    destination = Path(output_dir) / EVAL_FILE if output_dir else Path(completions).resolve().parent / EVAL_FILE

    results = _run_all(programs, limits, workers, progress)
    problems: dict[str, dict[str, Any]] = {}
    for sample, result in zip(samples, results, strict=True):
        problem = problems.setdefault(sample.task_id, {"n": 0, PASSED: 0, FAILED: 0, TIMED_OUT: 0, "samples": []})
        problem["n"] += 1
        problem[result.status] += 1
        problem["samples"].append({"line": sample.line, **result.to_dict()})
    counts = [(problem["n"], problem[PASSED]) for problem in problems.values()]
    scores = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
    output: dict[str, Any] = {
        **provenance(),
        "tasks": [task],
        "task_file": str(Path(path).resolve()),
        "completions": str(Path(completions).resolve()),
        "num_tasks": len(problems),
        "num_samples": len(samples),
        "limits": {"timeout": limits.timeout, "memory_mb": limits.memory_mb, "file_size_mb": limits.file_size_mb},
        "isolation": isolation().to_dict(),
        "totals": {status: sum(p[status] for p in problems.values()) for status in (PASSED, FAILED, TIMED_OUT)},
        "scores": {task: scores},
        "problems": problems,
    }
    if generation is not None:
        output["generation"] = generation  # how the completions were made, when distily made them
    details = {key: value for key, value in output.items() if key != "tasks"}
    record: dict[str, Any] = {**provenance(), "tasks": [task], "code_eval": {task: details}}
    if model_section is not None:
        record[model_section] = {"tasks": {task: scores}}
    write_evaluation(destination, record)
    output["output_file"] = str(destination)
    return output


def _run_all(programs: list[Program], limits: Limits, workers: int | None, progress: bool) -> list[SandboxResult]:
    """Each program in its own sandbox, ``workers`` at a time (default: one per CPU), in input order."""

    def run(program: Program) -> SandboxResult:
        memory = limits.memory_mb
        if memory is not None and program.min_memory_mb is not None:
            memory = max(memory, program.min_memory_mb)
        own = Limits(timeout=limits.timeout, memory_mb=memory, file_size_mb=limits.file_size_mb)
        return run_sandboxed(program.files, program.argv, own, program.env)

    isolated = isolation()  # probe once, before the threads
    if not isolated.filesystem_read_only:
        logger.warning(
            "This machine gives the sandbox no read-only filesystem (isolation %s): a completion can change or "
            "delete any file this user can. See docs/code_eval.md.",
            isolated.method,
        )
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        bar = tqdm(total=len(programs), unit="sample", desc="Running completions", disable=not progress)
        futures = [pool.submit(run, program) for program in programs]
        for _ in as_completed(futures):
            bar.update(1)
        bar.close()
    return [future.result() for future in futures]


def generation_output_dir(model: str | os.PathLike, output_dir: str | os.PathLike | None) -> Path:
    """Where generated completions and their scores go: ``output_dir``, else MODEL's folder, or for a ``.gguf``
    file the folder it is in."""
    if output_dir:
        return Path(output_dir)
    return Path(model).parent if Path(model).is_file() else Path(model)


def generate_and_score(model: str | os.PathLike, config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """``distily eval MODEL --tasks humaneval --allow_code_execution true``: generate ``--num_samples``
    completions of every selected task with MODEL, write them to ``completions.jsonl``, score them with
    :func:`score_completions` (which writes ``distily_eval.json`` beside them).

    Everything that needs no model is checked first: the consent, the backend's name, the task file.
    """
    if not config.allow_code_execution:
        raise ConfigError(EXECUTION_REFUSED)
    model = str(model)
    if not Path(model).exists():
        raise ConfigError(f"{model!r} does not exist: pass a run folder, a model folder or a .gguf file.")
    backend_name = resolve_generation_backend(config.generation_backend, model)
    task = config.code_tasks[0]
    path = task_file(task, config.task_file)
    tasks = list(load_tasks(path).values())[: config.limit]
    out_dir = generation_output_dir(model, config.output_dir)
    backend = GENERATION_BACKENDS[backend_name](model, config)
    logger.info("Generating %d samples of %d tasks with %s (%s).", config.num_samples, len(tasks), model, backend_name)
    completions = backend.generate(tasks, config.num_samples, config.temperature, config.max_new_tokens, config.seed)
    destination = out_dir / COMPLETIONS_FILE
    lines = [json.dumps({"task_id": c.task_id, "completion": c.completion}) + "\n" for c in completions]
    write_text_atomic(destination, "".join(lines))
    output = score_completions(
        destination, task=task, task_file_path=path, allow_code_execution=True, limit=config.limit,
        timeout=config.timeout, memory_mb=config.memory_limit_mb, ks=config.k_list, output_dir=out_dir,
        progress=progress, model_section="student",
        generation={
            "model": str(Path(model).resolve()), "backend": backend_name, "num_samples": config.num_samples,
            "temperature": config.temperature, "top_p": config.top_p, "max_new_tokens": config.max_new_tokens,
            "seed": config.seed, "prompt_format": config.prompt_format,
        },
    )  # fmt: skip
    return output


def summary_table(output: dict[str, Any]) -> str:
    """A plain-text table of the totals and the pass@k scores, for the terminal."""
    totals, isolated = output["totals"], output["isolation"]
    lines = [
        f"{'task':<12} {'problems':>8} {'samples':>8} {'passed':>7} {'failed':>7} {'timed out':>9}",
        f"{output['tasks'][0]:<12} {output['num_tasks']:>8} {output['num_samples']:>8} {totals[PASSED]:>7} "
        f"{totals[FAILED]:>7} {totals[TIMED_OUT]:>9}",
    ]
    for task, scores in output["scores"].items():
        lines.append("  ".join(f"{task} {name} = {value:.4f}" for name, value in scores.items()))
    lines.append(
        f"sandbox: network isolated {isolated['network_isolated']}, filesystem read-only "
        f"{isolated['filesystem_read_only']}, pid namespace {isolated['pid_namespace']}"
    )
    if "output_file" in output:
        lines.append(f"results: {output['output_file']}")
    return "\n".join(lines)
