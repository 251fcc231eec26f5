"""Structured pruning's settings: the target shape, the calibration data and the scores (``distily prune``,
``--student_init prune``). Checks that need the teacher's config happen in :mod:`distily.pruning.plan`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .parsing import parse_json_dict

# The sizes a pruned model may cut (Llama names; GPT-2's n_layer, n_embd, n_head, n_inner are accepted too).
PRUNE_TARGET_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
TARGET_ALIASES = {
    "n_layer": "num_hidden_layers",
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_inner": "intermediate_size",
}
# How per-token activations are reduced over batch and sequence: mean, chosen by benchmarks/prune_vs_init.py (the
# 50 % cut start's perplexity on 16 train-split blocks outside the calibration set: mean 282.9, l2 287.3,
# variance 855.5; RESULTS.md, "Structured pruning").
AGGREGATIONS = ("mean", "l2", "variance")
DEFAULT_AGGREGATION = "mean"
# Which layer score depth pruning ranks by: block importance (1 - cos(input, output)) or the LM-loss increase
# when the layer is skipped. drop_loss, chosen the same way (510.7 against 2,506.3 for block importance).
LAYER_SCORES = ("block_importance", "drop_loss")
DEFAULT_LAYER_SCORE = "drop_loss"
# Train-split blocks the scores are measured on (58 s for all scores of the embedded teacher at 128 tokens). The
# units kept at 32 blocks agree with those at 4x the blocks: 95 % of layers, 96 % of query heads, 98 % of
# neurons and channels at the 50 % budget.
DEFAULT_CALIBRATION_BLOCKS = 32
# Fewer tokens than this cannot rank anything: one block of 256 tokens is the least distily accepts.
MIN_CALIBRATION_TOKENS = 256
# Blocks (of the calibration ones) the drop-loss layer score is measured on: it runs the rest of the model once
# per layer, about L/2 forward passes, so it uses a subset.
DEFAULT_LAYER_LOSS_BLOCKS = 8


def normalise_target(target, flag: str) -> dict[str, int]:
    """A target shape as ``{canonical key: whole number ≥ 1}``; unknown keys and bad values are errors."""
    target = parse_json_dict(target, flag.lstrip("-"), '{"num_hidden_layers": 20, "intermediate_size": 1024}') or {}
    result: dict[str, int] = {}
    for key, value in target.items():
        canonical = TARGET_ALIASES.get(key, key)
        if canonical not in PRUNE_TARGET_KEYS:
            raise ConfigError(
                f"{flag}: {key!r} is not a size pruning can cut. Use any of {', '.join(PRUNE_TARGET_KEYS)} "
                f"(GPT-2's {', '.join(TARGET_ALIASES)} are accepted too); the other fields stay the teacher's."
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag}: {key} must be a whole number ≥ 1, got {value!r}.")
        result[canonical] = value
    return result


def check_calibration_blocks(blocks, flag: str = "--calibration_blocks") -> None:
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ConfigError(f"{flag} must be a whole number ≥ 1 (default {DEFAULT_CALIBRATION_BLOCKS}), got {blocks!r}.")


def check_prune_student_config(student_config: dict | None, calibration_blocks: int) -> None:
    """``--student_init prune``: ``--student_config`` holds only target keys (and ``bitnet``)."""
    check_calibration_blocks(calibration_blocks)
    target = {key: value for key, value in (student_config or {}).items() if key != "bitnet"}
    normalise_target(target, "--student_config (with --student_init prune)")


@dataclass
class PruneArguments:
    """``distily prune``: the target shape, the calibration blocks, the scores and where the pruned model goes."""

    target: dict | str | None = field(
        default=None,
        metadata={
            "help": 'JSON object of the sizes to prune to, e.g. \'{"num_hidden_layers": 20, "hidden_size": 448}\'. '
            f"Keys: {', '.join(PRUNE_TARGET_KEYS)}; the rest stay the teacher's."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder to write the pruned model into."})
    calibration_blocks: int = field(
        default=DEFAULT_CALIBRATION_BLOCKS,
        metadata={"help": "Train-split blocks (of --seq_len tokens) the importance scores are measured on."},
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per calibration block (the training --seq_len)."})
    seed: int = field(default=42, metadata={"help": "Seed of the calibration-block sample."})
    aggregation: str = field(
        default=DEFAULT_AGGREGATION,
        metadata={
            "help": "How activations are reduced over batch and sequence: mean (of |a|), l2 (root mean square) or "
            "variance.",
            "choices": list(AGGREGATIONS),
        },
    )
    layer_score: str = field(
        default=DEFAULT_LAYER_SCORE,
        metadata={
            "help": "Depth pruning keeps the layers scoring highest by block_importance (1 - cos(input, output)) "
            "or drop_loss (LM-loss increase when the layer is skipped).",
            "choices": list(LAYER_SCORES),
        },
    )
    layer_loss_blocks: int = field(
        default=DEFAULT_LAYER_LOSS_BLOCKS,
        metadata={"help": "Calibration blocks the drop_loss layer score is measured on (it costs ~L/2 passes)."},
    )
    batch_size: int = field(default=4, metadata={"help": "Calibration blocks per forward pass."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def __post_init__(self):
        self.target = normalise_target(self.target, "--target")
        if not self.target:
            raise ConfigError(
                "--target is required: a JSON object of the sizes to prune to, e.g. --target "
                '\'{"num_hidden_layers": 20, "intermediate_size": 1024}\'.'
            )
        if not self.output_dir:
            raise ConfigError("--output_dir is required: the folder to write the pruned model into.")
        check_calibration_blocks(self.calibration_blocks)
        for name in ("layer_loss_blocks", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a whole number ≥ 1, got {value!r}.")
        if self.seq_len < 2:
            raise ConfigError(f"--seq_len must be at least 2 tokens, got {self.seq_len}.")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"--aggregation {self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}.")
        if self.layer_score not in LAYER_SCORES:
            raise ConfigError(f"--layer_score {self.layer_score!r} is not one of {', '.join(LAYER_SCORES)}.")
