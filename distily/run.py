"""One distillation run end to end: load, build, evaluate, train, evaluate, save.

``train()`` is what the ``distily`` command calls; it is also the Python entry point for a whole run.
Everything that can be checked is checked before the output folder is touched, so bad input never leaves a
half-made run behind.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .config import (
    ConfigError,
    DataArguments,
    DistillationConfig,
    ExportArguments,
    PeftArguments,
    RunEvalArguments,
    StudentArguments,
    TeacherArguments,
)
from .run_folder import FINISHED, INTERRUPTED, RunFolder
from .timing import PhaseTimes

logger = logging.getLogger(__name__)

# The run folder's names, owned by RunFolder (re-exported for earlier imports).
RUN_MANIFEST = RunFolder.MANIFEST
RUN_CONFIG = RunFolder.CONFIG
CHECKPOINT_PREFIX = RunFolder.CHECKPOINT_PREFIX
BITNET_PACKED_DIR = RunFolder.PACKED_DIR  # a BitNet run's ternary-packed export, inside its output folder


@dataclass
class RunResult:
    """What a run produced: its folder, the metrics before and after training, the trainer."""

    output_dir: Path
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    trainer: Any = None
    export: Any = None  # distily.export.ExportResult when --export was given
    task_metrics: dict[str, float] = field(default_factory=dict)  # --eval_tasks: {"humaneval_pass@1": ...}


# ----------------------------------------------------------------------------------------------------------------
# Output folder and checkpoints: thin wrappers over RunFolder, kept for earlier imports

is_complete_checkpoint = RunFolder.is_complete_checkpoint


def checkpoints(output_dir: Path) -> list[Path]:
    """A run's checkpoint folders, oldest first."""
    return RunFolder(output_dir).checkpoints()


def resolve_resume(output_dir: Path, resume: str | None) -> str | None:
    """``--resume_from_checkpoint`` as a complete checkpoint path (:meth:`RunFolder.resume_checkpoint`)."""
    path = RunFolder(output_dir).resume_checkpoint(resume)
    return str(path) if path is not None else None


def check_output_dir(config: DistillationConfig, resuming: bool) -> None:
    """Refuse to write over a finished run (or a folder that is not a distily run) unless asked to."""
    RunFolder(config.output_dir).check_writable(resuming, overwrite=config.overwrite_output_dir)


def clear_output_dir(output_dir: Path) -> None:
    """Remove a previous distily run (only called after check_output_dir approved the overwrite)."""
    RunFolder(output_dir).clear()


def teacher_gguf_tokenizer_pre(teacher: str | None, vocab_size: int | None = None) -> str | None:
    """llama.cpp's pre-tokenizer name written in the teacher's own GGUF file, when the teacher is one (and its
    vocabulary has ``vocab_size`` tokens); else None. Recorded in the run's manifest, so a GGUF export of the
    student names the same pre-tokenizer without opening the teacher again."""
    if not teacher:
        return None
    from .export.gguf import gguf_tokenizer_fields
    from .teacher.loading import resolve_teacher_path

    try:
        folder, gguf_file = resolve_teacher_path(teacher)
    except (FileNotFoundError, OSError):
        return None
    if not gguf_file:
        return None
    fields = gguf_tokenizer_fields(Path(folder) / gguf_file)
    if vocab_size is not None and fields.get("n_tokens") != vocab_size:
        return None
    return fields.get("tokenizer.ggml.pre")


