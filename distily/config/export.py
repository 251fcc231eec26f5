"""What to export: the formats and weight type, at the end of training or with ``distily export``.

Which outtypes a format can store is the export's own knowledge (``distily.export.outtypes``, which also knows the
registered GGUF types); it is checked by ``distily.export.check_exportable`` before training starts, and by
``distily.export.export``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

EXPORT_FORMATS = ("safetensors", "gguf")


def parse_formats(value: str | list[str] | None, flag: str) -> list[str]:
    """``"safetensors,gguf"`` (or a list) as a checked list of export formats."""
    if value is None or value == "" or value == []:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    formats = [item.strip() for item in items if item.strip()]
    unknown = [item for item in formats if item not in EXPORT_FORMATS]
    if unknown:
        raise ConfigError(f"--{flag} {unknown} is not a known format; choose from {', '.join(EXPORT_FORMATS)}.")
    return list(dict.fromkeys(formats))


@dataclass
class ExportArguments:
    """Export at the end of training (``distily train --export safetensors,gguf``): the training command's flags
    for an export, turned into the one :class:`ExportConfig` by :meth:`export_config`."""

    export: str | None = field(
        default=None,
        metadata={"help": "Formats to export after training, comma-separated: safetensors, gguf. Default: none."},
    )
    export_outtype: str | None = field(
        default=None,
        metadata={
            "help": "Weight type of the export: f32, f16, bf16 or (GGUF only) q8_0, tq2_0, tq1_0 (BitNet). "
            "Default: f32 for safetensors, f16 for GGUF."
        },
    )
    export_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the export (weights, tokenizer, model card). Default: OUTPUT_DIR/export."},
    )
    export_push_to_hub: bool = field(
        default=False,
        metadata={
            "help": "Upload the export folder to the Hub as --hub_model_id (private unless --hub_private_repo "
            "false). Off by default: nothing leaves the machine unless asked. Trainer's own --push_to_hub "
            "(checkpoints) is a separate switch."
        },
    )
    export_license: str = field(
        default="openrail", metadata={"help": "License in the model card's metadata (a Hub license id)."}
    )

    def __post_init__(self):
        formats = parse_formats(self.export, "export")
        if self.export_push_to_hub and not formats:
            raise ConfigError("--export_push_to_hub needs something to push: add --export safetensors (and/or gguf).")

    @property
    def formats(self) -> list[str]:
        return parse_formats(self.export, "export")

    def export_config(
        self,
        output_dir: str,
        default_dir: str,
        *,
        overwrite_output_dir: bool = False,
        hub_model_id: str | None = None,
        hub_private: bool = True,
        hub_token: str | None = None,
    ) -> ExportConfig:
        """The one description of an export (the ``distily export`` config) that these training flags ask for.

        ``default_dir`` is the run's own export folder (``RunFolder.export_dir``): it belongs to the run and is
        replaced with it; a folder elsewhere is replaced only with --overwrite_output_dir. The Hub settings are
        Trainer's (--hub_model_id, --hub_private_repo, --hub_token).
        """
        from pathlib import Path

        destination = Path(self.export_dir) if self.export_dir else Path(default_dir)
        inside_run = destination.resolve().is_relative_to(Path(output_dir).resolve())
        return ExportConfig(
            format=",".join(self.formats),
            outtype=self.export_outtype,
            output=str(destination),
            overwrite=inside_run or overwrite_output_dir,
            license=self.export_license,
            push_to_hub=self.export_push_to_hub,
            hub_model_id=hub_model_id,
            hub_private=hub_private,
            hub_token=hub_token,
        )


@dataclass
class ExportConfig:
    """One export: formats, weight type, destination and the opt-in Hub upload. ``distily export RUN_DIR`` parses
    it from its flags; ``distily train --export ...`` builds it with :meth:`ExportArguments.export_config`."""

    format: str = field(
        default="safetensors", metadata={"help": "Comma-separated formats: safetensors, gguf (e.g. safetensors,gguf)."}
    )
    outtype: str | None = field(
        default=None,
        metadata={
            "help": "Weight type: f32, f16, bf16 or (GGUF only) q8_0, tq2_0, tq1_0 (BitNet students). Default: f32 for "
            "safetensors, f16 for GGUF."
        },
    )
    output: str | None = field(
        default=None,
        metadata={"help": "Export folder (default RUN_DIR/export), or a .gguf file path for a lone GGUF file."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing export at --output."})
    name: str | None = field(
        default=None, metadata={"help": "Model name (card title, GGUF name). Default: folder name."}
    )
    license: str = field(default="openrail", metadata={"help": "License in the model card's metadata."})
    gguf_tokenizer_pre: str | None = field(
        default=None,
        metadata={"help": "llama.cpp pre-tokenizer name to write (gpt-2, llama-bpe, smollm, ...). Default: detected."},
    )
    model_card: bool = field(default=True, metadata={"help": "Write README.md (model card) and loss_curve.png."})
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Upload the export folder to the Hub (opt-in; nothing leaves the machine otherwise)."},
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub: user/name."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub repository as private (default)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})

    def __post_init__(self):
        formats = parse_formats(self.format, "format")
        if not formats:
            raise ConfigError("--format is empty; choose safetensors, gguf or safetensors,gguf.")
        if self.output and str(self.output).endswith(".gguf") and formats != ["gguf"]:
            raise ConfigError(f"--output {self.output!r} is a .gguf file: use --format gguf, or give a folder.")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id user/name.")
        if self.push_to_hub and self.output and str(self.output).endswith(".gguf"):
            raise ConfigError("--push_to_hub uploads an export folder: give --output a folder, not a .gguf file.")

    @property
    def formats(self) -> list[str]:
        return parse_formats(self.format, "format")
