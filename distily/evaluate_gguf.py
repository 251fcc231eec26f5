"""Perplexity of an exported GGUF file in llama.cpp, on its run's eval split: the quality of the file users ship.

``distily eval RUN/export/student-f16.gguf --tasks perplexity`` (and every ``distily export`` that writes a GGUF,
when llama-cpp-python is installed) evaluates the file on exactly the blocks the run's ``eval_student_ppl`` was
measured on (the run's saved data config, its tokenizer, its ``seq_len``), through llama-cpp-python, and records
it in the run's ``distily_eval.json`` under ``gguf.<file name>`` beside the PyTorch perplexity. The model card
shows both.

The definition is the trainer's: every position but the first of each block is predicted, the cross-entropy is
summed over all of them and divided once by their count. Each block is evaluated from an empty context (the KV
cache is cleared), as the PyTorch evaluation sees each block alone.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .errors import ConfigError
from .evaluation_file import write_evaluation
from .optional import import_llama_cpp
from .run_folder import RunFolder

logger = logging.getLogger(__name__)


def llama_cpp_perplexity(
    gguf_path: str | os.PathLike, blocks: list[list[int]], n_threads: int | None = None, progress: bool = True
) -> dict[str, float]:
    """``{"eval_ppl", "eval_loss", "eval_tokens"}`` of the GGUF file on ``blocks`` (lists of token ids)."""
    llama_cpp = import_llama_cpp("Evaluating a .gguf file")
    if not blocks or max(len(block) for block in blocks) < 2:
        raise ConfigError("No tokens to evaluate: the eval split packed into zero blocks.")
    width = max(len(block) for block in blocks)
    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=width, n_batch=width, n_ubatch=width, logits_all=True,
        n_threads=n_threads or os.cpu_count(), verbose=False,
    )  # fmt: skip
    total, count = 0.0, 0
    try:
        for block in tqdm(
            blocks, unit="block", desc=f"llama.cpp perplexity of {Path(gguf_path).name}", disable=not progress
        ):
            llm.reset()
            llm.eval(block)
            logits = np.asarray(llm.scores[: len(block) - 1], dtype=np.float64)
            peak = logits.max(axis=-1, keepdims=True)
            log_z = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=-1))
            targets = np.asarray(block[1:])
            total += float((log_z - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
    finally:
        llm.close()
    loss = total / count
    return {"eval_ppl": math.exp(min(loss, 700.0)), "eval_loss": loss, "eval_tokens": count}


def find_run_folder(gguf_path: str | os.PathLike) -> RunFolder | None:
    """The run a GGUF file was exported from: the folder it is in, or the one above an ``export/`` folder."""
    path = Path(gguf_path).resolve()
    for folder in (path.parent, path.parent.parent):
        run = RunFolder(folder)
        if run.config_path.is_file():
            return run
    return None


def run_eval_blocks(run: RunFolder, seq_len: int | None = None, max_eval_blocks: int | None = None):
    """The token blocks of the run's eval split, packed as the run packed them (its tokenizer, its ``seq_len``)."""
    import dataclasses

    from transformers import AutoTokenizer

    from .config import DataArguments
    from .data import prepare_datasets

    (data_args,) = run.configs((DataArguments,))
    if max_eval_blocks is not None:
        data_args = dataclasses.replace(data_args, max_eval_blocks=max_eval_blocks)
    seq_len = seq_len or run.saved_config().get("seq_len") or 512
    tokenizer = AutoTokenizer.from_pretrained(run.path)
    data = prepare_datasets(data_args, tokenizer, seq_len)
    return [list(block) for block in data.eval["input_ids"]], data_args, seq_len


def evaluate_gguf(
    gguf_path: str | os.PathLike,
    run: RunFolder | None = None,
    *,
    output: str | os.PathLike | None = None,
    seq_len: int | None = None,
    max_eval_blocks: int | None = None,
    progress: bool = True,
    recorded_as: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Perplexity of ``gguf_path`` on ``run``'s eval split (default: the run it sits in), written into the run's
    ``distily_eval.json`` (or ``output``) under ``gguf.<file name>``; returns that entry.

    ``recorded_as``: the path to record for the file (an export measures it in its temporary folder).
    """
    gguf_path = Path(gguf_path)
    if not (gguf_path.is_file() and gguf_path.suffix == ".gguf"):
        raise ConfigError(f"{str(gguf_path)!r} is not a .gguf file.")
    run = run if run is not None else find_run_folder(gguf_path)
    if run is None or not run.config_path.is_file():
        raise ConfigError(
            f"{str(gguf_path)!r} is not inside a run folder (or its export/ folder), so there is no eval split to "
            "measure it on. Pass --run_dir RUN_DIR, the run the file was exported from."
        )
    import_llama_cpp("Evaluating a .gguf file")  # before the data is prepared
    blocks, data_args, seq_len = run_eval_blocks(run, seq_len, max_eval_blocks)
    entry: dict[str, Any] = {
        **llama_cpp_perplexity(gguf_path, blocks, progress=progress),
        "file": str(Path(recorded_as or gguf_path).resolve()),
        "bytes": gguf_path.stat().st_size,
        "dataset": data_args.dataset,
        "seq_len": seq_len,
        "eval_blocks": len(blocks),
        "pytorch_ppl": run.results(RunFolder.EVAL).get("eval_student_ppl"),
    }
    destination = Path(output) if output else run.evaluation_path
    write_evaluation(destination, {"gguf": {gguf_path.name: entry}})
    logger.info(
        "%s: eval perplexity %.4f in llama.cpp (PyTorch, float32: %s) on %d blocks of %d tokens.",
        gguf_path.name, entry["eval_ppl"], entry["pytorch_ppl"], len(blocks), seq_len,
    )  # fmt: skip
    return entry
