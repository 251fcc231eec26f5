"""Per micro-batch: keep the data, or replace it by the student's samples, replayed samples or the teacher's.

Every decision and every sample is seeded by ``(seed, optimizer step, micro-batch, process)`` alone
(:func:`step_seed`), so a run resumed from a checkpoint draws the same batches as an uninterrupted one; the only
state carried from step to step, the replay buffer, is saved in every checkpoint (:meth:`OnPolicySampler.save`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..errors import ConfigError
from ..run_folder import RunFolder
from .batch import completion_batch
from .engines import GenerationEngine, SamplingSettings, TransformersEngine, build_engine
from .prompts import PromptSource, build_prompt_source
from .replay import ReplayBuffer

REPLAY_FILE = "replay_buffer-rank{rank}.json"
# Where each sampled batch came from, in the logs' shares.
SOURCES = ("data", "student", "replay", "teacher")
_MASK = (1 << 63) - 1


def step_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 on each part): distinct tuples give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
        state = state * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & _MASK


class OnPolicySampler:
    """Replaces micro-batches by sampled ones: with probability ``lmbda`` the student's samples (or, with
    probability ``replay_ratio`` once the buffer holds a batch, samples replayed from it), else with ``seq_kd``
    the teacher's samples, else the data batch itself (the same object: ``lmbda 0`` is exactly today's run).

    The coin of each micro-batch depends on ``(seed, step, micro)`` only, so under DDP every process takes the
    same kind of batch at the same step (their work stays balanced); the samples also depend on the process.
    """

    def __init__(
        self,
        args,
        prompts: PromptSource,
        student: GenerationEngine | None,
        teacher: GenerationEngine | None,
        pad_token_id: int,
        rank: int = 0,
    ):
        self.lmbda = args.lmbda
        self.seq_kd = args.seq_kd
        self.replay_ratio = args.replay_ratio
        self.seed = args.seed
        self.prompts = prompts
        self.student = student
        self.teacher = teacher
        self.pad_token_id = pad_token_id
        self.rank = rank
        self.eos_token_ids = (student or teacher).settings.eos_token_ids
        self.buffer = ReplayBuffer(args.replay_buffer_size) if args.replay_buffer_size > 0 else None
        self._logs: dict[str, float] = defaultdict(float)

    # -- one step's batches ---------------------------------------------------------------------------------------

    def batches(self, iterator: Iterator[dict], step: int, micro_batches: int) -> Iterator[dict]:
        """``iterator``'s batches for optimizer step ``step`` (0-based), each passed through :meth:`batch`."""
        for micro, inputs in enumerate(iterator):
            yield self.batch(inputs, step, micro, micro_batches)
            if micro + 1 >= micro_batches:
                return

    def batch(self, inputs: dict[str, torch.Tensor], step: int, micro: int, micro_batches: int = 1) -> dict:
        """The batch that replaces ``inputs``, micro-batch ``micro`` of optimizer step ``step``."""
        coins = torch.rand(2, generator=torch.Generator().manual_seed(step_seed(self.seed, step, micro)))
        draw = step * micro_batches + micro
        source = "data"
        if coins[0] < self.lmbda:
            source = "replay" if self._replays(inputs, coins[1]) else "student"
        elif self.seq_kd:
            source = "teacher"
        if source == "data":
            self._count("data", inputs["labels"][:, 1:].ne(-100).sum())
            return inputs
        started = time.perf_counter()
        seed = step_seed(self.seed, step, micro, self.rank)
        if source == "replay":
            prompts, completions = self.buffer.sample(inputs["input_ids"].shape[0], torch.Generator().manual_seed(seed))
        else:
            prompts = self.prompts.prompts(inputs, draw)
            engine = self.student if source == "student" else self.teacher
            completions = engine.generate(prompts, seed)
            self._logs["generation_seconds"] += time.perf_counter() - started
            self._logs["completions"] += len(completions)
            self._logs["completion_tokens"] += sum(len(c) for c in completions)
            self._logs["eos"] += sum(bool(c) and c[-1] in self.eos_token_ids for c in completions)
            if source == "student" and self.buffer is not None:
                self.buffer.add(prompts, completions)
        batch = completion_batch(prompts, completions, self.pad_token_id, inputs["input_ids"].device)
        self._count(source, batch["labels"][:, 1:].ne(-100).sum())
        return batch

    def _replays(self, inputs: dict[str, torch.Tensor], coin: torch.Tensor) -> bool:
        return self.buffer is not None and len(self.buffer) >= inputs["input_ids"].shape[0] and coin < self.replay_ratio

    def _count(self, source: str, tokens: torch.Tensor) -> None:
        self._logs[f"tokens_{source}"] += float(tokens)
        self._logs[f"batches_{source}"] += 1

    # -- logs -----------------------------------------------------------------------------------------------------

    def pop_logs(self, steps: int) -> dict[str, float]:
        """The log entries since the last call, over ``steps`` optimizer steps:

        ``on_policy_fraction`` (share of the loss tokens from student samples, fresh or replayed),
        ``replay_fraction`` (share of the on-policy batches taken from the buffer), ``generation_seconds`` (per
        optimizer step), ``completion_length`` (mean tokens per sampled completion) and ``eos_rate`` (share of
        sampled completions that ended with EOS, not at ``max_new_tokens``)."""
        logs, self._logs = self._logs, defaultdict(float)
        tokens = sum(logs[f"tokens_{s}"] for s in SOURCES)
        on_policy_batches = logs["batches_student"] + logs["batches_replay"]
        out = {
            "on_policy_fraction": (logs["tokens_student"] + logs["tokens_replay"]) / tokens if tokens else 0.0,
            "generation_seconds": logs["generation_seconds"] / max(steps, 1),
        }
        if self.buffer is not None:
            out["replay_fraction"] = logs["batches_replay"] / on_policy_batches if on_policy_batches else 0.0
        if self.seq_kd:
            out["teacher_sample_fraction"] = logs["tokens_teacher"] / tokens if tokens else 0.0
        if logs["completions"]:
            out["completion_length"] = logs["completion_tokens"] / logs["completions"]
            out["eos_rate"] = logs["eos"] / logs["completions"]
        return {name: float(f"{value:.6g}") for name, value in out.items()}

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save(self, checkpoint: Path) -> None:
        """This process's replay buffer into ``checkpoint`` (nothing to save without one)."""
        if self.buffer is not None:
            self.buffer.save(Path(checkpoint) / REPLAY_FILE.format(rank=self.rank))

    def load(self, checkpoint: Path) -> None:
        """The replay buffer saved in ``checkpoint`` by this process's rank (an error if a buffer is missing)."""
        if self.buffer is None:
            return
        path = Path(checkpoint) / REPLAY_FILE.format(rank=self.rank)
        if not path.is_file():
            raise ConfigError(
                f"Resuming with --replay_buffer_size needs the replay buffer, but {str(path)!r} does not exist: the "
                "checkpoint was saved without replay or by a different number of processes. Resume with the same "
                "flags, or start a new run."
            )
        self.buffer.load(path)


