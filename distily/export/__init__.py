"""Export a trained student where people run models: transformers (safetensors), llama.cpp (GGUF), the Hub.

``export(RUN_DIR, formats=["safetensors", "gguf"])`` writes one folder -- weights, tokenizer, a model card
(README.md with a loss-curve PNG), the run's config and a manifest -- atomically: it is built beside the
destination and renamed into place only when complete, so an interrupted export leaves nothing that looks
finished. An existing export is replaced only with ``overwrite=True``, and a folder that is not a distily
export never is. Nothing is uploaded unless ``push_to_hub=True``.

Modules: :mod:`.safetensors`, :mod:`.gguf` (architecture and outtype registries), :mod:`.model_card`,
:mod:`.hub`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_path, provenance
from ..run_folder import RunFolder
from .errors import ExportError

logger = logging.getLogger(__name__)

EXPORT_MANIFEST = "distily_export.json"
DEFAULT_OUTTYPES = {"safetensors": "f32", "gguf": "f16"}

__all__ = [
    "DEFAULT_OUTTYPES",
    "EXPORT_MANIFEST",
    "ExportError",
    "ExportResult",
    "check_exportable",
    "export",
    "export_request",
    "load_student",
]


@dataclass
class ExportResult:
    """What :func:`export` wrote: the destination, the files of each format, the card and the Hub URL."""

    output: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    outtypes: dict[str, str] = field(default_factory=dict)
    card: Path | None = None
    gguf_tokenizer_pre: str | None = None
    gguf_sizes: dict | None = None
    gguf_perplexity: dict | None = None  # the GGUF file's eval perplexity in llama.cpp, when it was measured
    hub_url: str | None = None


def load_student(model_dir: str | os.PathLike):
    """The student of a run folder (or any causal-LM folder) in float32, with its tokenizer: an alias of
    :meth:`distily.run_folder.RunFolder.load_student`, the one place exports and evaluations load a student."""
    return RunFolder(model_dir).load_student()


def merge_adapter(model_dir: Path):
    """A folder holding a PEFT adapter, merged into its base weights in float32 (:func:`distily.lora.merge_adapter`)."""
    import torch

    from ..lora import merge_adapter as merge

    return merge(model_dir, dtype=torch.float32)


def check_exportable(
    model,
    tokenizer,
    formats,
    gguf_tokenizer_pre: str | None = None,
    outtype: str | None = None,
):
    """Fail now, not after training, if ``model``/``tokenizer`` cannot be exported to ``formats`` (as ``outtype``,
    the training command's ``--export_outtype``)."""
    from .outtypes import check_outtype

    check_outtype(outtype, formats, "export_outtype")
    if "gguf" not in formats:
        return
    import gguf as gguf_package

    from .gguf import add_tokenizer, check_outtype_fits, gguf_architecture

    architecture = gguf_architecture(model.config)
    architecture.check()
    check_outtype_fits(architecture, outtype or DEFAULT_OUTTYPES["gguf"])
    # A throw-away writer: resolves the tokenizer's GGUF metadata (model type, pre-tokenizer) without a file.
    add_tokenizer(
        gguf_package.GGUFWriter(path=None, arch="llama"), tokenizer, model.config.vocab_size, pre=gguf_tokenizer_pre
    )


def _check_destination(source: Path, output: Path, overwrite: bool) -> None:
    """Refuse to overwrite without ``overwrite``, to replace a non-export folder, or to touch the source."""
    source, resolved = source.resolve(), output.resolve()
    if resolved == source or source.is_relative_to(resolved):
        raise ExportError(f"--output {str(output)!r} would replace the model being exported. Choose another folder.")
    if not output.exists():
        return
    if not overwrite:
        raise ExportError(
            f"{str(output)!r} already exists. Pass --overwrite to replace it, or choose another --output."
        )
    if output.is_dir() and any(output.iterdir()) and not (output / EXPORT_MANIFEST).is_file():
        raise ExportError(
            f"{str(output)!r} is a folder that distily did not export (no {EXPORT_MANIFEST}); it is never "
            "replaced. Choose another --output."
        )


def _outtypes(formats: list[str], outtype: str | None) -> dict[str, str]:
    from .outtypes import check_outtype

    check_outtype(outtype, formats, "outtype")
    return {fmt: outtype or DEFAULT_OUTTYPES[fmt] for fmt in formats}


def export_request(source: str | os.PathLike, request, gguf_tokenizer_pre: str | None = None) -> ExportResult:
    """:func:`export` as one :class:`distily.config.ExportConfig` describes it (``distily export``'s flags, or
    ``distily train --export ...`` through ``ExportArguments.export_config``)."""
    return export(
        source,
        request.formats,
        request.outtype,
        request.output,
        overwrite=request.overwrite,
        name=request.name,
        license=request.license,
        gguf_tokenizer_pre=gguf_tokenizer_pre or request.gguf_tokenizer_pre,
        model_card=request.model_card,
        push_to_hub=request.push_to_hub,
        hub_model_id=request.hub_model_id,
        hub_private=request.hub_private,
        hub_token=request.hub_token,
    )


def export(
    source: str | os.PathLike,
    formats: list[str] | tuple[str, ...] = ("safetensors",),
    outtype: str | None = None,
    output: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    name: str | None = None,
    license: str | None = None,
    gguf_tokenizer_pre: str | None = None,
    model_card: bool = True,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_private: bool = True,
    hub_token: str | None = None,
) -> ExportResult:
    """Export the student in ``source`` (a run folder) to ``formats`` under ``output`` (default SOURCE/export).

    ``output`` ending in ``.gguf`` writes that one GGUF file (no card). Every check happens before anything is
    written; the export is built beside ``output`` and renamed into place when complete.
    """
    from ..config import parse_formats
    from ..modeling import count_parameters
    from .model_card import DEFAULT_LICENSE

    source = Path(source)
    run = RunFolder(source)
    formats = parse_formats(list(formats), "format")
    if not formats:
        raise ExportError("Nothing to export: pass --format safetensors, gguf or both.")
    outtypes = _outtypes(formats, outtype)
    output = Path(output) if output is not None else run.export_dir
    single_file = output.suffix == ".gguf"
    if single_file and formats != ["gguf"]:
        raise ExportError(f"--output {str(output)!r} is a .gguf file: use --format gguf, or give a folder.")
    if push_to_hub and (single_file or not hub_model_id):
        raise ExportError("--push_to_hub uploads an export folder and needs --hub_model_id user/name.")
    if not source.is_dir():
        raise ExportError(f"{str(source)!r} does not exist or is not a folder. Pass a run folder (--output_dir).")
    run.require_finished()
    _check_destination(source, output, overwrite)
    name = name or source.resolve().name
    teacher = run.teacher
    # The name the run recorded from its GGUF teacher, unless one is given (a plain model folder has none).
    gguf_tokenizer_pre = gguf_tokenizer_pre or run.teacher_gguf_tokenizer_pre
    model, tokenizer = run.load_student()
    check_exportable(model, tokenizer, formats, gguf_tokenizer_pre, outtypes.get("gguf"))  # before writing

    result = ExportResult(output=output, outtypes=outtypes)
    fp16_student_bytes = _fp16_bytes(model)  # before any export casts the model in place
    if single_file:
        from .gguf import write_gguf

        with atomic_path(output) as tmp:
            report = write_gguf(model, tokenizer, tmp, outtypes["gguf"], name=name, tokenizer_pre=gguf_tokenizer_pre)
            result.gguf_sizes = gguf_sizes(report, fp16_student_bytes)  # while the file is still at tmp
        result.files["gguf"] = [output]
        result.gguf_tokenizer_pre = report.tokenizer_pre
        logger.info("Wrote %s (%s).", output, outtypes["gguf"])
        result.gguf_perplexity = measure_gguf(run, output, output)
        return result

    student_config = model.config.to_dict()
    student_parameters = count_parameters(model)
    with atomic_path(output) as tmp:
        tmp.mkdir()
        files: dict[str, list[Path]] = {}
        if "gguf" in formats:
            # Before safetensors: write_safetensors may cast the model to a lower precision in place.
            from .gguf import write_gguf

            gguf_path = tmp / f"{name}-{outtypes['gguf']}.gguf"
            report = write_gguf(
                model,
                tokenizer,
                gguf_path,
                outtypes["gguf"],
                name=name,
                tokenizer_pre=gguf_tokenizer_pre,
                metadata={"license": license or DEFAULT_LICENSE},
            )
            files["gguf"] = [gguf_path]
            result.gguf_tokenizer_pre = report.tokenizer_pre
            result.gguf_sizes = gguf_sizes(report, fp16_student_bytes)
            # Before the card, which shows it: recorded under the file's final path.
            result.gguf_perplexity = measure_gguf(run, gguf_path, output / gguf_path.name)
        if "safetensors" in formats:
            from .safetensors import write_safetensors

            files["safetensors"] = write_safetensors(model, tokenizer, tmp, outtypes["safetensors"])
        if run.config_path.is_file():  # `distily --config FILE` reruns the run from the export
            shutil.copy2(run.config_path, tmp / run.config_path.name)
        card_path = None
        if model_card:
            card_path = _write_card(
                run, tmp, files, student_config, student_parameters, name, license, result.gguf_sizes
            )
        final_files = {fmt: [output / p.relative_to(tmp) for p in paths] for fmt, paths in files.items()}
        manifest = {
            **provenance(),
            "status": "complete",
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": str(source.resolve()),
            "teacher": teacher,
            "formats": formats,
            "outtypes": outtypes,
            "files": {fmt: [p.name for p in paths] for fmt, paths in files.items()},
            "sizes_bytes": {fmt: sum(p.stat().st_size for p in paths) for fmt, paths in files.items()},
            "gguf_tokenizer_pre": result.gguf_tokenizer_pre,
            "gguf": result.gguf_sizes,
        }
        # Written last: a folder with this manifest is a complete export.
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    result.files = final_files
    result.card = output / card_path.name if card_path else None
    logger.info("Exported %s to %s (%s).", source, output, ", ".join(f"{f} {outtypes[f]}" for f in formats))
    if push_to_hub:
        from .hub import push_to_hub as push

        result.hub_url = push(output, hub_model_id, private=hub_private, token=hub_token)
    return result


def measure_gguf(run: RunFolder, path: Path, final_path: Path) -> dict | None:
    """The GGUF file's eval perplexity in llama.cpp (:mod:`distily.evaluate_gguf`), recorded in the run's
    ``distily_eval.json``; None, with a log line saying why, when llama-cpp-python is missing or the folder is
    not a run with an eval split."""
    import importlib.util

    if not run.config_path.is_file():
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        logger.info("Not measuring the GGUF file's perplexity in llama.cpp: pip install llama-cpp-python to do so.")
        return None
    from ..evaluate_gguf import evaluate_gguf

    return evaluate_gguf(path, run, recorded_as=final_path)


def _fp16_bytes(model) -> int:
    """Bytes of the student's weights in float16: every unique parameter and buffer, 2 bytes per value."""
    from ..bitnet import fp16_bytes

    return fp16_bytes(model)


def gguf_sizes(report, fp16_student_bytes: int) -> dict:
    """The size facts of a GGUF export (manifest ``gguf`` entry, model card): bytes on disk against the same
    student as an f16 GGUF and as fp16 weights, and how many tensors got each GGML type."""
    return {
        "outtype": report.outtype,
        "architecture": report.architecture,
        "bytes": report.size_bytes,
        "f16_gguf_bytes": report.f16_size_bytes,
        "fp16_student_bytes": fp16_student_bytes,
        "ratio_vs_f16_gguf": round(report.size_bytes / report.f16_size_bytes, 4),
        "tensor_types": report.type_summary(),
    }


def _write_card(run, folder, files, student_config, student_parameters, name, license, gguf_info=None) -> Path:
    from .model_card import DEFAULT_LICENSE, LOSS_CURVE, card_context, model_card, plot_loss_curve

    log_history = run.trainer_state().get("log_history", [])
    curve = LOSS_CURVE if plot_loss_curve(log_history, folder / LOSS_CURVE) else None
    context = card_context(
        run,
        student_config=student_config,
        student_parameters=student_parameters,
        exported_files=files,
        model_name=name,
        license=license or DEFAULT_LICENSE,
        loss_curve=curve,
        gguf_sizes=gguf_info,
    )
    card = folder / "README.md"
    model_card(context).save(card)
    return card
