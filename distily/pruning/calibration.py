"""Calibration blocks from the train split, and ``--student_init prune`` (the inline path :mod:`distily.run` calls)."""

from __future__ import annotations

import logging

import torch

from ..config import DataArguments
from ..errors import PruneError
from .pipeline import check_prunable, prune

logger = logging.getLogger(__name__)


def calibration_blocks(data_args: DataArguments, tokenizer, seq_len: int, blocks: int, seed: int, flag: str):
    """``(ids, info)``: ``blocks`` packed train-split blocks (a seeded sample, in split order) and where they came
    from (the split's datasets fingerprint, the block indices). The eval split is never read for calibration."""
    from ..data import prepare_datasets

    data = prepare_datasets(data_args, tokenizer, seq_len, seed=seed)
    train = data.train
    if len(train) < blocks:
        raise PruneError(
            f"{flag} {blocks} asks for more calibration blocks than the train split of {data_args.dataset!r} holds "
            f"({len(train)} blocks of {seq_len} tokens). Lower {flag} or --seq_len."
        )
    generator = torch.Generator().manual_seed(seed)
    rows = sorted(torch.randperm(len(train), generator=generator)[:blocks].tolist())
    ids = torch.tensor([train[row]["input_ids"] for row in rows], dtype=torch.long)
    info = {
        "dataset": data_args.dataset,
        "split": "train",
        "train_blocks": len(train),
        "block_rows": rows,
        "source_fingerprint": (data.source_fingerprints or {}).get("train"),
        "seed": seed,
    }
    return ids, info


def prune_student(
    teacher, tokenizer, student_args, data_args: DataArguments, seq_len: int, seed: int, teacher_name: str | None
):
    """``--student_init prune``: ``(student, report)``, the teacher pruned to ``--student_config`` by importance on
    ``--calibration_blocks`` train blocks (a BitNet student if ``--student_config`` says ``"bitnet"``), and the
    :class:`~distily.pruning.report.PruneReport` the run writes beside the student, as ``distily prune`` does."""
    from ..bitnet import check_convertible, convert_to_bitnet, split_bitnet_overrides

    target, bitnet = split_bitnet_overrides(student_args.student_config)
    flag = "--student_config (with --student_init prune)"
    check_prunable(teacher, target, flag)
    ids, info = calibration_blocks(
        data_args, tokenizer, seq_len, student_args.calibration_blocks, seed, "--calibration_blocks"
    )
    student, report = prune(teacher, target, ids, flag=flag)
    report.data.update(
        teacher=teacher_name,
        target=target,
        data={**vars(data_args), "seq_len": seq_len, **info},
        bitnet=bitnet is not None,
    )
    student.config.distily_init["calibration"] = {
        "blocks": len(ids),
        "fingerprint": report.data["calibration"]["fingerprint"],
        "train_rows": info["block_rows"],
    }
    if bitnet is not None:
        check_convertible(student.config)
        student = convert_to_bitnet(student, bitnet, calibration_input_ids=ids[:4])
    logger.info("Student pruned from the teacher: %s, layers %s.", report.data["target_shape"], report.kept["layers"])
    return student, report