class OnPolicyCallback(TrainerCallback):
    """Saves the sampler's replay buffer in every checkpoint folder and, after each optimizer step, lets the
    student's engine catch up with the new weights (vLLM's copy; the transformers engine reads the live model)."""

    def __init__(self, sampler: OnPolicySampler, student):
        self.sampler = sampler
        self.student = student  # a callable returning the current, unwrapped student

    def on_step_end(self, args, state, control, **kwargs):
        if self.sampler.student is not None:
            self.sampler.student.sync(self.student(), state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.sampler.save(RunFolder(args.output_dir).checkpoint_path(state.global_step))


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The end-of-sequence ids of ``model``'s generation config (the chat models' end-of-turn tokens included),
    else of its config, else the tokenizer's."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
    return ()


def build_sampler(args, student, teacher, tokenizer, pad_token_id: int, rank: int) -> OnPolicySampler:
    """The run's sampler: its prompt source, the student's engine (``--generation_backend``) and, with
    ``--seq_kd``, a transformers engine on the teacher. ``student`` returns the current, unwrapped student."""
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.generation_temperature,
        top_p=args.generation_top_p,
        eos_token_ids=eos_token_ids(student(), tokenizer),
        pad_token_id=pad_token_id,
    )
    engine = build_engine(args.generation_backend, student, tokenizer, settings, args) if args.lmbda > 0 else None
    teacher_engine = TransformersEngine(lambda: teacher, settings) if args.seq_kd else None
    prompts = build_prompt_source(args, tokenizer)
    return OnPolicySampler(args, prompts, engine, teacher_engine, pad_token_id, rank=rank)
