"""``DistillationTrainer``: a ``transformers.Trainer`` that distils a frozen teacher into the student.

Only public Trainer hooks are overridden: ``compute_loss`` (the objective), ``evaluation_loop`` (adds the
student's and teacher's perplexities to the eval metrics) and ``log`` (adds loss components, step time,
throughput and peak memory).
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast

from .bitnet import separate_latent_weights, warmup_callback
from .chunked import (
    HeadTeacherSignal,
    LogitsTeacherSignal,
    TeacherSignal,
    TokenObjective,
    auto_chunk_size,
    chunked_head_objective,
    hidden_state_path_problem,
    student_hidden_states,
    teacher_hidden_states,
)
from .config import ConfigError, DistillationConfig, objective_components
from .data import BlockCollator
from .distributed import check_world_size, place_teacher, world_size_from_env, wrap_student_for_training
from .features import IntermediateObjective
from .io import atomic_path
from .losses import build_loss
from .teacher.loading import freeze
from .teacher.recorded import SPLIT_IDS, CacheError, TeacherCache
from .timing import TrainTimeBudget

TEACHER_CACHE_SPLITS = {value: name for name, value in SPLIT_IDS.items()}

logger = logging.getLogger(__name__)

PROJECTORS_FILE = "projectors.safetensors"


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


class ProjectorCheckpoints(TrainerCallback):
    """Saves the projectors' weights as ``projectors.safetensors`` in every checkpoint folder, zeroes their
    gradients at each step and averages them across processes (they live outside the DDP-wrapped student, so
    neither Trainer nor DDP does)."""

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        # Trainer zeroes the student's gradients only (model.zero_grad()); without this they would accumulate.
        self.trainer.intermediate.zero_grad(set_to_none=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for param in self.trainer.intermediate.parameters():
                if param.grad is not None and world > 1:
                    torch.distributed.all_reduce(param.grad)
                    param.grad.div_(world)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_projectors(self.trainer.intermediate, folder / PROJECTORS_FILE)


def save_projectors(intermediate: nn.Module, path: Path) -> None:
    """The projectors' state dict as safetensors, written atomically."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in intermediate.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "distily projectors"})


