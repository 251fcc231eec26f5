"""The output folder of one run, and its one owner: :class:`RunFolder`.

A run folder holds, beside the student's weights and tokenizer (``save_pretrained``'s files):

* ``distily_run.json`` -- the manifest: status (running, finished, interrupted; a sweep adds failed and pruned),
  the command, the versions that produced it (:func:`distily.io.provenance`), the hardware, the teacher and, when
  the teacher is a GGUF file, its llama.cpp pre-tokenizer name (what a GGUF export of the student writes);
* ``distily_config.yaml`` -- the resolved config; :meth:`RunFolder.configs` reloads it to equal objects;
* Trainer's files: ``eval_start_results.json`` / ``eval_results.json`` / ``train_results.json``,
  ``trainer_state.json``, ``checkpoint-N/`` folders;
* ``adapter/`` (a LoRA/DoRA run's adapters; the folder itself holds the merged student), ``packed/`` (a BitNet
  run's ternary-packed student), ``export/`` (the default ``--export`` destination) and ``distily_eval.json``
  (``distily eval``'s results), ``distily_prune.json`` (a ``--student_init prune`` run: what the cut kept and
  why; its owner is :class:`distily.pruning.report.PruneReport`).

Every other module asks this class for those names; none spells them. It imports only leaves (errors, io,
config) so that the trainer, the CLI, export, evaluation and sweeps can all use it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .config import RUN_ARGUMENT_CLASSES, check_known_keys, config_to_dict, configs_from_dict, known_fields
from .errors import ConfigError, ExportError
from .evaluation_file import EVALUATION_FILE
from .io import hardware, provenance, write_json_atomic, write_yaml_atomic

logger = logging.getLogger(__name__)

RUNNING = "running"
FINISHED = "finished"
INTERRUPTED = "interrupted"  # the run raised (or was stopped with Ctrl-C) before it finished
FAILED = "failed"  # a sweep trial that raised, or whose worker died
PRUNED = "pruned"  # a sweep trial its pruner stopped
UNREADABLE = "unreadable"  # a manifest that exists but cannot be parsed


# How a checkpoint's model weights are saved: transformers' single files and PEFT adapters, or sharded indexes.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def now() -> str:
    """The local time as the manifests write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunFolder:
    """One run's output folder: its file names, its manifest and status, its checkpoints, its saved config and
    its student. A folder with no manifest is a plain model folder (``is_run`` is False); it still loads."""

    MANIFEST = "distily_run.json"
    CONFIG = "distily_config.yaml"
    EVALUATION = EVALUATION_FILE  # every evaluation adds to it: distily.evaluation_file
    TRAINER_STATE = "trainer_state.json"
    CHECKPOINT_PREFIX = "checkpoint-"
    ADAPTER_DIR = "adapter"
    PACKED_DIR = "packed"
    EXPORT_DIR = "export"
    # Trainer.save_metrics(split) writes SPLIT_results.json; the splits a run saves:
    EVAL_START, EVAL, TRAIN = "eval_start", "eval", "train"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # -- file names -----------------------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def evaluation_path(self) -> Path:
        return self.path / self.EVALUATION

    @property
    def trainer_state_path(self) -> Path:
        return self.path / self.TRAINER_STATE

    @property
    def adapter_dir(self) -> Path:
        return self.path / self.ADAPTER_DIR

    @property
    def packed_dir(self) -> Path:
        return self.path / self.PACKED_DIR

    @property
    def export_dir(self) -> Path:
        return self.path / self.EXPORT_DIR

    def results_path(self, split: str) -> Path:
        """The metrics file ``Trainer.save_metrics(split)`` writes (``eval_start``, ``eval``, ``train``)."""
        return self.path / f"{split}_results.json"

    def checkpoint_path(self, step: int) -> Path:
        return self.path / f"{self.CHECKPOINT_PREFIX}{step}"

    # -- manifest and status --------------------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, ``None`` when the folder holds no run record, ``{"status": "unreadable"}`` when broken."""
        if not self.manifest_path.is_file():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return {"status": UNREADABLE}
        return manifest if isinstance(manifest, dict) else {"status": UNREADABLE}

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest, ``{}`` for a folder with no run record."""
        return self.read_manifest() or {}

    @property
    def is_run(self) -> bool:
        """Whether distily wrote this folder (it has a manifest, readable or not)."""
        return self.manifest_path.is_file()

    @property
    def status(self) -> str | None:
        """``running``, ``finished``, ``interrupted`` (a sweep adds ``failed``, ``pruned``); None: no record.

        A run killed without a chance to record it (SIGKILL, a lost machine) stays ``running``.
        """
        manifest = self.read_manifest()
        return None if manifest is None else manifest.get("status")

    @property
    def is_finished(self) -> bool:
        return self.status == FINISHED

    @property
    def teacher(self) -> str | None:
        """The teacher the run distilled (a name, path or Hub id), from the manifest."""
        return self.manifest.get("teacher")

    @property
    def teacher_gguf_tokenizer_pre(self) -> str | None:
        """llama.cpp's pre-tokenizer name of the run's tokenizer, recorded at training time from the teacher's
        own GGUF file (None when the teacher was no GGUF file, or the run predates the record)."""
        return self.manifest.get("teacher_gguf_tokenizer_pre")

    @staticmethod
    def start_manifest(**facts: Any) -> dict[str, Any]:
        """A new run's manifest: versions, hardware, status ``running``, start time, then ``facts``."""
        return {**provenance(), "hardware": hardware(), "status": RUNNING, "started_at": now(), **facts}

    @staticmethod
    def set_status(manifest: dict[str, Any], status: str, **facts: Any) -> dict[str, Any]:
        """``manifest`` with ``status``, the time of the change (``finished_at``, ...) and ``facts``."""
        manifest.update(status=status, **{f"{status}_at": now()}, **facts)
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest)

    def update_manifest(self, **updates: Any) -> bool:
        """Merge ``updates`` into the manifest (creating it in an existing folder). False: no such folder."""
        if not self.path.is_dir():
            return False
        manifest = self.read_manifest()
        if manifest is None or manifest.get("status") == UNREADABLE:
            manifest = {}
        manifest.update(updates)
        self.write_manifest(manifest)
        return True

    def require_finished(self) -> None:
        """Refuse to export a run that did not finish (a folder with no run record is a plain model: fine)."""
        status = self.status
        if status is not None and status != FINISHED:
            raise ExportError(
                f"The run in {str(self.path)!r} is not finished (status {status!r}); its weights may be from an "
                "earlier save. Finish or resume it before exporting: rerun its command with "
                "--resume_from_checkpoint true (or --overwrite_output_dir true to start again), then export."
            )

    # -- results and the saved config -----------------------------------------------------------------------------

    def _json(self, path: Path) -> dict[str, Any]:
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def results(self, split: str) -> dict[str, Any]:
        """The metrics the run saved for ``split`` (``{}`` if none)."""
        return self._json(self.results_path(split))

    def trainer_state(self) -> dict[str, Any]:
        return self._json(self.trainer_state_path)

    def evaluation(self) -> dict[str, Any]:
        """``distily eval``'s results for this folder (``{}`` if it was not run)."""
        return self._json(self.evaluation_path)

    def write_config(self, *configs) -> None:
        """Save the run's resolved dataclasses (no secrets) as one flat YAML mapping."""
        write_yaml_atomic(self.config_path, config_to_dict(*configs))

    def saved_config(self) -> dict[str, Any]:
        """The saved config as the flat mapping in the file (``{}`` when there is none or it is unreadable)."""
        import yaml

        try:
            values = yaml.safe_load(self.config_path.read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return values if isinstance(values, dict) else {}

    def configs(self, classes=RUN_ARGUMENT_CLASSES) -> tuple:
        """The run's config dataclasses (``classes``, default all of a run's) rebuilt from the saved YAML.

        Every saved key must be a field of this version's run dataclasses; only the fields of ``classes`` are
        used, so ``configs((DataArguments,))`` needs no training arguments to be valid on this machine.
        """
        if not self.config_path.is_file():
            raise ConfigError(f"{str(self.path)!r} holds no saved config ({self.CONFIG}): not a distily run folder.")
        values = self.saved_config()
        source = f"The saved config {str(self.config_path)!r}"
        check_known_keys(values, source)
        wanted = known_fields(classes)
        return configs_from_dict({k: v for k, v in values.items() if k in wanted}, classes, source)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """``checkpoint-N`` folders, oldest first (complete or not)."""
        prefix = self.CHECKPOINT_PREFIX
        found = [p for p in self.path.glob(f"{prefix}*") if p.is_dir() and p.name[len(prefix) :].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(prefix) :]))

    @staticmethod
    def has_weights(path: str | os.PathLike) -> bool:
        """Whether the folder holds a whole set of model weights: a single weights file (full or PEFT adapter),
        a sharded index whose every shard exists, FSDP's sharded state or a DeepSpeed checkpoint (its ``latest``
        tag is written last). Other ``.bin`` files (``training_args.bin``) are not weights."""
        path = Path(path)
        if any((path / name).is_file() for name in WEIGHT_FILES):
            return True
        for name in WEIGHT_INDEXES:
            if (path / name).is_file():
                try:
                    shards = set(json.loads((path / name).read_text())["weight_map"].values())
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    return False
                return bool(shards) and all((path / shard).is_file() for shard in shards)
        if (path / "latest").is_file():
            return True
        return path.is_dir() and any(child.name.startswith("pytorch_model_fsdp") for child in path.iterdir())

    @staticmethod
    def is_complete_checkpoint(path: str | os.PathLike) -> bool:
        """A checkpoint can be resumed from only if its model weights and then its trainer state (Trainer writes
        it last) were fully written."""
        path = Path(path)
        return (path / RunFolder.TRAINER_STATE).is_file() and RunFolder.has_weights(path)

    def latest_checkpoint(self) -> Path | None:
        """The newest *complete* checkpoint (the one rule for "the latest", used by the CLI and the trainer);
        newer incomplete ones (a save killed midway) are skipped with a warning. None if there is none."""
        found = self.checkpoints()
        complete = [p for p in found if self.is_complete_checkpoint(p)]
        if not complete:
            return None
        skipped = [p.name for p in found[found.index(complete[-1]) + 1 :]]
        if skipped:
            logger.warning("Skipping incomplete checkpoints %s.", skipped)
        return complete[-1]

    def resume_checkpoint(self, resume: str | bool | None) -> Path | None:
        """``--resume_from_checkpoint`` (a checkpoint path, or ``true`` for this run's latest) as a complete
        checkpoint, or None for a fresh start. Refuses a folder that is not a distily run, a run with no
        complete checkpoint, and a named checkpoint that is incomplete."""
        if resume is None or resume is False or str(resume).lower() in ("", "false", "no", "none"):
            return None
        if resume is True or str(resume).lower() in ("true", "yes", "latest", "last"):
            if self.path.is_dir() and any(self.path.iterdir()) and not self.is_run:
                raise ConfigError(
                    f"{str(self.path)!r} is not a distily run folder (no {self.MANIFEST}); cannot resume there. "
                    "Point --output_dir at the run to continue, or start a new run without --resume_from_checkpoint."
                )
            latest = self.latest_checkpoint()
            if latest is None:
                raise ConfigError(
                    f"--resume_from_checkpoint true: no complete checkpoint in {str(self.path)!r}. Start a new run "
                    "without --resume_from_checkpoint, or point it at a checkpoint folder."
                )
            return latest
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"--resume_from_checkpoint {resume!r} does not exist. Pass a checkpoint folder or 'true'."
            )
        if not self.is_complete_checkpoint(path):
            valid = [p.name for p in RunFolder(path.parent).checkpoints() if self.is_complete_checkpoint(p)]
            raise ConfigError(
                f"Checkpoint {resume!r} is incomplete (needs {self.TRAINER_STATE} and model weights; the save was "
                f"probably interrupted). Complete checkpoints beside it: {valid or 'none'}; or pass "
                "--resume_from_checkpoint true for the latest complete one."
            )
        return path

    # -- starting over --------------------------------------------------------------------------------------------

    def check_writable(self, resuming: bool, overwrite: bool) -> None:
        """Refuse to write over a finished run (or a folder that is not a distily run) unless asked to."""
        if not self.path.exists() or not any(self.path.iterdir()):
            return
        manifest = self.read_manifest()
        if resuming:
            if manifest is None:
                raise ConfigError(f"{str(self.path)!r} is not a distily run folder; cannot resume there.")
            return
        if manifest is None:
            raise ConfigError(
                f"Output folder {str(self.path)!r} is not empty and holds no distily run. Choose another "
                "--output_dir (distily only replaces folders it wrote)."
            )
        if overwrite:
            logger.warning("Replacing the previous run in %s (--overwrite_output_dir).", self.path)
            return
        if manifest.get("status") == FINISHED:
            raise ConfigError(
                f"Output folder {str(self.path)!r} holds a finished run (finished "
                f"{manifest.get('finished_at', '?')}). Pass --overwrite_output_dir to replace it, or choose another "
                "--output_dir."
            )
        raise ConfigError(
            f"Output folder {str(self.path)!r} holds an unfinished run. Continue it with --resume_from_checkpoint "
            "true, replace it with --overwrite_output_dir, or choose another --output_dir."
        )

    def clear(self) -> None:
        """Remove a previous distily run (only after :meth:`check_writable` approved the overwrite)."""
        if self.path.exists() and self.is_run:
            shutil.rmtree(self.path)

    def drop_weights(self) -> None:
        """Remove the model weights and checkpoints, keeping the config, metrics and logs (a sweep's spent trial)."""
        for path in self.path.glob("*.safetensors"):
            path.unlink()
        for path in self.path.glob(f"{self.CHECKPOINT_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    # -- the student ----------------------------------------------------------------------------------------------

    def load_student(self, packed: bool = False):
        """The run's student (or any causal-LM folder's model) in float32 and eval mode, with its tokenizer.

        * A run folder holds the finished student as ``save_pretrained`` wrote it: a LoRA/DoRA run's adapters
          were merged once, when it was saved (:func:`distily.lora.save_student`), and a BitNet run's folder
          holds its latent weights (``packed=True`` loads the ternary-packed ``packed/`` folder instead).
        * A folder holding only a PEFT adapter (``adapter_config.json``) is merged into its base weights here,
          by the same function (:func:`distily.modeling.merge_adapter`), so every caller gets a plain model.

        This is the one place exports and evaluations load a student.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = self.path
        if packed:
            folder = self.packed_dir
            if not (folder / "config.json").is_file():
                raise ExportError(
                    f"{str(self.path)!r} has no packed student ({self.PACKED_DIR}/): only BitNet runs write one."
                )
        if (folder / "adapter_config.json").is_file():
            from .modeling import merge_adapter

            model = merge_adapter(folder, dtype=torch.float32)
        elif (folder / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            raise ExportError(
                f"{str(folder)!r} holds no model (no config.json or adapter_config.json). Pass a finished distily "
                "run folder or a transformers model folder."
            )
        model.eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise ExportError(
                f"{str(folder)!r} has no loadable tokenizer ({err}); exports ship the tokenizer."
            ) from err
        return model, tokenizer
