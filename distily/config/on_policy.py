"""On-policy distillation fields (GKD, DistiLLM), joined into ``DistillationConfig`` as a mixin.

``lmbda`` is the probability that a micro-batch is replaced by the student's own samples (prompt + completion,
the loss on the completion only); ``seq_kd`` replaces the other batches by the teacher's samples (GKD's supervised
variant). The prompts come from the first ``prompt_len`` tokens of each training block, or from ``prompts`` (a
file of chat prompts or a ``distily synth`` folder). ``replay_buffer_size``/``replay_ratio`` reuse earlier student
samples (DistiLLM's off-policy replay). See docs/on_policy.md.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

GENERATION_BACKENDS = ("transformers", "vllm")
# The divergence of a run that samples (lmbda > 0 or seq_kd) and does not name --loss: measured in
# benchmarks/on_policy.py (benchmarks/RESULTS.md, "On-policy distillation"), see docs/on_policy.md.
ON_POLICY_DEFAULT_LOSS = "forward_kl"
# The divergence of every other run that does not name --loss.
OFF_POLICY_DEFAULT_LOSS = "forward_kl"
ON_POLICY_FIELDS = (
    "lmbda",
    "seq_kd",
    "max_new_tokens",
    "generation_temperature",
    "generation_top_p",
    "prompt_len",
    "prompts",
    "replay_buffer_size",
    "replay_ratio",
    "generation_backend",
    "vllm_sync_steps",
    "vllm_gpu_memory_utilization",
)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class OnPolicyArguments:
    """Sampling the training sequences from the student (``lmbda``) or the teacher (``seq_kd``)."""

    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Probability in [0, 1] that a training micro-batch is the student's own samples (on-policy, "
            "GKD): prompts from --prompt_len or --prompts, completions sampled by the student, scored by the "
            "teacher token by token, the loss on the completion tokens only. 0 (default): today's training."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Replace the batches that are not on-policy by the teacher's samples of the same prompts "
            "(sequence-level KD, GKD's supervised variant)."
        },
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per completion (at most)."})
    generation_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the completions (0: greedy)."}
    )
    generation_top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this much mass."}
    )
    prompt_len: int = field(
        default=0,
        metadata={
            "help": "Prompts are the first N tokens of each training block (code and text corpora). 0: use "
            "--prompts instead."
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Chat prompts for sampling, rendered with the tokenizer's chat template: a .jsonl file (rows "
            "with 'messages' or 'prompt'), a .txt file (one prompt per line) or a `distily synth` folder."
        },
    )
    replay_buffer_size: int = field(
        default=0,
        metadata={
            "help": "Keep the last N student samples (per process) for reuse by later on-policy batches "
            "(DistiLLM's off-policy replay); saved in checkpoints. 0: no replay."
        },
    )
    replay_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Probability in [0, 1) that an on-policy batch is drawn from the replay buffer instead of "
            "sampled afresh (once the buffer holds a batch): higher is faster, staler."
        },
    )
    generation_backend: str = field(
        default="transformers",
        metadata={
            "help": "Engine that samples the completions: transformers (generate with KV cache, CPU or GPU) or "
            "vllm (colocated on the GPU; pip install 'distily[gpu]').",
            "choices": list(GENERATION_BACKENDS),
        },
    )
    vllm_sync_steps: int = field(
        default=1, metadata={"help": "Push the student's weights to vLLM every N optimizer steps."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "Share of the GPU's memory vLLM may take beside the training (colocated)."},
    )

    @property
    def samples_sequences(self) -> bool:
        """Whether any training batch is generated (student samples or teacher samples)."""
        return self.lmbda > 0 or bool(self.seq_kd)

    def validate_on_policy(self) -> None:
        """The on-policy fields, checked alone and against ``seq_len``, ``alpha`` and ``teacher_cache``; resolves
        an unset ``loss`` (``None``) to the on-policy or the off-policy default divergence."""
        if not _is_number(self.lmbda) or not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(
                f"--lmbda must be a probability in [0, 1] (the share of on-policy batches), got {self.lmbda!r}. "
                "Use 0 for off-policy training, 1 for fully on-policy, 0.5 to mix."
            )
        if getattr(self, "loss", None) is None:
            self.loss = ON_POLICY_DEFAULT_LOSS if self.samples_sequences else OFF_POLICY_DEFAULT_LOSS
        if not _is_count(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ConfigError(f"--max_new_tokens must be a whole number > 0, got {self.max_new_tokens!r}. Try 64.")
        if not _is_number(self.generation_temperature) or self.generation_temperature < 0:
            raise ConfigError(
                f"--generation_temperature must be a number >= 0 (0: greedy), got {self.generation_temperature!r}."
            )
        if not _is_number(self.generation_top_p) or not 0.0 < self.generation_top_p <= 1.0:
            raise ConfigError(f"--generation_top_p must be in (0, 1], got {self.generation_top_p!r}. Try 1.0 or 0.95.")
        if not _is_count(self.prompt_len) or self.prompt_len < 0:
            raise ConfigError(f"--prompt_len must be a whole number of tokens >= 0, got {self.prompt_len!r}.")
        seq_len = getattr(self, "seq_len", None)
        if seq_len is not None and self.prompt_len >= seq_len:
            raise ConfigError(
                f"--prompt_len {self.prompt_len} must be shorter than --seq_len {seq_len}: the prompt is the start "
                "of a training block. Lower --prompt_len (e.g. 128) or raise --seq_len."
            )
        if self.prompts is not None and not str(self.prompts).strip():
            self.prompts = None
        if self.generation_backend not in GENERATION_BACKENDS:
            raise ConfigError(
                f"--generation_backend {self.generation_backend!r} is not one of {', '.join(GENERATION_BACKENDS)}."
            )
        if not _is_count(self.replay_buffer_size) or self.replay_buffer_size < 0:
            raise ConfigError(f"--replay_buffer_size must be a whole number >= 0, got {self.replay_buffer_size!r}.")
        if not _is_number(self.replay_ratio) or not 0.0 <= self.replay_ratio < 1.0:
            raise ConfigError(
                f"--replay_ratio must be in [0, 1) (the share of on-policy batches drawn from the buffer), got "
                f"{self.replay_ratio!r}."
            )
        if self.replay_ratio > 0 and self.replay_buffer_size == 0:
            raise ConfigError("--replay_ratio > 0 needs a buffer: set --replay_buffer_size (e.g. 64).")
        if not _is_count(self.vllm_sync_steps) or self.vllm_sync_steps < 1:
            raise ConfigError(f"--vllm_sync_steps must be a whole number >= 1, got {self.vllm_sync_steps!r}.")
        if not _is_number(self.vllm_gpu_memory_utilization) or not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ConfigError(
                f"--vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization!r}."
            )
        if not self.samples_sequences:
            return
        self._validate_sampling_run()

    def _validate_sampling_run(self) -> None:
        """The checks of a run that generates its training sequences."""
        if getattr(self, "teacher_cache", None):
            raise ConfigError(
                "--lmbda > 0 / --seq_kd sample new sequences, and a recorded teacher (--teacher_cache) holds "
                "scores for the recorded blocks only: it cannot score new sequences. Use a live --teacher, or "
                "--lmbda 0 without --seq_kd."
            )
        if (self.prompt_len > 0) == (self.prompts is not None):
            raise ConfigError(
                "On-policy training needs one prompt source: --prompt_len N (the first N tokens of each training "
                "block) or --prompts FILE (chat prompts), not "
                + ("both." if self.prompts is not None else "neither. Try --prompt_len 128.")
            )
        if self.prompts is not None and not Path(self.prompts).exists():
            raise ConfigError(f"--prompts {self.prompts!r} does not exist. Pass a .jsonl/.txt file or a synth folder.")
        if self.lmbda > 0 and getattr(self, "alpha", 1.0) < 1.0:
            raise ConfigError(
                f"--alpha {self.alpha} weights cross-entropy on the labels, and with --lmbda > 0 the labels of an "
                "on-policy batch are the student's own samples (it would learn to repeat itself). Set --alpha 1."
            )
        if self.generation_backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "--generation_backend vllm needs vLLM: pip install 'distily[gpu]' (CUDA machines only), or use "
                "--generation_backend transformers."
            )