def load_projectors(intermediate: nn.Module, path: Path) -> None:
    """Loads ``save_projectors``' file into ``intermediate`` in place (every key must match)."""
    from safetensors.torch import load_file

    intermediate.load_state_dict(load_file(str(path)), strict=True)


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

    The teacher is frozen (eval mode, no gradients), placed on the student's device (or ``args.teacher_device``,
    or sharded under FSDP/ZeRO-3: :mod:`distily.distributed`), kept out of the optimizer and never saved in
    checkpoints. ``teacher_model`` may be ``None`` only when ``alpha == 0`` (plain
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
        if teacher_model is not None and args.teacher_cache:
            raise ValueError(
                "Pass either teacher_model (a live teacher) or args.teacher_cache (a recorded one), not both: with a "
                "cache the teacher is never run."
            )
        components = objective_components(args.objective)
        logits_weight = sum(c.weight for c in components if c.signal == "logits")
        intermediate_components = [c for c in components if c.signal != "logits"]
        if args.teacher_cache and intermediate_components:
            raise ValueError(
                "A recorded teacher (teacher_cache) holds logits only; hidden_states/attentions objectives need a live "
                "teacher_model. Drop those objective components or the teacher cache."
            )
        needs_teacher = (args.alpha > 0 and logits_weight > 0) or intermediate_components
        if teacher_model is None and not args.teacher_cache and needs_teacher:
            raise ValueError(
                f"alpha={args.alpha} weights a distillation term but no teacher_model was given. Pass "
                "teacher_model=..., or args.teacher_cache (a recorded teacher), or set alpha=0 (and no "
                "hidden_states/attentions objective) to train the student on plain cross-entropy."
            )
        check_compatible(model, teacher_model, args)
        self.teacher_cache = self._open_teacher_cache(model, args, processing_class, kwargs)
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            if pad is None:
                pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
            data_collator = BlockCollator(pad)
        super().__init__(
            model=model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs
        )
        check_world_size(world_size_from_env(), self.accelerator.num_processes)
        self.teacher = freeze(teacher_model) if teacher_model is not None else None
        self.teacher_input_device = self.args.device
        if self.teacher is not None:
            self.teacher, self.teacher_input_device = place_teacher(self.teacher, self.accelerator, self.args)
        self.loss_fn = build_loss(args.loss, args.loss_kwargs)
        self.logits_weight = logits_weight
        # Hidden-state and attention components with their projectors (trained with the student, never exported).
        self.intermediate: IntermediateObjective | None = None
        if intermediate_components:
            self.intermediate = IntermediateObjective(components, model, self.teacher).to(self.args.device)
            self.add_callback(ProjectorCheckpoints(self))
        self.chunked = self._use_chunked_loss()
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
        self.loss_chunk_size = args.loss_chunk_size or auto_chunk_size(vocab, self.args.device)
        self.step_timer = StepTimer()
        self.add_callback(self.step_timer)
        self.time_budget = TrainTimeBudget(args.max_train_seconds) if args.max_train_seconds else None
        if self.time_budget is not None:
            self.add_callback(self.time_budget)
        # BitNet students: quantisation warm-up driven by global_step (see distily.bitnet.BitNetWarmup).
        bitnet_warmup = warmup_callback(model)
        if bitnet_warmup is not None:
            self.add_callback(bitnet_warmup)
        self._log_sums: dict[str, float] = defaultdict(float)
        self._log_counts: dict[str, int] = defaultdict(int)
        self._tokens_since_log = 0
        self._eval_sums: torch.Tensor | None = None

    @staticmethod
    def _open_teacher_cache(model, args: DistillationConfig, processing_class, kwargs) -> TeacherCache | None:
        """The recorded teacher of ``args.teacher_cache``, checked against this run: seq_len, temperature, loss,
        vocabulary, tokenizer, and that every block of the datasets was recorded."""
        if not args.teacher_cache:
            return None
        cache = TeacherCache(args.teacher_cache)
        tokenizer = processing_class if hasattr(processing_class, "backend_tokenizer") else None
        cache.check_compatible(
            seq_len=args.seq_len,
            temperature=args.temperature,
            tokenizer=tokenizer,
            vocab_size=getattr(getattr(model, "config", None), "vocab_size", None),
            loss=args.loss,
        )
        for name, split in (("train_dataset", "train"), ("eval_dataset", "eval")):
            dataset = kwargs.get(name)
            datasets_ = dataset.values() if isinstance(dataset, dict) else [dataset]
            for part in datasets_:
                columns = getattr(part, "column_names", None)
                if columns is None:
                    continue
                if "block_index" not in columns or "block_split" not in columns:
                    raise CacheError(
                        f"The {split} dataset has no block_index/block_split columns, so its blocks cannot be found "
                        "in the teacher cache. Prepare it with distily.data.prepare_datasets(..., block_index=True)."
                    )
                for split_id in set(part["block_split"]):
                    cache.rows_for(
                        TEACHER_CACHE_SPLITS[split_id],
                        [b for b, s in zip(part["block_index"], part["block_split"], strict=True) if s == split_id],
                    )
        return cache

    def _use_chunked_loss(self) -> bool:
        """Whether this run takes the chunked loss path (``chunked_loss``: auto, true or false).

        ``auto`` takes it whenever both models give their logits as ``head(final hidden state)`` (checked once
        here on four tokens) and the parameters are not sharded (FSDP, DeepSpeed ZeRO-3), which would need the
        head's weights gathered outside the model's forward. ``true`` makes any obstacle an error.
        """
        mode = self.args.chunked_loss
        if mode == "false":
            return False
        problems = []
        if self.is_fsdp_enabled:
            problems.append("FSDP shards the head's weights")
        if self.is_deepspeed_enabled and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
            problems.append("DeepSpeed ZeRO-3 shards the head's weights")
        for role, module in (("student", self.model), ("teacher", self.teacher)):
            if module is not None and not problems:
                problem = hidden_state_path_problem(module, teacher=role == "teacher")
                if problem:
                    problems.append(f"{role}: {problem}")
        if not problems:
            return True
        if mode == "true":
            raise ConfigError(
                f"--chunked_loss true cannot be used here: {'; '.join(problems)}. Use --chunked_loss auto (falls "
                "back to full logits) or false."
            )
        logger.warning("Computing losses from full logits (chunked_loss=auto): %s.", "; ".join(problems))
        return False

    # -- projectors: optimizer, checkpoints ---------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """Trainer's optimizer for the student, plus one parameter group for the projectors (learning rate
        ``projector_learning_rate`` or ``learning_rate``, the student's weight decay and schedule), and for a
        BitNet student with ``bitnet.learning_rate`` its own groups for the ternary latent weights."""
        optimizer = super().create_optimizer(model)
        separate_latent_weights(self.model, optimizer)
        params = [p for p in self.intermediate.parameters() if p.requires_grad] if self.intermediate else []
        already = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if params and not any(id(p) in already for p in params):
            lr = self.args.projector_learning_rate or self.args.learning_rate
            optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": self.args.weight_decay})
        return optimizer

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Trainer's ``train``; on resume, first restores the projectors from the checkpoint's
        ``projectors.safetensors`` (the student, optimizer and scheduler are restored by Trainer).

        ``resume_from_checkpoint=True`` means the newest *complete* checkpoint of ``output_dir``
        (:meth:`distily.run_folder.RunFolder.latest_checkpoint`, the rule the command line uses too)."""
        if resume_from_checkpoint is True:
            from .run_folder import RunFolder

            latest = RunFolder(self.args.output_dir).latest_checkpoint()
            if latest is None:
                raise ConfigError(
                    f"resume_from_checkpoint=True: no complete checkpoint in {self.args.output_dir!r}. Start "
                    "without resume_from_checkpoint, or pass a checkpoint folder."
                )
            resume_from_checkpoint = str(latest)
        if resume_from_checkpoint and self.intermediate is not None:
            checkpoint = resume_from_checkpoint
            path = Path(checkpoint) / PROJECTORS_FILE if checkpoint else None
            if path is None or not path.exists():
                raise ConfigError(
                    f"Resuming needs the projectors' weights, but {str(path)!r} does not exist: the checkpoint was "
                    "saved by a run without hidden-state components. Resume with the same --objective, or start a "
                    "new run."
                )
            load_projectors(self.intermediate, path)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    # -- objective ---------------------------------------------------------------------------------------------

    @property
    def has_teacher(self) -> bool:
        """A live or a recorded teacher."""
        return self.teacher is not None or self.teacher_cache is not None

    def teacher_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen teacher's logits for a batch (no gradients, teacher's own dtype, on the student's device)."""
        input_ids, attention_mask = self._teacher_inputs(inputs)
        with torch.no_grad():
            logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits.to(inputs["input_ids"].device)

    def _teacher_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's ``input_ids`` and ``attention_mask`` on the teacher's input device."""
        device, attention_mask = self.teacher_input_device, inputs.get("attention_mask")
        return inputs["input_ids"].to(device), attention_mask.to(device) if attention_mask is not None else None

    def teacher_signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, chunked: bool) -> TeacherSignal:
        """The teacher's side of the objective for the real next-token positions ``mask`` (B, L-1) of a batch.

        Chunked path: the teacher's final hidden states, computed in inference mode and in the teacher's own
        dtype, with its head applied one chunk at a time. Plain path: its full logits. A recorded teacher
        (``args.teacher_cache``) serves the top-k rows it recorded for the batch's blocks instead.
        """
        if self.teacher_cache is not None:
            return self.teacher_cache.signal(inputs, mask, inputs["input_ids"].device)
        if chunked:
            with torch.inference_mode():
                hidden = teacher_hidden_states(self.teacher, *self._teacher_inputs(inputs))
                hidden = hidden[:, :-1][mask.to(hidden.device)]
            # A normal tensor (cheap: hidden size, not vocabulary), so chunks can be used outside inference mode.
            return HeadTeacherSignal(hidden.clone(), self.teacher.get_output_embeddings(), inputs["input_ids"].device)
        return LogitsTeacherSignal(self.teacher_logits(inputs)[:, :-1][mask])

    def teacher_forward(self, inputs: dict[str, torch.Tensor]) -> None:
        """The teacher's decoder on a batch, in inference mode, for its intermediate features only (no head)."""
        with torch.inference_mode():
            teacher_hidden_states(self.teacher, *self._teacher_inputs(inputs))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation objective (see the class docstring), normalised by the number of real tokens.

        During training, ``num_items_in_batch`` (the real tokens of the whole accumulated batch, across
        devices) is the normaliser, so gradient accumulation and data parallelism give the same gradients as
        one big batch. With ``chunked_loss`` the heads and the per-token terms are computed chunk by chunk from
        the final hidden states (:mod:`distily.chunked`); otherwise from full logits. Both give the same numbers.
        """
        args: DistillationConfig = self.args
        training = model.training
        # Metrics computed from logits need the full logits: evaluate those batches on the plain path.
        wants_logits = return_outputs and (self.compute_metrics is not None or self.preprocess_logits_for_metrics)
        chunked = self.chunked and not wants_logits
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        local_tokens = mask.sum()
        normaliser = num_items_in_batch if (training and num_items_in_batch is not None) else local_tokens
        teacher_ce = not training and self.has_teacher and args.eval_teacher
        kd = args.alpha > 0 and self.logits_weight > 0
        need_signal = kd or teacher_ce
        intermediate = self.intermediate
        teacher_features: dict = {}
        with intermediate.capture(self.teacher, "teacher", mask) if intermediate else _no_capture() as captured:
            signal = self.teacher_signal(inputs, mask, chunked) if need_signal else None
            if intermediate is not None and not need_signal:
                self.teacher_forward(inputs)  # the hooks keep the mapped layers
        if captured:
            # Normal tensors (the teacher ran in inference mode), so the feature losses can save them for backward.
            teacher_features = {key: value.clone() for key, value in captured.items()}
        objective = TokenObjective(
            labels=labels[mask],
            loss_fn=self.loss_fn if kd else None,
            teacher=signal,
            temperature=args.temperature,
            kd_weight=self.logits_weight * args.alpha,
            ce_weight=self.logits_weight * (1 - args.alpha),
            student_ce=(args.alpha < 1 and self.logits_weight > 0) or not training,
            teacher_ce=teacher_ce,
            # Evaluation sums its statistics per sequence (see _accumulate_eval).
            sequence_ids=None if training else sequence_index(mask),
            num_sequences=mask.shape[0],
        )
        logit_terms = objective.loss_fn is not None or objective.student_ce or objective.teacher_ce
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        student = self.accelerator.unwrap_model(model)
        with intermediate.capture(student, "student", mask) if intermediate else _no_capture() as student_features:
            if chunked:
                hidden, outputs = student_hidden_states(model, input_ids, attention_mask)
                if logit_terms:
                    head = student.get_output_embeddings()
                    total, stats = chunked_head_objective(hidden[:, :-1][mask], head, objective, self.loss_chunk_size)
                # Full logits never exist on this path: return the hidden states, not the last position's logits.
                outputs = CausalLMOutputWithPast(hidden_states=outputs.hidden_states)
            else:
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                if logit_terms:
                    total, stats = objective(outputs.logits[:, :-1][mask], slice(None))
        if not logit_terms:  # hidden states only, during training: the heads are not needed at all
            total = torch.zeros((), device=input_ids.device)
            stats = torch.zeros(objective.stats_shape, device=input_ids.device)
        feature_sums = intermediate(student_features, teacher_features) if intermediate else {}
        for component in intermediate.components if intermediate else ():
            total = total + component.weight * feature_sums[component.name]
        # A batch with no real token contributes zero (not 0/0); its gradient is zero too.
        normaliser = normaliser.clamp(min=1) if isinstance(normaliser, torch.Tensor) else max(normaliser, 1)
        loss = total / normaliser
        kd_sum, ce_sum, _ = (stats.sum(-1) if stats.dim() > 1 else stats).unbind()

        components: dict[str, torch.Tensor] = {}
        if kd:
            components["loss_kd"] = kd_sum / normaliser
        if objective.student_ce:
            components["loss_ce"] = ce_sum / normaliser
        for name, value in feature_sums.items():
            components[f"loss_{name}"] = value.detach() / normaliser
        if not training:
            self._accumulate_eval(stats[1], stats[2], mask.sum(-1))

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

    def _accumulate_eval(self, ce_rows, teacher_ce_rows, tokens_rows) -> None:
        """Adds one eval batch's per-sequence sums (student CE, teacher CE, real tokens) to the running totals.

        Per sequence, because under DDP accelerate fills the last eval batch of some processes with repeated
        sequences; ``gather_for_metrics`` drops them, so every eval sequence counts exactly once.
        """
        rows = torch.stack([ce_rows.detach().float(), teacher_ce_rows.detach().float(), tokens_rows.float()], dim=-1)
        values = self.accelerator.gather_for_metrics(rows).sum(0)
        self._eval_sums = values if self._eval_sums is None else self._eval_sums + values

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Runs Trainer's loop, then adds ``{prefix}_student_ppl`` and ``{prefix}_teacher_ppl``: exp of the mean
        next-token cross-entropy over the real tokens of the eval set, gathered from every process."""
        self._eval_sums = None
        if not self.is_in_train:
            wrap_student_for_training(self)  # before Trainer's eval-only preparation; see distily.distributed
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_sums is not None:
            student_ce, teacher_ce, tokens = self._eval_sums.tolist()
            if tokens > 0:
                output.metrics[f"{metric_key_prefix}_student_ppl"] = math.exp(min(student_ce / tokens, 700.0))
                if self.has_teacher and self.args.eval_teacher:
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


@contextlib.contextmanager
def _no_capture():
    yield {}


def sequence_index(mask: torch.Tensor) -> torch.Tensor:
    """The batch row of each selected token of ``mask`` (B, L), in the row-major order of ``tensor[mask]``."""
    return torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
