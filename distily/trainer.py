"""``DistillationTrainer``: a ``transformers.Trainer`` that distils a frozen teacher into the student.

Only public Trainer hooks are overridden: ``compute_loss`` (the objective), ``evaluation_loop`` (adds the
student's and teacher's perplexities to the eval metrics) and ``log`` (adds loss components, step time,
throughput and peak memory).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback

from .bitnet import warmup_callback
from .config import ConfigError, DistillationConfig
from .data import BlockCollator
from .losses import build_loss, distillation_loss
from .teacher.loading import freeze


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward and update of every micro-batch)."""

    def __init__(self):
        self.durations: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None

    def pop(self) -> list[float]:
        durations, self.durations = self.durations, []
        return durations


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory on an accelerator, peak resident set size (RSS) on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _positions_vocab(model: nn.Module) -> tuple[int | None, int | None]:
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions, getattr(config, "vocab_size", None)


def check_compatible(student: nn.Module, teacher: nn.Module | None, args: DistillationConfig) -> None:
    """Refuse a seq_len longer than either model's positions, or a student whose vocabulary is not the teacher's."""
    student_positions, student_vocab = _positions_vocab(student)
    if student_positions is not None and args.seq_len > student_positions:
        raise ConfigError(
            f"seq_len={args.seq_len} is longer than the student's {student_positions} positions "
            f"(max_position_embeddings). Lower --seq_len to at most {student_positions}."
        )
    if teacher is None:
        return
    teacher_positions, teacher_vocab = _positions_vocab(teacher)
    if teacher_positions is not None and args.seq_len > teacher_positions:
        raise ConfigError(
            f"seq_len={args.seq_len} is longer than the teacher's {teacher_positions} positions. "
            f"Lower --seq_len to at most {teacher_positions}."
        )
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        raise ConfigError(
            f"The student's vocabulary ({student_vocab} tokens) differs from the teacher's ({teacher_vocab}). "
            "Logit distillation compares distributions over the same tokens: build the student from the "
            "teacher (distily.build_student) or pick a student that shares the teacher's tokenizer."
        )