def run_gguf_tokenizer_pre(run_dir: str | Path) -> str | None:
    """The pre-tokenizer name a GGUF export of ``run_dir`` should write: the one the run recorded; for a run
    recorded before distily kept it, looked up from its teacher now (what ``distily export`` passes in)."""
    import json

    run = RunFolder(run_dir)
    manifest = run.manifest
    if "teacher_gguf_tokenizer_pre" in manifest or not run.teacher:
        return manifest.get("teacher_gguf_tokenizer_pre")
    try:
        vocab_size = json.loads((run.path / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        vocab_size = None
    return teacher_gguf_tokenizer_pre(run.teacher, vocab_size)


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
    peft_args: PeftArguments | None = None,
    *,
    callbacks: list | None = None,
    loaded_teacher: tuple | None = None,
    export_args: ExportArguments | None = None,
    eval_args: RunEvalArguments | None = None,
) -> RunResult:
    """Distil ``teacher_args.teacher`` into a student built from it (or the pretrained ``student_args.student``,
    with LoRA/DoRA adapters when ``peft_args`` enables them), on ``data_args.dataset``.

    Evaluates teacher and student on the eval split before and after training, saves the student (with its
    tokenizer), metrics, trainer state, TensorBoard logs and the resolved config in ``config.output_dir``.
    Works the same in each process of a multi-process launch (torchrun, accelerate launch); only the main
    process writes the run's own files.

    ``callbacks`` are extra ``TrainerCallback``s (a sweep's pruning callback). ``loaded_teacher`` is a
    ``(model, tokenizer)`` pair already loaded from ``teacher_args`` (the teacher is frozen and never modified,
    so a sweep worker loads it once and reuses it for every trial). With ``export_args.export`` set, the
    finished run is then exported (see :func:`export_run`). With ``eval_args.eval_tasks`` set, the saved
    student is first evaluated on those benchmarks (:mod:`distily.run_eval`), so the card shows them.
    """
    from transformers import set_seed

    from .cross_tokenizer import PairedBlockCollator
    from .cross_tokenizer.setup import check_no_teacher_cache, configure_cross_tokenizer, load_student_tokenizer
    from .distributed import weights_are_sharded
    from .lora import apply_lora
    from .students import count_parameters
    from .trainer import DistillationTrainer, check_compatible

    peft_args = peft_args if peft_args is not None else PeftArguments()
    export_args = export_args if export_args is not None else ExportArguments()
    eval_args = eval_args if eval_args is not None else RunEvalArguments()
    if eval_args.task_list:
        from .run_eval import check_run_eval

        check_run_eval(eval_args)

    output_dir = Path(config.output_dir)
    run = RunFolder(output_dir)
    resume = run.resume_checkpoint(config.resume_from_checkpoint)
    run.check_writable(resuming=resume is not None, overwrite=config.overwrite_output_dir)
    if not teacher_args.teacher and not config.teacher_cache:
        raise ConfigError(
            "--teacher is required: a Hub id, a local folder, a .gguf file or smollm2-135m-instruct (or "
            "--teacher_cache DIR, a teacher recorded with `distily record`)."
        )

    check_no_teacher_cache(config, student_args)
    # The student's own tokenizer (--student_tokenizer, or a pretrained --student's); None: the teacher's.
    student_tokenizer = load_student_tokenizer(student_args, trust_remote_code=teacher_args.trust_remote_code)

    started = time.time()
    phases = PhaseTimes()
    cache = ensemble = prune_report = None
    if config.teacher_cache:
        with phases.phase("load teacher cache and student"):
            teacher, tokenizer, student, cache, prune_report = _student_for_teacher_cache(
                teacher_args, student_args, config, data_args=data_args
            )
            ensemble = recorded_ensemble(teacher_args, config, cache) if "," in config.teacher_cache else None
    else:
        with phases.phase("load teacher"):
            if loaded_teacher is not None:
                teacher, tokenizer = loaded_teacher
            else:
                teacher, tokenizer = load_run_teacher(teacher_args, config)
            # Several teachers (docs/teachers.md): the others, their tokenizers checked against the first's.
            ensemble = load_more_teachers(teacher_args, config, teacher, tokenizer) if teacher_args.teachers else None
        with phases.phase("build student"):
            # Seeded before the student is built, so a randomly initialised student is the same in every run.
            set_seed(config.seed)
            # When resuming, Trainer loads the checkpoint's weights into this freshly built student.
            student, prune_report = _build_run_student(
                teacher, tokenizer, student_tokenizer, teacher_args, student_args, data_args, config
            )
    teacher_tokenizer = tokenizer
    own_tokenizer = student_tokenizer if student_tokenizer is not None else tokenizer
    # Embedding rows that differ by padding are aligned only when the student shares the teacher's tokenizer.
    real_vocab = len(tokenizer) if student_shares_tokenizer(student_args.student, tokenizer) else None
    if configure_cross_tokenizer(config, student_args, own_tokenizer, teacher_tokenizer):
        tokenizer = own_tokenizer  # the student's vocabulary: its data, its saved tokenizer
    for member in ensemble.members if ensemble is not None else [SimpleNamespace(model=teacher)]:
        check_compatible(student, member.model, config, real_vocab_size=real_vocab)
    if len(tokenizer) > student.config.vocab_size:
        raise ConfigError(
            f"The tokenizer has {len(tokenizer)} tokens but the student's vocabulary only {student.config.vocab_size}."
        )
    teacher_name = teacher_args.teacher or (cache.identity["teacher"] if cache is not None else None)
    # Recorded while the teacher is at hand, so a GGUF export of the student names the same pre-tokenizer.
    gguf_tokenizer_pre = teacher_gguf_tokenizer_pre(teacher_name, student.config.vocab_size)
    if tokenizer is not teacher_tokenizer:
        gguf_tokenizer_pre = None  # the student's own tokenizer: detected from its pre-tokenizer at export
    if export_args.formats:
        from .export import check_exportable

        check_exportable(
            student,
            tokenizer,
            export_args.formats,
            gguf_tokenizer_pre=gguf_tokenizer_pre,
            outtype=export_args.export_outtype,
        )
    if peft_args.enabled:
        student = apply_lora(student, peft_args)
    # One process fills the datasets cache.
    with phases.phase("prepare data"), config.main_process_first(desc="tokenising and packing"):
        data = _prepare_run_data(data_args, config, tokenizer, teacher_tokenizer, cache, teacher_args, ensemble)
    for recorded in [member.cache for member in ensemble.members] if ensemble is not None and cache else [cache]:
        if recorded is not None:
            recorded.check_compatible(source_fingerprints=data.source_fingerprints)
    logger.info(
        "Data: %d train blocks (%d documents), %d eval blocks (%d documents) of %d tokens.",
        len(data.train), data.train_documents, len(data.eval), data.eval_documents, config.seq_len,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student,
        teacher_model=ensemble if ensemble is not None else teacher,
        args=config,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
        teacher_tokenizer=teacher_tokenizer if config.cross_tokenizer_loss else None,
        data_collator=(
            PairedBlockCollator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
            if config.cross_tokenizer_loss
            else None
        ),
    )

    if peft_args.enabled and weights_are_sharded(trainer.accelerator) and not student_args.student:
        raise ConfigError(
            "A LoRA student trained with sharded weights (FSDP, ZeRO-3) is merged at the end from the pretrained "
            "student on disk: pass --student PATH, or train under DDP/ZeRO-2."
        )

    # Only now, with every input checked (by every process), is the output folder written, by the main process.
    trainer.accelerator.wait_for_everyone()
    is_main = trainer.is_world_process_zero()
    if is_main and resume is None and config.overwrite_output_dir:
        run.clear()
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    manifest = RunFolder.start_manifest(
        command=shlex.join(command) if command else None,
        resumed_from=str(resume) if resume is not None else None,
        teacher=teacher_name,
        teacher_parameters=count_parameters(teacher) if teacher is not None else None,
        teacher_cache=config.teacher_cache,
        teacher_gguf_tokenizer_pre=gguf_tokenizer_pre,
        **({"teachers": ensemble_manifest(ensemble)} if ensemble is not None else {}),
        student=student_args.student,
        student_tokenizer=student_args.student_tokenizer,
        cross_tokenizer_loss=config.cross_tokenizer_loss,
        student_parameters=count_parameters(student),
        student_trainable_parameters=sum(p.numel() for p in student.parameters() if p.requires_grad),
        processes=trainer.accelerator.num_processes,
        train_blocks=len(data.train),
        eval_blocks=len(data.eval),
    )
    if is_main:
        run.write_manifest(manifest)
        run.write_config(teacher_args, student_args, peft_args, data_args, config, export_args, eval_args)
        if prune_report is not None:  # what --student_init prune kept and why, as `distily prune` writes it
            prune_report.data["command"] = manifest.get("command")
            prune_report.write(output_dir)
    trainer.accelerator.wait_for_everyone()

    try:
        result = _train_and_save(trainer, run, manifest, resume, phases, student, tokenizer, student_args.student)
    except BaseException as err:  # a crash, Ctrl-C, a sweep's pruner: the record says the run did not finish
        if is_main:
            run.write_manifest(RunFolder.set_status(manifest, INTERRUPTED, error=f"{type(err).__name__}: {err}"[:2000]))
        raise

    budget = trainer.time_budget
    RunFolder.set_status(
        manifest,
        FINISHED,
        wall_time_seconds=round(time.time() - started, 1),
        global_step=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        stopped_by_time_budget=budget is not None and budget.stopped_at_step is not None,
        phase_seconds=dict(phases.seconds),
    )
    if is_main:
        run.write_manifest(manifest)
        print("\n" + summary_table(result.metrics_before, result.metrics_after), flush=True)
        print(steps_line(trainer.state.global_step, trainer.state.max_steps, budget), flush=True)
        print(f"Student saved to {output_dir}", flush=True)
        if eval_args.task_list:
            from .run_eval import evaluate_run

            with phases.phase("evaluate tasks"):
                result.task_metrics = evaluate_run(output_dir, eval_args, "cpu" if config.use_cpu else None)
        if export_args.formats:
            with phases.phase("export"):
                result.export = export_run(output_dir, export_args, config)
        print("\nSeconds per phase (this process):\n" + phases.table(), flush=True)
    return result


def _train_and_save(trainer, run: RunFolder, manifest: dict, resume, phases, student, tokenizer, base) -> RunResult:
    """Evaluate (unless resuming), train, save the student (a BitNet student also packed), evaluate again.

    ``base`` is the pretrained ``--student`` (a LoRA student trained with sharded weights is merged from it).
    """
    from .bitnet import is_bitnet_student, save_packed
    from .distributed import FirstEvaluation, evaluates_inside_training
    from .lora import save_student

    result = RunResult(output_dir=run.path, trainer=trainer)
    first_eval = None
    if resume is None and evaluates_inside_training(trainer.accelerator):
        first_eval = FirstEvaluation()  # Trainer evaluates at step 0, after preparing the sharded student
        trainer.add_callback(first_eval)
        trainer.args.eval_on_start = True
    elif resume is None:
        with phases.phase("evaluate before"):
            result.metrics_before = trainer.evaluate()
        trainer.save_metrics(RunFolder.EVAL_START, result.metrics_before, combined=False)
    else:
        result.metrics_before = run.results(RunFolder.EVAL_START)

    with phases.phase("train"):
        train_output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    result.train_metrics = dict(train_output.metrics)
    if first_eval is not None:
        trainer.args.eval_on_start = False
        result.metrics_before = first_eval.metrics or {}
        trainer.save_metrics(RunFolder.EVAL_START, result.metrics_before, combined=False)
    with phases.phase("save"):
        save_student(trainer, run.path, base=base)
        if trainer.is_world_process_zero() and is_bitnet_student(student):
            # The shippable form: ternary weights packed 4 per byte (docs/bitnet.md); the run folder keeps the
            # latent ones.
            manifest["bitnet"] = save_packed(student, run.packed_dir, tokenizer=tokenizer, overwrite=True)
        trainer.save_metrics(RunFolder.TRAIN, result.train_metrics)
        trainer.save_state()
    with phases.phase("evaluate after"):
        result.metrics_after = trainer.evaluate()
    trainer.save_metrics(RunFolder.EVAL, result.metrics_after)
    return result


def steps_line(steps: int, max_steps: int, budget) -> str:
    """How many optimizer steps the run made, and whether the time budget cut it short."""
    if budget is not None and budget.stopped_at_step is not None:
        return f"Trained {steps} of {max_steps} steps: --max_train_seconds {budget.max_seconds:g} ended training."
    return f"Trained {steps} of {max_steps} steps."


def export_run(output_dir: Path, export_args: ExportArguments, config: DistillationConfig):
    """Export a finished run as ``--export`` asks (after the final evaluation; the card reuses its metrics).

    The default export folder (OUTPUT_DIR/export) belongs to the run and is replaced with it; a folder
    elsewhere is replaced only with --overwrite_output_dir. The Hub upload is opt-in (--export_push_to_hub)
    and uses --hub_model_id, --hub_private_repo (private unless set to false) and --hub_token.
    """
    from .export import export_request

    request = export_args.export_config(
        str(output_dir),
        str(RunFolder(output_dir).export_dir),
        overwrite_output_dir=config.overwrite_output_dir,
        hub_model_id=config.hub_model_id,
        hub_private=config.hub_private_repo is not False,
        hub_token=config.hub_token,
    )
    result = export_request(output_dir, request)
    for fmt, files in result.files.items():
        print(f"Exported {fmt} ({result.outtypes[fmt]}): {', '.join(str(p) for p in files)}", flush=True)
    return result


def _build_run_student(
    teacher, tokenizer, student_tokenizer, teacher_args: TeacherArguments, student_args: StudentArguments,
    data_args: DataArguments, config,
):  # fmt: skip
    """``(student, prune_report)`` of a run with a loaded teacher: a pretrained ``--student``, the teacher pruned
    (``--student_init prune``, with its :class:`~distily.pruning.report.PruneReport`), a student with its own
    ``--student_tokenizer``, or one built from the teacher's config (layer subset or random)."""
    from .pruning.calibration import prune_student
    from .students import build_student, build_student_with_tokenizer, load_pretrained_student

    if student_args.student:
        return load_pretrained_student(student_args.student, trust_remote_code=teacher_args.trust_remote_code), None
    if student_args.student_init == "prune":
        return prune_student(
            teacher, tokenizer, student_args, data_args, config.seq_len, config.seed, teacher_args.teacher
        )
    if student_tokenizer is not None:
        student = build_student_with_tokenizer(
            teacher, tokenizer, student_tokenizer, student_args.student_config, init=student_args.student_init
        )
        return student, None
    return build_student(teacher, student_args.student_config, init=student_args.student_init), None


def _prepare_run_data(data_args: DataArguments, config, tokenizer, teacher_tokenizer, cache, teacher_args, ensemble):
    """The run's packed blocks: both tokenisations of each block, aligned, for a cross-tokenizer loss
    (:mod:`distily.cross_tokenizer`); else the blocks in the student's tokenizer, with their indices when a
    recorded teacher serves them and with each block's teacher when several teachers split the data."""
    from .cross_tokenizer import prepare_paired_datasets
    from .data import prepare_datasets

    if config.cross_tokenizer_loss:
        return prepare_paired_datasets(data_args, tokenizer, teacher_tokenizer, config.seq_len, seed=config.seed)
    return prepare_datasets(
        data_args, tokenizer, config.seq_len, seed=config.seed, block_index=cache is not None,
        routing=teacher_routing(teacher_args, ensemble),
    )  # fmt: skip


def _student_for_teacher_cache(
    teacher_args: TeacherArguments, student_args: StudentArguments, config, data_args: DataArguments | None = None
):
    """``(None, tokenizer, student, cache, prune_report)`` for a run on a recorded teacher (``prune_report``: the
    :class:`~distily.pruning.report.PruneReport` of a ``--student_init prune`` student, else None).

    The tokenizer and the teacher's config come from the cache. The teacher's weights are loaded only when the
    student copies them (``--student_init`` auto with the teacher's width, or teacher), then released before
    training.
    """
    from transformers import set_seed

    from .students import _same_width, build_student, load_pretrained_student, student_config_from_teacher
    from .teacher.recorded import CacheError, TeacherCache

    cache = TeacherCache(config.teacher_cache.split(",")[0].strip())  # the first of several: see recorded_ensemble
    cache.check_compatible(seq_len=config.seq_len, temperature=config.temperature, loss=config.loss)
    tokenizer = cache.load_tokenizer()
    set_seed(config.seed)
    if student_args.student:
        return (
            None,
            tokenizer,
            load_pretrained_student(student_args.student, trust_remote_code=teacher_args.trust_remote_code),
            cache,
            None,
        )
    prune_report = None
    teacher_config = cache.teacher_config()
    student_config = student_config_from_teacher(teacher_config, student_args.student_config)
    init = student_args.student_init
    if init in ("teacher", "prune") or (init == "auto" and _same_width(student_config, teacher_config)):
        name = teacher_args.teacher or cache.identity["teacher"]
        logger.info(
            "Loading teacher %s once to initialise the student from its weights; training uses the cache.", name
        )
        teacher, teacher_tokenizer = load_run_teacher(
            dataclasses.replace(teacher_args, teacher=name, teacher_weights=None), config
        )
        cache.check_compatible(tokenizer=teacher_tokenizer, vocab_size=teacher.config.vocab_size)
        if init == "prune":  # calibration blocks from the train split, as without a cache
            from .pruning.calibration import prune_student

            student, prune_report = prune_student(
                teacher, tokenizer, student_args, data_args, config.seq_len, config.seed, name
            )
        else:
            student = build_student(teacher, student_args.student_config, init=init)
        del teacher
    else:
        student = build_student(SimpleNamespace(config=teacher_config), student_args.student_config, init=init)
    if student.config.vocab_size != cache.vocab_size and not _padded_only(student, cache, tokenizer):
        raise CacheError(
            f"The student's vocabulary ({student.config.vocab_size}) is not the cache's ({cache.vocab_size})."
        )
    return None, tokenizer, student, cache, prune_report


def student_shares_tokenizer(student: str | None, tokenizer) -> bool:
    """Whether the student uses ``tokenizer``: a student built from the teacher does; a pretrained ``--student``
    does when its folder's tokenizer has the same fingerprint (vocabulary, merges, special tokens). A student
    folder without a tokenizer is not assumed to share it."""
    if not student:
        return True
    from transformers import AutoTokenizer

    from .data.hashing import tokenizer_fingerprint

    try:
        own = AutoTokenizer.from_pretrained(student)
    except (OSError, ValueError, TypeError):
        return False
    if own.pad_token is None:
        own.pad_token = own.eos_token  # as load_tokenizer does for the teacher's
    return tokenizer_fingerprint(own) == tokenizer_fingerprint(tokenizer)


def _padded_only(student, cache, tokenizer) -> bool:
    """Whether the student's and the cache's vocabularies differ by padding rows only (:mod:`distily.vocab`)."""
    from .vocab import vocab_alignment

    return vocab_alignment(student.config.vocab_size, cache.vocab_size, len(tokenizer)) is not None


def load_run_teacher(teacher_args: TeacherArguments, config: DistillationConfig):
    """The frozen teacher and tokenizer a run uses: dtype ``auto`` resolved for the device the teacher will live
    on, 8/4-bit loading placed on that device."""
    from .teacher.loading import load_teacher, resolve_dtype

    bits = teacher_args.teacher_quantization_bits
    teacher_device = config.teacher_device or config.device
    dtype = teacher_args.teacher_dtype
    if dtype == "auto":  # bfloat16 where the teacher's device supports it
        dtype = str(resolve_dtype(dtype, teacher_device)).removeprefix("torch.")
    return load_teacher(
        teacher_args.teacher,
        dtype=dtype,
        device=teacher_device if bits else None,
        revision=teacher_args.teacher_revision,
        trust_remote_code=teacher_args.trust_remote_code,
        quantization_bits=bits,
    )


def load_more_teachers(teacher_args: TeacherArguments, config: DistillationConfig, first, tokenizer):
    """The :class:`~distily.teacher.ensemble.TeacherEnsemble` of ``teacher_args.teachers``: ``first`` (already
    loaded, with ``tokenizer``) and the others, loaded one by one. Teachers whose tokenizers differ from the first's
    are refused before anything is written."""
    from .teacher.ensemble import TeacherEnsemble, TeacherMember, check_same_tokenizer

    members, tokenizers = [], {}
    for index, spec in enumerate(teacher_args.teachers):
        if index == 0:
            model, member_tokenizer = first, tokenizer
        else:
            device_config = SimpleNamespace(
                teacher_device=spec["device"] or config.teacher_device, device=config.device
            )
            model, member_tokenizer = load_run_teacher(
                dataclasses.replace(
                    teacher_args, teacher=spec["teacher"], teachers=None, teacher_column=None, feature_teacher=None
                ),
                device_config,
            )
        tokenizers[spec["teacher"]] = member_tokenizer
        check_same_tokenizer(tokenizers)
        members.append(TeacherMember(model, spec["teacher"], spec["weight"], spec["device"]))
    return TeacherEnsemble(
        members, feature_teacher=teacher_args.feature_teacher, routed=teacher_args.teacher_column is not None
    )


def recorded_ensemble(teacher_args: TeacherArguments, config: DistillationConfig, first):
    """The ensemble of ``--teacher_cache A,B``: one recorded teacher per cache (``first`` already open), each
    checked against the run, all recorded with one tokenizer; named by their folder as given, weighted by
    ``--teacher_weights``."""
    from .errors import CacheError
    from .teacher.cache import TeacherCache
    from .teacher.ensemble import TeacherEnsemble, TeacherMember

    paths = [path.strip() for path in config.teacher_cache.split(",")]
    caches = [first] + [TeacherCache(path) for path in paths[1:]]
    weights = [float(w) for w in teacher_args.teacher_weights.split(",")] if teacher_args.teacher_weights else None
    if weights is not None and len(weights) != len(caches):
        raise ConfigError(f"--teacher_weights lists {len(weights)} entries for {len(caches)} teacher caches.")
    members = []
    for index, (path, cache) in enumerate(zip(paths, caches, strict=True)):
        cache.check_compatible(seq_len=config.seq_len, temperature=config.temperature, loss=config.loss)
        if cache.identity["tokenizer_fingerprint"] != first.identity["tokenizer_fingerprint"]:
            raise CacheError(
                f"The teacher cache {path!r} was recorded with another tokenizer than {paths[0]!r}: several teachers "
                "must share the student's tokenizer. Record both with teachers of one tokenizer family."
            )
        members.append(TeacherMember(None, path, weights[index] if weights else 1.0, cache=cache))
    return TeacherEnsemble(members, routed=teacher_args.teacher_column is not None)


def teacher_routing(teacher_args: TeacherArguments, ensemble=None):
    """``(column, teacher names)`` when examples name their teacher (``--teacher_column``), else None. Live
    teachers are named as given to ``--teacher``, recorded ones by their cache folder as given to
    ``--teacher_cache``."""
    if teacher_args.teacher_column is None:
        return None
    return teacher_args.teacher_column, ensemble.names if ensemble is not None else teacher_args.teacher_names


def ensemble_manifest(ensemble) -> list[dict]:
    """Every teacher of a run for its manifest: name, normalised weight, device, parameters, whether the
    hidden-state terms read it."""
    from .students import count_parameters

    described = ensemble.describe()
    for entry, member in zip(described, ensemble.members, strict=True):
        entry["parameters"] = count_parameters(member.model) if member.model is not None else None
    return described


def main_command() -> list[str]:
    """The command line of this process, for the run manifest and model cards."""
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
