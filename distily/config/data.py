"""The training corpus and how it is split and packed."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class DataArguments:
    """The training corpus. ``python-stdlib`` is built in and always available offline."""

    dataset: str = field(
        default="python-stdlib",
        metadata={
            "help": "'python-stdlib' (built in), a Hub dataset name, a folder saved with save_to_disk, data "
            "files (.json/.jsonl/.parquet/.csv/.txt, comma-separated or a glob; one .txt file is split into "
            "paragraphs), a folder of text/code files, or a `distily synth` output folder."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    dataset_eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split used for evaluation. Default: 'validation', 'eval' or 'test' if the dataset has "
            "one, else a deterministic hold-out of --eval_fraction of the documents (by content hash)."
        },
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Share of documents held out for evaluation when there is no eval split (by the hash of each "
            "document, or of each file's path for a folder). A folder of 2 or more files always gets files on "
            "both sides: if the hashes leave one side empty, the file closest to it moves there (logged)."
        },
    )
    max_train_blocks: int | None = field(
        default=None, metadata={"help": "Use at most this many packed training blocks (after a seeded shuffle)."}
    )
    max_eval_blocks: int | None = field(
        default=64,
        metadata={"help": "Evaluate on at most this many packed blocks (a fixed sample, the same in every run)."},
    )
    prompt_loss: bool = field(
        default=False,
        metadata={
            "help": "For prompt/completion data (a `distily synth` folder): also train on the prompt tokens. "
            "Default: the loss covers only the teacher's completions."
        },
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "Where datasets caches tokenised blocks (default: HF_DATASETS_CACHE)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to tokenise (default: one)."}
    )

    def __post_init__(self):
        if not self.dataset or not str(self.dataset).strip():
            raise ConfigError("--dataset is empty. Name a dataset, e.g. --dataset python-stdlib.")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"--eval_fraction must be in (0, 1), got {self.eval_fraction}.")
        for name in ("max_train_blocks", "max_eval_blocks", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1 (or unset), got {value}.")
