"""``distily eval``: which tasks, on which data, with which backend."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

LM_EVAL_BACKENDS = ("auto", "hf", "vllm")


@dataclass
class EvalConfig:
    """``distily eval MODEL``: perplexity on a local corpus and (with ``distily[eval]``) harness tasks.

    Unset data fields default to the values of the run in MODEL (its saved config), so a run is
    evaluated on exactly the split it was trained against.
    """

    tasks: str = field(
        default="perplexity",
        metadata={
            "help": "Comma-separated: 'perplexity' (on --dataset's eval split) and lm-evaluation-harness "
            "task names (need pip install 'distily[eval]'), e.g. perplexity,hellaswag,arc_easy."
        },
    )
    dataset: str | None = field(default=None, metadata={"help": "Corpus for perplexity (default: the run's)."})
    dataset_text_field: str | None = field(default=None, metadata={"help": "Text column (default: the run's)."})
    seq_len: int | None = field(default=None, metadata={"help": "Tokens per block (default: the run's, else 512)."})
    max_eval_blocks: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many blocks (default: the run's, else 64)."}
    )
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})
    include_teacher: bool = field(
        default=True, metadata={"help": "Also evaluate the run's teacher, for the model card's comparison."}
    )
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."})
    lm_eval_backend: str = field(
        default="auto",
        metadata={
            "help": "lm-eval model backend: auto (vllm on a CUDA machine with vllm installed, else hf), hf, vllm.",
            "choices": list(LM_EVAL_BACKENDS),
        },
    )
    lm_eval_limit: int | None = field(default=None, metadata={"help": "At most this many examples per task."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples for harness tasks."})
    output: str | None = field(default=None, metadata={"help": "Results file (default: MODEL/distily_eval.json)."})

    def __post_init__(self):
        if not self.task_list:
            raise ConfigError("--tasks is empty; pass perplexity and/or lm-eval task names.")
        if self.lm_eval_backend not in LM_EVAL_BACKENDS:
            raise ConfigError(
                f"--lm_eval_backend {self.lm_eval_backend!r} is not one of {', '.join(LM_EVAL_BACKENDS)}."
            )
        for name in ("seq_len", "max_eval_blocks", "batch_size", "lm_eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}.")

    @property
    def task_list(self) -> list[str]:
        return [task.strip() for task in str(self.tasks).split(",") if task.strip()]
