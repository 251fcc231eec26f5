"""``distily prune``: calibration blocks from the train split, :func:`prune`, the model folder.

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

from ..config import DataArguments, TeacherArguments
from ..errors import PruneError
from ..io import atomic_path
from .calibration import calibration_blocks, prune_student  # noqa: F401  (prune_student: re-exported)
from .pipeline import check_prunable, prune

logger = logging.getLogger(__name__)


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
