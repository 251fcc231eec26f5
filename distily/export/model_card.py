"""Hub-ready model cards: YAML front matter the Hub reads, then what the student is and how it was made.

Everything on the card comes from the run folder (:class:`distily.run_folder.RunFolder`: its manifest, saved
config, eval and train metrics, trainer state, and ``distily eval``'s results when it was run); nothing is
re-evaluated while exporting. The front matter (licence, base model, tags, ``model-index``) is a
``huggingface_hub.ModelCardData`` with one ``EvalResult`` per score, so the Hub's own code writes and checks it;
the body is rendered from ``templates/model_card.md.j2``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ..io import atomic_path
from ..run_folder import RunFolder

logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "openrail"
EVAL_FILE = RunFolder.EVALUATION  # re-exported
LOSS_CURVE = "loss_curve.png"
# Config fields shown as "architecture" in the teacher/student comparison (whichever the model type has).
SHAPE_FIELDS = (
    "num_hidden_layers",
    "n_layer",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "n_inner",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "n_positions",
    "tie_word_embeddings",
)
HYPERPARAMETERS = (
    "loss",
    "loss_kwargs",
    "temperature",
    "alpha",
    "seq_len",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "bf16",
    "fp16",
    "seed",
)


def human_bytes(size: float | None) -> str:
    if size is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    return str(size)


def human_count(count: int | None) -> str:
    if not count:
        return "n/a"
    for value, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= value:
            return f"{count / value:.1f}{suffix}"
    return str(count)


def geometric_mean(values: list[float]) -> float | None:
    positive = [v for v in values if v is not None and v > 0]
    if not positive or len(positive) != len(values):
        return None
    return math.exp(sum(math.log(v) for v in positive) / len(positive))


# ----------------------------------------------------------------------------------------------------------------
# Facts about the teacher


def teacher_list(manifest: dict) -> list[dict[str, Any]]:
    """Every teacher of a run with several (its manifest's ``teachers``: name, normalised weight, parameters, Hub
    id where known, whether the hidden-state terms read it); empty for a single teacher."""
    teachers = []
    for entry in manifest.get("teachers") or []:
        facts = teacher_facts(entry.get("name"), entry.get("parameters"))
        teachers.append(
            {**entry, "hub_id": facts.get("hub_id"), "parameters_text": human_count(entry.get("parameters"))}
        )
    return teachers


def teacher_facts(teacher: str | None, parameters: int | None) -> dict[str, Any]:
    """Hub id, shape, licence and size on disk of the teacher, read from local files only (never the network).

    Size: the GGUF file for a GGUF teacher, the weight files of a local folder, else parameters × 2 bytes
    (bf16), marked as an estimate.
    """
    facts: dict[str, Any] = {"name": teacher, "parameters": parameters, "config": {}, "hub_id": None}
    if not teacher:
        return facts
    from ..teacher.loading import EMBEDDED_TEACHERS, resolve_teacher_path

    if teacher in EMBEDDED_TEACHERS:
        facts["hub_id"] = EMBEDDED_TEACHERS[teacher].hub_id
    elif not Path(teacher).expanduser().exists() and teacher.count("/") <= 1 and not teacher.startswith((".", "~")):
        facts["hub_id"] = teacher
    try:
        folder, gguf_file = resolve_teacher_path(teacher)
    except (FileNotFoundError, OSError):
        folder, gguf_file = None, None
    local = folder is not None and Path(folder).is_dir()
    if local and gguf_file:
        path = Path(folder) / gguf_file
        facts["size_bytes"] = path.stat().st_size
        facts["size_note"] = f"GGUF file {path.name}"
        try:
            import gguf

            reader = gguf.GGUFReader(path)
            license_field = reader.fields.get("general.license")
            if license_field is not None:
                facts["license"] = license_field.contents()
        except Exception as err:  # a card is still useful without the licence
            logger.info("Could not read the teacher's GGUF metadata: %s", err)
    elif local:
        weights = [p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin")]
        if weights:
            facts["size_bytes"] = sum(p.stat().st_size for p in weights)
            facts["size_note"] = "weight files"
    if "size_bytes" not in facts and parameters:
        facts["size_bytes"] = parameters * 2
        facts["size_note"] = "estimate: parameters × 2 bytes (bf16)"
    if local:
        try:
            from transformers import AutoConfig

            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            facts["config"] = AutoConfig.from_pretrained(folder, **kwargs).to_dict()
        except Exception as err:
            logger.info("Could not read the teacher's config: %s", err)
    return facts


def shape_of(config: dict) -> dict[str, Any]:
    return {name: config[name] for name in SHAPE_FIELDS if config.get(name) is not None}


# ----------------------------------------------------------------------------------------------------------------
# The loss curve


def plot_loss_curve(log_history: list[dict], path: str | os.PathLike) -> bool:
    """Training loss (and its KD / CE parts, and eval loss) against the step, as a PNG. False if no logs."""
    train = [entry for entry in log_history if "loss" in entry and "step" in entry]
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in train]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot(steps, [entry["loss"] for entry in train], label="train loss", linewidth=2)
    for key, label in (("loss_kd", "KD term"), ("loss_ce", "CE term")):
        if any(key in entry for entry in train):
            axes.plot([e["step"] for e in train if key in e], [e[key] for e in train if key in e], "--", label=label)
    evals = [entry for entry in log_history if "eval_loss" in entry and "step" in entry]
    if evals:
        axes.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("Distillation loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return True


# ----------------------------------------------------------------------------------------------------------------
# The card


def _benchmarks(evaluation: dict) -> dict[str, Any]:
    """Rows ``(task, metric, teacher, student)`` from ``distily_eval.json``, with mean and geometric mean."""
    rows = []
    student_tasks = evaluation.get("student", {}).get("tasks", {})
    teacher_tasks = evaluation.get("teacher", {}).get("tasks", {})
    for task, metrics in student_tasks.items():
        for metric, value in metrics.items():
            rows.append(
                {"task": task, "metric": metric, "student": value, "teacher": teacher_tasks.get(task, {}).get(metric)}
            )
    summary = {}
    if rows:
        student_values = [row["student"] for row in rows]
        teacher_values = [row["teacher"] for row in rows]
        summary["student_mean"] = sum(student_values) / len(student_values)
        summary["student_geomean"] = geometric_mean(student_values)
        if all(value is not None for value in teacher_values):
            summary["teacher_mean"] = sum(teacher_values) / len(teacher_values)
            summary["teacher_geomean"] = geometric_mean(teacher_values)
    return {"rows": rows, **summary}


def _looks_like_hub_dataset(name: str | None) -> bool:
    from ..data import PYTHON_STDLIB

    if not name or name == PYTHON_STDLIB or Path(name).expanduser().exists():
        return False
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "," not in name


HARNESS_SOURCE = {
    "source_name": "distily eval (lm-evaluation-harness)",
    "source_url": "https://github.com/EleutherAI/lm-evaluation-harness",
}
# Code tasks scored by distily.code_eval: the Hub's dataset id and metric names (as on its leaderboards).
CODE_TASK_SOURCES = {
    "humaneval": {
        "dataset_type": "openai/openai_humaneval",
        "dataset_name": "HumanEval",
        "metric_name": {"pass@1": "pass@1", "pass@10": "pass@10", "pass@100": "pass@100"},
        "source_name": "distily eval (human-eval problems, sandboxed execution)",
        "source_url": "https://github.com/openai/human-eval",
    },
}


def card_data(context: dict):
    """The card's metadata (licence, base_model, datasets, tags, ``model-index``) as ``huggingface_hub``'s
    ``ModelCardData``: the eval perplexity and each harness score is one ``EvalResult``."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = context["config"].get("dataset")
    tags = ["distily", "distillation", "knowledge-distillation"]
    if "gguf" in context["formats"]:
        tags.append("gguf")
    results = []
    if context["student_ppl_after"] is not None:
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=str(dataset or "unknown"),
                dataset_name=context["eval_dataset_name"],
                metric_type="perplexity",
                metric_value=round(context["student_ppl_after"], 4),
                metric_name="Perplexity",
            )
        )
    for row in context["benchmarks"]["rows"]:
        source = CODE_TASK_SOURCES.get(row["task"], HARNESS_SOURCE)
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=source.get("dataset_type", row["task"]),
                dataset_name=source.get("dataset_name", row["task"]),
                metric_type=row["metric"],
                metric_name=source.get("metric_name", {}).get(row["metric"]),
                metric_value=round(float(row["student"]), 4),
                source_name=source["source_name"],
                source_url=source["source_url"],
            )
        )
    return ModelCardData(
        license=context["license"],
        base_model=context["teacher"].get("hub_id"),
        datasets=[dataset] if _looks_like_hub_dataset(dataset) else None,
        library_name="transformers" if "safetensors" in context["formats"] else "gguf",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=context["model_name"] if results else None,
        eval_results=results or None,
    )