class DistillationTrainer(Trainer):
    """Train ``model`` (the student) to match ``teacher_model``.

    Objective per batch, over the real next-token positions (labels != -100):
    ``alpha · T² · mean D(student/T ‖ teacher/T) + (1 − alpha) · mean CE(student, labels)``
    where D is ``args.loss`` from :data:`distily.LOSSES`.

    The teacher is frozen (eval mode, no gradients), placed on the student's device, kept out of the optimizer
    and never saved in checkpoints. ``teacher_model`` may be ``None`` only when ``alpha == 0`` (plain
    cross-entropy, the student-only baseline).
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | nn.Module | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        processing_class=None,
        **kwargs,
    ):
        if args is None:
            args = DistillationConfig(output_dir="distily_output")
        if not isinstance(args, DistillationConfig):
            raise TypeError(
                f"DistillationTrainer needs args=DistillationConfig(...), got {type(args).__name__}. "
                "DistillationConfig accepts every TrainingArguments field plus loss, temperature, alpha, seq_len."
            )
        if model is None:
            raise ValueError("DistillationTrainer needs model= (the student to train).")
        if teacher_model is None and args.alpha > 0:
            raise ValueError(
                f"alpha={args.alpha} weights a distillation term but no teacher_model was given. Pass "
                "teacher_model=..., or set alpha=0 to train the student on plain cross-entropy."
            )
        check_compatible(model, teacher_model, args)
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            if pad is None:
                pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
            data_collator = BlockCollator(pad)
        super().__init__(
            model=model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs
        )
        self.teacher = freeze(teacher_model) if teacher_model is not None else None
        if self.teacher is not None:
            self.teacher.to(self.args.device)
        self.loss_fn = build_loss(args.loss, args.loss_kwargs)
        self.step_timer = StepTimer()
        self.add_callback(self.step_timer)
        # BitNet students: quantisation warm-up driven by global_step (see distily.bitnet.BitNetWarmup).
        bitnet_warmup = warmup_callback(model)
        if bitnet_warmup is not None:
            self.add_callback(bitnet_warmup)
        self._log_sums: dict[str, float] = defaultdict(float)
        self._log_counts: dict[str, int] = defaultdict(int)
        self._tokens_since_log = 0
        self._eval_sums: torch.Tensor | None = None

    # -- objective ---------------------------------------------------------------------------------------------

    def teacher_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen teacher's logits for a batch (no gradients, teacher's own dtype)."""
        with torch.no_grad():
            return self.teacher(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
            ).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation objective (see the class docstring), normalised by the number of real tokens.

        During training, ``num_items_in_batch`` (the real tokens of the whole accumulated batch, across
        devices) is the normaliser, so gradient accumulation and data parallelism give the same gradients as
        one big batch.
        """
        args: DistillationConfig = self.args
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        student_logits = outputs.logits[:, :-1]
        training = model.training
        local_tokens = mask.sum()
        normaliser = num_items_in_batch if (training and num_items_in_batch is not None) else local_tokens
        components: dict[str, torch.Tensor] = {}
        need_teacher = args.alpha > 0 or (not training and self.teacher is not None and args.eval_teacher)
        teacher_logits = self.teacher_logits(inputs)[:, :-1] if need_teacher else None

        loss = student_logits.new_zeros((), dtype=torch.float32)
        if args.alpha > 0:
            kd = distillation_loss(student_logits, teacher_logits, mask, self.loss_fn, args.temperature, normaliser)
            loss = loss + args.alpha * kd
            components["loss_kd"] = kd
        if args.alpha < 1 or not training:
            ce_sum = F.cross_entropy(
                student_logits.reshape(-1, student_logits.shape[-1]).float(),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            ce = ce_sum / normaliser
            if args.alpha < 1:
                loss = loss + (1 - args.alpha) * ce
            components["loss_ce"] = ce
        if not training:
            self._accumulate_eval(ce_sum, local_tokens, teacher_logits, labels)

        if training:
            # The loss is already normalised over the accumulated batch when num_items_in_batch is known.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if num_items_in_batch is not None and args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            self._record_components(components, normaliser, local_tokens)
            self._tokens_since_log += (
                int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else (inputs["input_ids"].numel())
            )
        return (loss, outputs) if return_outputs else loss

    # -- evaluation --------------------------------------------------------------------------------------------

    def _accumulate_eval(self, ce_sum, tokens, teacher_logits, labels) -> None:
        teacher_ce = torch.zeros((), device=ce_sum.device)
        if teacher_logits is not None:
            teacher_ce = F.cross_entropy(
                teacher_logits.reshape(-1, teacher_logits.shape[-1]).float(),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        values = torch.stack([ce_sum.detach().float(), teacher_ce.float(), tokens.float()])
        self._eval_sums = values if self._eval_sums is None else self._eval_sums + values

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Runs Trainer's loop, then adds ``{prefix}_student_ppl`` and ``{prefix}_teacher_ppl``: exp of the mean
        next-token cross-entropy over the real tokens of the eval set, summed across processes."""
        self._eval_sums = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_sums is not None:
            student_ce, teacher_ce, tokens = self.accelerator.reduce(self._eval_sums, reduction="sum").tolist()
            if tokens > 0:
                output.metrics[f"{metric_key_prefix}_student_ppl"] = math.exp(min(student_ce / tokens, 700.0))
                if self.teacher is not None and self.args.eval_teacher:
                    output.metrics[f"{metric_key_prefix}_teacher_ppl"] = math.exp(min(teacher_ce / tokens, 700.0))
                output.metrics[f"{metric_key_prefix}_tokens"] = int(tokens)
        self._eval_sums = None
        return output

    # -- logging -----------------------------------------------------------------------------------------------

    def _record_components(self, components: dict[str, torch.Tensor], normaliser, local_tokens) -> None:
        # Re-express each component as a per-token mean of this micro-batch for logging.
        scale = float(normaliser) / max(float(local_tokens), 1.0)
        for name, value in components.items():
            self._log_sums[name] += float(value.detach()) * scale
            self._log_counts[name] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds to training logs: the KD and CE components, seconds per step, tokens/s and peak memory."""
        if "loss" in logs:
            for name, total in self._log_sums.items():
                logs[name] = float(f"{total / max(self._log_counts[name], 1):.6g}")
            self._log_sums.clear()
            self._log_counts.clear()
            durations = self.step_timer.pop()
            if durations:
                step_time = sum(durations) / len(durations)
                logs["step_time"] = round(step_time, 4)
                tokens = self._tokens_since_log * self.accelerator.num_processes
                logs["tokens_per_second"] = round(tokens / max(sum(durations), 1e-9), 1)
            self._tokens_since_log = 0
            logs["peak_memory_mb"] = round(peak_memory_mb(self.args.device), 1)
        super().log(logs, start_time)
