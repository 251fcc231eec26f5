"""One distillation run end to end: load, build, evaluate, train, evaluate, save.

``train()`` is what the ``distily`` command calls; it is also the Python entry point for a whole run.
Everything that can be checked is checked before the output folder is touched, so bad input never leaves a
half-made run behind.
"""

from __future__ import annotations

import logging
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, DataArguments, DistillationConfig, StudentArguments, TeacherArguments, config_to_dict
from .io import provenance, write_json_atomic, write_yaml_atomic

logger = logging.getLogger(__name__)

RUN_MANIFEST = "distily_run.json"
RUN_CONFIG = "distily_config.yaml"
CHECKPOINT_PREFIX = "checkpoint-"
BITNET_PACKED_DIR = "packed"  # a BitNet run's ternary-packed export, inside its output folder


@dataclass
class RunResult:
    """What a run produced: its folder, the metrics before and after training, the trainer."""

    output_dir: Path
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    trainer: Any = None


# ----------------------------------------------------------------------------------------------------------------
# Output folder and checkpoints


def _read_manifest(output_dir: Path) -> dict | None:
    import json

    path = output_dir / RUN_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "unreadable"}


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint can be resumed from only if its trainer state and model weights were fully written."""
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "trainer_state.json").is_file() and has_weights


def checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders of a run, oldest first."""
    found = [
        p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(output_dir: Path, resume: str | None) -> str | None:
    """Turn ``--resume_from_checkpoint`` (a path, or ``true`` for the latest) into a complete checkpoint path.

    A checkpoint missing ``trainer_state.json`` or weights (a save killed midway) is skipped when picking the
    latest, and refused with a clear message when named explicitly.
    """
    if resume is None or str(resume).lower() in ("", "false", "no", "none"):
        return None
    if str(resume).lower() in ("true", "yes", "latest", "last"):
        complete = [p for p in checkpoints(output_dir) if is_complete_checkpoint(p)]
        if not complete:
            raise ConfigError(
                f"--resume_from_checkpoint true: no complete checkpoint in {str(output_dir)!r}. Start a new run "
                "without --resume_from_checkpoint, or point it at a checkpoint folder."
            )
        skipped = [p.name for p in checkpoints(output_dir) if not is_complete_checkpoint(p)]
        if skipped:
            logger.warning("Skipping incomplete checkpoints %s.", skipped)
        return str(complete[-1])
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--resume_from_checkpoint {resume!r} does not exist. Pass a checkpoint folder or 'true'.")
    if not is_complete_checkpoint(path):
        valid = [p.name for p in checkpoints(path.parent) if is_complete_checkpoint(p)]
        raise ConfigError(
            f"Checkpoint {resume!r} is incomplete (needs trainer_state.json and model weights; the save was "
            f"probably interrupted). Complete checkpoints beside it: {valid or 'none'}."
        )
    return str(path)


def check_output_dir(config: DistillationConfig, resuming: bool) -> None:
    """Refuse to write over a finished run (or a folder that is not a distily run) unless asked to."""
    output_dir = Path(config.output_dir)
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    manifest = _read_manifest(output_dir)
    if resuming:
        if manifest is None:
            raise ConfigError(f"{str(output_dir)!r} is not a distily run folder; cannot resume there.")
        return
    if manifest is None:
        raise ConfigError(
            f"Output folder {str(output_dir)!r} is not empty and holds no distily run. Choose another --output_dir "
            "(distily only replaces folders it wrote)."
        )
    if config.overwrite_output_dir:
        logger.warning("Replacing the previous run in %s (--overwrite_output_dir).", output_dir)
        return
    if manifest.get("status") == "finished":
        raise ConfigError(
            f"Output folder {str(output_dir)!r} holds a finished run (finished {manifest.get('finished_at', '?')}). "
            "Pass --overwrite_output_dir to replace it, or choose another --output_dir."
        )
    raise ConfigError(
        f"Output folder {str(output_dir)!r} holds an unfinished run. Continue it with --resume_from_checkpoint "
        "true, replace it with --overwrite_output_dir, or choose another --output_dir."
    )


def clear_output_dir(output_dir: Path) -> None:
    """Remove a previous distily run (only called after check_output_dir approved the overwrite)."""
    if output_dir.exists() and _read_manifest(output_dir) is not None:
        shutil.rmtree(output_dir)


# ----------------------------------------------------------------------------------------------------------------
# The run


def _format_ppl(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:,.2f}"


def summary_table(before: dict, after: dict) -> str:
    """Teacher and student perplexity before and after training, as printed at the end of a run."""
    rows = [
        ("teacher", before.get("eval_teacher_ppl", after.get("eval_teacher_ppl")), None),
        ("student", before.get("eval_student_ppl"), after.get("eval_student_ppl")),
    ]
    lines = [f"{'eval perplexity':<16}{'before':>14}{'after':>14}"]
    for name, start, end in rows:
        lines.append(f"{name:<16}{_format_ppl(start):>14}{_format_ppl(end) if end is not None else '':>14}")
    start, end = before.get("eval_student_ppl"), after.get("eval_student_ppl")
    if start and end:
        lines.append(f"student perplexity change: {100 * (end - start) / start:+.1f}%")
    return "\n".join(lines)


def train(
    teacher_args: TeacherArguments,
    student_args: StudentArguments,
    data_args: DataArguments,
    config: DistillationConfig,
    command: list[str] | None = None,
) -> RunResult:
    """Distil ``teacher_args.teacher`` into a student built from it, on ``data_args.dataset``.

    Evaluates teacher and student on the eval split before and after training, saves the student (with its
    tokenizer), metrics, trainer state, TensorBoard logs and the resolved config in ``config.output_dir``.
    """
    from .bitnet import is_bitnet_student, save_packed
    from .data import prepare_datasets
    from .students import build_student, count_parameters
    from .teacher.loading import load_teacher
    from .trainer import DistillationTrainer, check_compatible

    output_dir = Path(config.output_dir)
    resume = resolve_resume(output_dir, config.resume_from_checkpoint)
    check_output_dir(config, resuming=resume is not None)
    if not teacher_args.teacher:
        raise ConfigError("--teacher is required: a Hub id, a local folder, a .gguf file or smollm2-135m-instruct.")

    started = time.time()
    teacher, tokenizer = load_teacher(
        teacher_args.teacher,
        dtype=teacher_args.teacher_dtype,
        revision=teacher_args.teacher_revision,
        trust_remote_code=teacher_args.trust_remote_code,
    )
    # When resuming, Trainer loads the checkpoint's weights into this freshly built student.
    student = build_student(teacher, student_args.student_config, init=student_args.student_init)
    check_compatible(student, teacher, config)
    if len(tokenizer) > student.config.vocab_size:
        raise ConfigError(
            f"The tokenizer has {len(tokenizer)} tokens but the student's vocabulary only {student.config.vocab_size}."
        )
    data = prepare_datasets(data_args, tokenizer, config.seq_len, seed=config.seed)
    logger.info(
        "Data: %d train blocks (%d documents), %d eval blocks (%d documents) of %d tokens.",
        len(data.train), data.train_documents, len(data.eval), data.eval_documents, config.seq_len,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
    )

    # Only now, with every input checked, is the output folder written.
    if resume is None and config.overwrite_output_dir:
        clear_output_dir(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        **provenance(),
        "status": "running",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(command) if command else None,
        "teacher": teacher_args.teacher,
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(student),
        "train_blocks": len(data.train),
        "eval_blocks": len(data.eval),
    }
    write_json_atomic(output_dir / RUN_MANIFEST, manifest)
    write_yaml_atomic(output_dir / RUN_CONFIG, config_to_dict(teacher_args, student_args, data_args, config))

    result = RunResult(output_dir=output_dir, trainer=trainer)
    if resume is None:
        result.metrics_before = trainer.evaluate()
        trainer.save_metrics("eval_start", result.metrics_before, combined=False)
    else:
        import json

        start_file = output_dir / "eval_start_results.json"
        result.metrics_before = json.loads(start_file.read_text()) if start_file.exists() else {}

    train_output = trainer.train(resume_from_checkpoint=resume)
    result.train_metrics = dict(train_output.metrics)
    trainer.save_model()
    if is_bitnet_student(student):
        # The shippable form: ternary weights packed 4 per byte (docs/bitnet.md); the run folder keeps the latent ones.
        manifest["bitnet"] = save_packed(student, output_dir / BITNET_PACKED_DIR, tokenizer=tokenizer, overwrite=True)
    trainer.save_metrics("train", result.train_metrics)
    trainer.save_state()
    result.metrics_after = trainer.evaluate()
    trainer.save_metrics("eval", result.metrics_after)

    manifest.update(
        status="finished",
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        wall_time_seconds=round(time.time() - started, 1),
        global_step=trainer.state.global_step,
    )
    write_json_atomic(output_dir / RUN_MANIFEST, manifest)
    print("\n" + summary_table(result.metrics_before, result.metrics_after), flush=True)
    print(f"Student saved to {output_dir}", flush=True)
    return result


def main_command() -> list[str]:
    """The command line of this process, for the run manifest and model cards."""
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