def front_matter(context: dict) -> dict[str, Any]:
    """The YAML metadata block of the card as a plain dict (what :func:`card_data` writes)."""
    return card_data(context).to_dict()


def card_context(
    run_dir: str | os.PathLike | RunFolder,
    *,
    student_config: dict,
    student_parameters: int | None,
    exported_files: dict[str, list[Path]],
    model_name: str,
    license: str = DEFAULT_LICENSE,
    loss_curve: str | None = None,
    gguf_sizes: dict | None = None,
) -> dict[str, Any]:
    """Everything the template shows, gathered from the run folder and the exported files.

    ``gguf_sizes``: the size facts of the GGUF file (:func:`distily.export.gguf_sizes`), shown under the table.
    """
    from ..version import __version__

    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    manifest = run.manifest
    config = run.saved_config()
    before = run.results(RunFolder.EVAL_START)
    after = run.results(RunFolder.EVAL)
    train = run.results(RunFolder.TRAIN)
    state = run.trainer_state()
    evaluation = run.evaluation()
    teacher_name = manifest.get("teacher") or config.get("teacher")
    teacher = teacher_facts(teacher_name, manifest.get("teacher_parameters"))

    command = manifest.get("command")
    command_note = None
    if not manifest and not config:
        command_note = (
            f"This model folder holds no distily run record ({RunFolder.MANIFEST}), so how it was trained is unknown."
        )
    elif not command:
        command = f"distily --config {RunFolder.CONFIG}"
        command_note = (
            "The run was started from Python, so no command line was recorded; this command reruns it from the "
            "resolved config saved with the run (included in this folder)."
        )
    # Size on disk of the weights (tokenizer and config files are the same for both models).
    sizes = {
        fmt: sum(p.stat().st_size for p in files if p.is_file() and p.suffix in (".safetensors", ".gguf"))
        for fmt, files in exported_files.items()
    }
    teacher_shape, student_shape = shape_of(teacher["config"]), shape_of(student_config)
    differences = [
        {"field": name, "teacher": teacher_shape.get(name), "student": student_shape.get(name)}
        for name in dict.fromkeys([*teacher_shape, *student_shape])
        if teacher_shape.get(name) != student_shape.get(name)
    ]
    init = student_config.get("distily_init") or {}
    max_eval_blocks = config.get("max_eval_blocks")
    eval_dataset_name = f"{config.get('dataset', 'unknown')} (held-out eval split)"
    tokens_per_step = None
    if config.get("per_device_train_batch_size") and config.get("seq_len"):
        tokens_per_step = (
            config["per_device_train_batch_size"] * config.get("gradient_accumulation_steps", 1) * config["seq_len"]
        )
    return {
        "model_name": model_name,
        "license": license,
        "formats": sorted(exported_files),
        "export_sizes": {fmt: human_bytes(size) for fmt, size in sizes.items()},
        "gguf_sizes": gguf_sizes,
        "export_files": {fmt: [p.name for p in files] for fmt, files in exported_files.items()},
        "teacher": teacher,
        "teachers": teacher_list(manifest),
        "teacher_size": human_bytes(teacher.get("size_bytes")),
        "teacher_params": human_count(teacher.get("parameters")),
        "teacher_shape": teacher_shape,
        "student_params": human_count(student_parameters),
        "student_shape": student_shape,
        "model_type": student_config.get("model_type", "unknown"),
        "differences": differences,
        "init": init,
        "config": config,
        "hyperparameters": {
            name: config[name]
            for name in HYPERPARAMETERS
            if config.get(name) not in (None, "")
            # max_steps > 0 overrides the epoch count, which would only mislead.
            and not (name == "num_train_epochs" and (config.get("max_steps") or -1) > 0)
            and not (name == "max_steps" and (config.get("max_steps") or -1) <= 0)
        },
        "tokens_per_step": tokens_per_step,
        "manifest": manifest,
        "teacher_ppl": before.get("eval_teacher_ppl", after.get("eval_teacher_ppl")),
        "student_ppl_before": before.get("eval_student_ppl"),
        "student_ppl_after": after.get("eval_student_ppl"),
        "eval_tokens": after.get("eval_tokens") or before.get("eval_tokens"),
        "max_eval_blocks": max_eval_blocks,
        "eval_dataset_name": eval_dataset_name,
        "benchmarks": _benchmarks(evaluation),
        "evaluation_perplexity": evaluation.get("student", {}).get("perplexity"),
        "gguf_perplexity": [
            {**evaluation["gguf"][path.name], "file": path.name}
            for path in exported_files.get("gguf", [])
            if path.name in evaluation.get("gguf", {})
        ],
        "train": train,
        "global_step": manifest.get("global_step") or state.get("global_step"),
        "wall_time": manifest.get("wall_time_seconds"),
        "hardware": manifest.get("hardware"),
        "command": command,
        "command_note": command_note,
        "distily_version": manifest.get("distily_version") or __version__,
        "git_commit": manifest.get("git_commit"),
        "loss_curve": loss_curve,
        "config_file": RunFolder.CONFIG,
    }


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    return str(value)


def model_card(context: dict):
    """The card as a ``huggingface_hub.ModelCard``: :func:`card_data` as its front matter, the body from the
    package's Jinja template. Building it parses the front matter back (``model-index`` included), so a card the
    Hub would reject is an error here."""
    import jinja2
    from huggingface_hub import ModelCard

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("distily.export", "templates"),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.ChainableUndefined,
    )
    environment.filters["fmt"] = _fmt
    environment.filters["duration"] = lambda s: "n/a" if s is None else f"{s / 60:.1f} min ({s:,.0f} s)"
    text = environment.get_template("model_card.md.j2").render(card_data=card_data(context).to_yaml(), **context)
    return ModelCard(text)


def render_model_card(context: dict) -> str:
    """The README.md text: YAML front matter, then the body."""
    return str(model_card(context))


def parse_front_matter(text: str) -> dict:
    """The YAML between the leading ``---`` lines of a card (what the Hub reads)."""
    if not text.startswith("---\n"):
        raise ValueError("A model card starts with a '---' line of YAML front matter.")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])
