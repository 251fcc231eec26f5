"""Evaluations for model cards: perplexity on local corpora and lm-evaluation-harness tasks.

``distily eval MODEL --tasks perplexity,hellaswag`` writes ``distily_eval.json`` into MODEL (a run or model
folder); ``distily export`` puts its numbers on the model card and in ``model-index``.

* ``perplexity`` runs everywhere, offline: exp of the mean next-token cross-entropy over the eval split of a
  corpus, packed exactly as in training (same split, blocks and sample), so it matches the run's own
  ``eval_student_ppl``.
* Any other task name goes to lm-evaluation-harness (``pip install 'distily[eval]'``), with the vLLM backend
  on CUDA machines that have vLLM (``distily[gpu]``) and the transformers backend elsewhere. Harness tasks
  download their datasets, so they need network access (or a prepared HF cache).
* ``--tasks humaneval --completions FILE`` scores completions made elsewhere by pass@k, each run in a sandbox
  (:mod:`distily.code_eval`, docs/code_eval.md); ``distily eval`` goes there without loading a model.
  ``distily eval MODEL --tasks humaneval --allow_code_execution true`` generates the completions with MODEL
  first (:func:`distily.code_eval.generate_and_score`); humaneval is never sent to lm-eval.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, DataArguments, EvalConfig, TeacherArguments
from .evaluation_file import write_evaluation
from .io import provenance
from .run_folder import RunFolder

logger = logging.getLogger(__name__)

EVAL_FILE = RunFolder.EVALUATION  # re-exported
PERPLEXITY = "perplexity"


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 8, device: torch.device | str | None = None) -> dict[str, float]:
    """``{"perplexity", "eval_loss", "eval_tokens"}`` of ``model`` on packed ``blocks`` (an ``input_ids`` column).

    Every position but the first of each block is predicted; the loss is summed over all of them and divided
    once by their count (the trainer's ``eval_student_ppl`` definition).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size]["input_ids"], dtype=torch.long, device=device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    if count == 0:
        raise ConfigError("No tokens to evaluate: the eval split packed into zero blocks.")
    loss = total / count
    return {PERPLEXITY: math.exp(min(loss, 700.0)), "eval_loss": loss, "eval_tokens": count}


# ----------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: vLLM on a CUDA device when it is installed (fast batched generation), else transformers."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            return "vllm"
    return "hf"


def lm_eval_arguments(
    model_path: str,
    tasks: list[str],
    backend: str,
    device: torch.device,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    gguf_file: str | None = None,
    allow_code_execution: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of ``lm_eval.simple_evaluate`` for one model (the testable part of the harness call).

    ``allow_code_execution`` (``--allow_code_execution``) is passed on as lm-eval's ``confirm_run_unsafe_code``,
    which its code tasks (``mbpp``, ``humaneval_plus``, ...) require; lm-eval runs their code itself, outside
    distily's sandbox.
    """
    backend = resolve_backend(backend, device)
    model_args: dict[str, Any] = {"pretrained": model_path}
    if gguf_file:
        model_args["gguf_file"] = gguf_file
    if backend == "vllm":
        model_args.update(dtype="auto", gpu_memory_utilization=0.8)
    else:
        model_args.update(dtype="float32" if device.type == "cpu" else "auto")
    arguments: dict[str, Any] = {
        "model": backend,
        "model_args": ",".join(f"{key}={value}" for key, value in model_args.items()),
        "tasks": list(tasks),
        "batch_size": batch_size,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "confirm_run_unsafe_code": allow_code_execution,
    }
    if backend == "hf":
        arguments["device"] = str(device)
    return arguments


def harness_scores(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``simple_evaluate``'s output: filter suffixes (``acc,none``) dropped,
    standard errors and aliases left out."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric = key.split(",", 1)[0]
            if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            if isinstance(value, bool) or not math.isfinite(value):
                continue
            scores.setdefault(task, {})[metric] = float(value)
    return scores


def run_lm_eval(arguments: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness (imported lazily; ``pip install 'distily[eval]'``)."""
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError(
            f"Harness tasks {arguments['tasks']} need lm-evaluation-harness: pip install 'distily[eval]' "
            "(and 'distily[gpu]' for the vLLM backend). 'perplexity' works without it."
        ) from err
    if arguments["model"] == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("--lm_eval_backend vllm needs vLLM: pip install 'distily[gpu]' (CUDA machines only).")
    return harness_scores(lm_eval.simple_evaluate(**arguments))


# ----------------------------------------------------------------------------------------------------------------
# One model (and its teacher) end to end


def eval_data_arguments(run: RunFolder, config: EvalConfig) -> DataArguments:
    """The data to evaluate on: the run's own ``DataArguments`` (from its saved config), so perplexity uses the
    split, blocks and sample the run evaluated; ``config``'s data fields override them. Another ``--dataset``
    keeps only the run's text column, eval sample size and cache folder (its split names and hold-out fraction
    belong to its own dataset). A folder with no saved config starts from the defaults."""
    data = run.configs((DataArguments,))[0] if run.config_path.is_file() else DataArguments()
    if config.dataset:
        data = DataArguments(
            dataset=config.dataset,
            dataset_text_field=data.dataset_text_field,
            max_eval_blocks=data.max_eval_blocks,
            dataset_cache_dir=data.dataset_cache_dir,
        )
    overrides = {
        "dataset_text_field": config.dataset_text_field,
        "max_eval_blocks": config.max_eval_blocks,
        "dataset_cache_dir": config.dataset_cache_dir,
    }
    return dataclasses.replace(data, **{name: value for name, value in overrides.items() if value is not None})


def _evaluate_one(model, tokenizer, config: EvalConfig, data_args: DataArguments, seq_len: int, device, lm_eval_target):
    from .data import prepare_datasets

    results: dict[str, Any] = {}
    tasks = config.task_list
    if PERPLEXITY in tasks:
        data = prepare_datasets(data_args, tokenizer, seq_len)
        model.to(device)
        results.update(perplexity(model, data.eval, config.batch_size, device))
    harness = [task for task in tasks if task != PERPLEXITY]
    if harness:
        path, gguf_file = lm_eval_target
        arguments = lm_eval_arguments(
            path, harness, config.lm_eval_backend, device, config.batch_size, config.lm_eval_limit,
            config.num_fewshot, gguf_file, config.allow_code_execution,
        )  # fmt: skip
        results["tasks"] = run_lm_eval(arguments)
    return results


def evaluate_model(model_dir: str | os.PathLike, config: EvalConfig) -> dict[str, Any]:
    """Evaluate the model in ``model_dir`` (and the run's teacher); write and return ``distily_eval.json``."""
    from .teacher.loading import load_teacher, resolve_teacher_path

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{str(model_dir)!r} is not a folder. Pass a run folder or a model folder to distily eval.")
    run = RunFolder(model_dir)
    # seq_len is a training argument, read alone: rebuilding the run's TrainingArguments could fail on this
    # machine (bf16 on a CPU-only one), and evaluating needs none of them.
    seq_len = config.seq_len or run.saved_config().get("seq_len") or 512
    data_args = eval_data_arguments(run, config)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = run.load_student()
    output: dict[str, Any] = {
        **provenance(),
        "model": str(model_dir.resolve()),
        "tasks": config.task_list,
        "dataset": data_args.dataset,
        "seq_len": seq_len,
        "max_eval_blocks": data_args.max_eval_blocks,
    }
    output["student"] = _evaluate_one(model, tokenizer, config, data_args, seq_len, device, (str(model_dir), None))
    del model
    teacher_name = run.configs((TeacherArguments,))[0].teacher if run.config_path.is_file() else None
    if config.include_teacher and teacher_name:
        teacher, teacher_tokenizer = load_teacher(teacher_name, device=device)
        output["teacher_name"] = teacher_name
        output["teacher"] = _evaluate_one(
            teacher, teacher_tokenizer, config, data_args, seq_len, device, resolve_teacher_path(teacher_name)
        )
    destination = Path(config.output) if config.output else run.evaluation_path
    write_evaluation(destination, output)  # the file's other results (humaneval, GGUF perplexity) stay
    logger.info("Evaluation written to %s: %s", destination, json.dumps(output["student"]))
    return output
