"""``distily prune`` and ``--student_init prune``: calibration blocks from the train split, then :func:`prune`.

``distily prune --teacher T --dataset D --target '{...}' --calibration_blocks N --output_dir DIR`` writes a model
folder that ``AutoModelForCausalLM.from_pretrained`` loads (tokenizer included) and its ``distily_prune.json``.
Every input is checked (the output folder, the target against the teacher, the calibration blocks) before the
folder is written; the folder appears in one rename when it is complete.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

import torch

from ..config import DataArguments, TeacherArguments
from ..errors import PruneError
from ..io import atomic_path
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


def _check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise PruneError(
            f"--output_dir {output_dir} already holds files. Pick a new folder, or pass --overwrite_output_dir to "
            "replace it."
        )


def prune_to_folder(teacher_args: TeacherArguments, data_args: DataArguments, args, command: list[str] | None = None):
    """Load the teacher, sample calibration blocks, prune, and write ``args.output_dir``; returns the report."""
    from ..teacher.loading import load_teacher

    output_dir = Path(args.output_dir)
    _check_output(output_dir, args.overwrite_output_dir)
    if not teacher_args.teacher:
        raise PruneError("--teacher is required: the model to prune (a Hub id, a folder, a .gguf or an embedded name).")
    dtype = "float32" if teacher_args.teacher_dtype == "auto" else teacher_args.teacher_dtype
    teacher, tokenizer = load_teacher(
        teacher_args.teacher,
        dtype=dtype,
        revision=teacher_args.teacher_revision,
        trust_remote_code=teacher_args.trust_remote_code,
    )
    check_prunable(teacher, args.target)
    started = time.perf_counter()
    ids, info = calibration_blocks(
        data_args, tokenizer, args.seq_len, args.calibration_blocks, args.seed, "--calibration_blocks"
    )
    data_seconds = time.perf_counter() - started
    model, report = prune(
        teacher,
        args.target,
        ids,
        aggregation=args.aggregation,
        layer_score=args.layer_score,
        layer_loss_blocks=args.layer_loss_blocks,
        batch_size=args.batch_size,
    )
    report.data.update(
        teacher=teacher_args.teacher,
        target=args.target,
        command=shlex.join(command) if command else None,
        data={**vars(data_args), "seq_len": args.seq_len, **info, "seconds": round(data_seconds, 2)},
    )
    with atomic_path(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report.write(tmp)
    return report


def prune_command(argv: list[str]) -> int:
    """``distily prune --teacher T --dataset D --target '{...}' --output_dir DIR``."""
    from ..cli import parse_with_yaml
    from ..config.prune import PruneArguments
    from ..run import main_command

    teacher_args, data_args, args = parse_with_yaml(
        argv, classes=(TeacherArguments, DataArguments, PruneArguments), prog="distily prune"
    )
    report = prune_to_folder(teacher_args, data_args, args, command=main_command())
    data = report.data
    seconds = sum(data["calibration"]["seconds"].values())
    print(
        f"Pruned {data['teacher']} to {data['target_shape']}: {data['teacher_parameters']:,} -> "
        f"{data['parameters']:,} parameters, kept layers {data['kept']['layers']}; importance from "
        f"{data['calibration']['tokens']} calibration tokens in {seconds:.1f} s. Saved to {args.output_dir}.",
        flush=True,
    )
    return 0


def prune_student(teacher, tokenizer, student_args, data_args: DataArguments, seq_len: int, seed: int):
    """``--student_init prune``: the teacher pruned to ``--student_config`` by importance on
    ``--calibration_blocks`` train blocks; a BitNet student if ``--student_config`` says ``"bitnet"``."""
    from ..bitnet import check_convertible, convert_to_bitnet, split_bitnet_overrides

    target, bitnet = split_bitnet_overrides(student_args.student_config)
    flag = "--student_config (with --student_init prune)"
    check_prunable(teacher, target, flag)
    ids, info = calibration_blocks(
        data_args, tokenizer, seq_len, student_args.calibration_blocks, seed, "--calibration_blocks"
    )
    student, report = prune(teacher, target, ids, flag=flag)
    student.config.distily_init["calibration"] = {
        "blocks": len(ids),
        "fingerprint": report.data["calibration"]["fingerprint"],
        "train_rows": info["block_rows"],
    }
    if bitnet is not None:
        check_convertible(student.config)
        student = convert_to_bitnet(student, bitnet, calibration_input_ids=ids[:4])
    logger.info("Student pruned from the teacher: %s, layers %s.", report.data["target_shape"], report.kept["layers"])
    return student
