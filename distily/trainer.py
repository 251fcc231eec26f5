"""``DistillationTrainer``: a ``transformers.Trainer`` that distils a frozen teacher into the student.

Only public Trainer hooks are overridden: ``compute_loss`` (the objective), ``create_optimizer`` (the parameter
groups, declared once), ``train`` (restores the projectors on resume), ``evaluation_loop`` (adds the student's and
teacher's perplexities to the eval metrics), ``log`` (adds loss components, step time, throughput and peak
memory) and ``get_batch_samples`` (on-policy runs: replaces micro-batches by sampled ones, :mod:`distily.on_policy`).

``compute_loss`` decides once per batch which terms it has and which path it takes, then calls one method per
part: the teacher's signal, one method per source (recorded, live head per chunk, live logits); the student's
logit terms, one method per path (chunked, full logits); the feature terms, the normalisation and the
bookkeeping (eval sums, log components) once for every path. A new teacher signal or student path is one method.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.trainer_optimizer import is_optimizer_factory

from .bitnet import latent_learning_rate, latent_weights, warmup_callback
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
from .on_policy import OnPolicyCallback, OnPolicySampler, build_sampler
from .run_folder import RunFolder
from .teacher.cache import SPLIT_IDS, CacheError, TeacherCache
from .teacher.ensemble import (
    MixtureSignal,
    SparseMixtureSignal,
    TeacherEnsemble,
    as_ensemble,
    eager_mixture,
    live_head_signal,
)
from .teacher.loading import freeze
from .timing import TrainTimeBudget
from .vocab import VocabAlignment, vocab_alignment

TEACHER_CACHE_SPLITS = {value: name for name, value in SPLIT_IDS.items()}

logger = logging.getLogger(__name__)

PROJECTORS_FILE = "projectors.safetensors"
# Optimizer keyword arguments with which Trainer's optimizers bring their own parameter groups (GaLore and Apollo:
# params; LOMO: model; layer-wise optimizers: optimizer_dict).
OWN_GROUP_KWARGS = {"params", "model", "optimizer_dict"}


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
            folder = RunFolder(args.output_dir).checkpoint_path(state.global_step)
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


def check_compatible(
    student: nn.Module, teacher: nn.Module | None, args: DistillationConfig, real_vocab_size: int | None = None
) -> None:
    """Refuse a seq_len longer than either model's positions, or a student whose vocabulary is not the teacher's
    (embedding rows that differ only by padding past the shared tokenizer's ``real_vocab_size`` tokens are aligned,
    :mod:`distily.vocab`)."""
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
    if args.cross_tokenizer_loss is not None:
        return  # the vocabularies differ by design: distily.cross_tokenizer aligns the two by text
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        vocab_alignment(student_vocab, teacher_vocab, real_vocab_size)  # raises unless the rows differ by padding


@dataclass
class LossBatch:
    """What ``compute_loss`` decides about one batch before any model runs: its terms and its path."""

    labels: torch.Tensor  # (B, L-1): the next token of each position, -100 where none is predicted
    mask: torch.Tensor  # (B, L-1): the real next-token positions (labels != -100)
    training: bool  # False: evaluation (statistics per sequence, the teacher's cross-entropy)
    chunked: bool  # heads and per-token terms a chunk at a time from final hidden states, or full logits
    kd: bool  # a distillation term on the logits
    teacher_ce: bool  # the teacher's cross-entropy (its eval perplexity)

    @property
    def needs_signal(self) -> bool:
        """Whether a logit term needs the teacher's signal."""
        return self.kd or self.teacher_ce


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
        teacher_tokenizer=None,
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
        # Several teachers (distily.teacher.ensemble): the one the hidden-state terms read stands as the teacher.
        self.teachers: TeacherEnsemble | None = as_ensemble(teacher_model)
        if self.teachers is not None:
            teacher_model = self.teachers.feature_member.model
            if self.teachers.routed or self.teachers.recorded:
                args.remove_unused_columns = False  # the batches keep their teacher_ids / block_index columns
        if teacher_model is not None and args.teacher_cache:
            raise ValueError(
                "Pass either teacher_model (a live teacher) or args.teacher_cache (a recorded one), not both: with a "
                "cache the teacher is never run."
            )
        components = objective_components(args.objective)
        logits_weight = sum(c.weight for c in components if c.signal == "logits")
        intermediate_components = [c for c in components if c.signal != "logits"]
        if (args.teacher_cache or (self.teachers is not None and self.teachers.recorded)) and intermediate_components:
            raise ValueError(
                "A recorded teacher (teacher_cache) holds logits only; hidden_states/attentions objectives need a live "
                "teacher_model. Drop those objective components or the teacher cache."
            )
        needs_teacher = (args.alpha > 0 and logits_weight > 0) or intermediate_components
        if teacher_model is None and not args.teacher_cache and needs_teacher and self.teachers is None:
            raise ValueError(
                f"alpha={args.alpha} weights a distillation term but no teacher_model was given. Pass "
                "teacher_model=..., or args.teacher_cache (a recorded teacher), or set alpha=0 (and no "
                "hidden_states/attentions objective) to train the student on plain cross-entropy."
            )
        self.vocab_alignment = self._check_teachers(model, teacher_model, args, processing_class)
        # Several recorded teachers (--teacher_cache A,B) are the ensemble's members, each with its own cache.
        self.teacher_cache = (
            self._open_teacher_cache(model, args, processing_class, kwargs) if not self.teachers else None
        )
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
        self._member_devices = self._place_members() if self.teachers is not None else []
        self.loss_fn = build_loss(args.loss, args.loss_kwargs)
        self.cross_tokenizer = cross_tokenizer_objective(
            args, self.loss_fn, processing_class, teacher_tokenizer, model, teacher_model
        )
        self.logits_weight = logits_weight
        # Hidden-state and attention components with their projectors (trained with the student, never exported).
        self.intermediate: IntermediateObjective | None = None
        if intermediate_components:
            self.intermediate = IntermediateObjective(components, model, self.teacher).to(self.args.device)
            self.add_callback(ProjectorCheckpoints(self))
        if self.optimizer is not None and self._adds_groups():
            raise ConfigError(
                "optimizers=(optimizer, scheduler) was given, but this run trains parameter groups an optimizer "
                "built outside the trainer cannot know of: the projectors of its hidden-state objective and/or a "
                "BitNet student's latent weights at bitnet.learning_rate. Pass optimizer_cls_and_kwargs=(cls, "
                "kwargs) instead, so that the trainer builds the groups with that optimizer."
            )
        self.chunked = self._use_chunked_loss() and self._members_allow_chunked()
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
        self.on_policy = self._build_on_policy(data_collator, processing_class)

    @staticmethod
    def _open_teacher_cache(model, args: DistillationConfig, processing_class, kwargs) -> TeacherCache | None:
        """The recorded teacher of ``args.teacher_cache``, checked against this run: seq_len, temperature, loss,
        vocabulary, tokenizer, and that every block of the datasets was recorded."""
        if not args.teacher_cache:
            return None
        cache = TeacherCache(args.teacher_cache)
        tokenizer = processing_class if hasattr(processing_class, "backend_tokenizer") else None
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        real = len(processing_class) if hasattr(processing_class, "__len__") else None
        if vocab_alignment(vocab, cache.vocab_size, real) is not None:
            vocab = None  # rows that differ by padding only: aligned on the real vocabulary (distily.vocab)
        cache.check_compatible(
            seq_len=args.seq_len,
            temperature=args.temperature,
            tokenizer=tokenizer,
            vocab_size=vocab,
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

    def _check_teachers(self, model, teacher_model, args, processing_class) -> VocabAlignment | None:
        """``check_compatible`` for the teacher (every teacher of an ensemble), and the real-vocabulary alignment
        when their embedding rows differ only by padding (:mod:`distily.vocab`); None when they are equal."""
        real = len(processing_class) if hasattr(processing_class, "__len__") else None
        teachers = [m.model for m in self.teachers.members] if self.teachers is not None else [teacher_model]
        for teacher in teachers:
            check_compatible(model, teacher, args, real_vocab_size=real)
        student_rows = _positions_vocab(model)[1]
        rows = [_positions_vocab(teacher)[1] for teacher in teachers if teacher is not None]
        if self.teachers is not None and self.teachers.recorded:
            rows = [m.cache.vocab_size for m in self.teachers.members]
        elif args.teacher_cache:
            rows = [TeacherCache(args.teacher_cache).vocab_size]
        return vocab_alignment(student_rows, rows, real) if rows else None

    def _place_members(self) -> list[torch.device]:
        """Each live teacher of the ensemble on its own device (``TeacherMember.device``, else where
        ``teacher_device`` puts a single teacher); the input device of each, in order."""
        devices = []
        for member in self.teachers.members:
            if member.model is None:
                devices.append(None)
            elif member.model is self.teacher:
                if member.device is not None:  # its own device rather than teacher_device
                    self.teacher_input_device = torch.device(member.device)
                    self.teacher.to(self.teacher_input_device)
                devices.append(self.teacher_input_device)
            elif member.device is not None:
                freeze(member.model).to(torch.device(member.device))
                devices.append(torch.device(member.device))
            else:
                member.model, device = place_teacher(freeze(member.model), self.accelerator, self.args)
                devices.append(device)
        described = ", ".join(f"{t['name']} (weight {t['weight']:.3g})" for t in self.teachers.describe())
        routed = ", routed by the data's teacher column" if self.teachers.routed else ""
        logger.info("Teachers: %s%s; hidden-state terms read %s.", described, routed, self.teachers.feature_teacher)
        return devices

    def _members_allow_chunked(self) -> bool:
        """Whether every live teacher of an ensemble gives its logits as ``head(final hidden state)``."""
        for member in self.teachers.members if self.teachers is not None else []:
            if member.model is not None and member.model is not self.teacher:
                problem = hidden_state_path_problem(member.model, teacher=True)
                if problem:
                    logger.warning("Computing losses from full logits: teacher %s: %s.", member.name, problem)
                    return False
        return True

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
        """The optimizer over :meth:`parameter_groups`, built once (a second call returns the same optimizer).

        The class and its settings are Trainer's (``--optim``, ``--learning_rate``, ``--adam_beta1``, ... or
        ``optimizer_cls_and_kwargs``). Optimizers that Trainer builds its own way (a factory such as Muon, or one
        that groups the parameters itself: GaLore, LOMO, layer-wise) are left to Trainer when this run adds no
        groups of its own, and refused when it does.
        """
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or OWN_GROUP_KWARGS & set(kwargs):
            if self._adds_groups():
                raise ConfigError(
                    f"--optim {self.args.optim} groups the parameters itself, so the projectors "
                    "(projector_learning_rate) and a BitNet student's latent weights (bitnet.learning_rate) cannot "
                    "have their own groups. Use an optimizer such as adamw_torch, or drop those options."
                )
            return super().create_optimizer(model)
        self.optimizer = optimizer_cls(self.parameter_groups(opt_model), **kwargs)
        return self.optimizer

    def parameter_groups(self, model: nn.Module) -> list[dict]:
        """The optimizer's parameter groups, declared once, in this order (every group follows the schedule):

        1. the student's weights, with ``weight_decay`` (Trainer's rule: ``get_decay_parameter_names``);
        2. the student's biases and norms, without weight decay;
        3. for a BitNet student with ``bitnet.learning_rate``: its latent ternary weights at that peak rate, marked
           ``bitnet_latent``, one group per weight-decay setting above that they would have had;
        4. the projectors of hidden-state components at ``projector_learning_rate`` (default ``learning_rate``),
           with the student's ``weight_decay``.
        """
        args = self.args
        decay = set(self.get_decay_parameter_names(model))
        latent_rate = latent_learning_rate(self.model)
        latent = {id(weight) for weight in latent_weights(model)} if latent_rate is not None else set()
        trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        groups, latent_groups = [], []
        for decays, weight_decay in ((True, args.weight_decay), (False, 0.0)):
            params = [param for name, param in trainable if (name in decay) == decays]
            groups.append({"params": [p for p in params if id(p) not in latent], "weight_decay": weight_decay})
            if moved := [p for p in params if id(p) in latent]:
                latent_groups.append(
                    {"params": moved, "weight_decay": weight_decay, "lr": latent_rate, "bitnet_latent": True}
                )
        groups += latent_groups
        if projectors := self._projector_parameters():
            lr = args.projector_learning_rate or args.learning_rate
            groups.append({"params": projectors, "lr": lr, "weight_decay": args.weight_decay})
        return groups

    def _projector_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.intermediate.parameters() if p.requires_grad] if self.intermediate else []

    def _adds_groups(self) -> bool:
        """Whether :meth:`parameter_groups` holds more than Trainer's two (projectors, BitNet latent weights)."""
        return bool(self._projector_parameters()) or latent_learning_rate(self.model) is not None

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Trainer's ``train``; on resume, first restores the projectors from the checkpoint's
        ``projectors.safetensors`` (the student, optimizer and scheduler are restored by Trainer).

        ``resume_from_checkpoint=True`` means the newest *complete* checkpoint of ``output_dir``
        (:meth:`distily.run_folder.RunFolder.latest_checkpoint`, the rule the command line uses too)."""
        if resume_from_checkpoint is True:
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
        self._restore_on_policy(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    # -- on-policy batches: sampled before the step counts its tokens ----------------------------------------------

    def _build_on_policy(self, data_collator, processing_class) -> OnPolicySampler | None:
        """The sampler of a run that samples its sequences (``--lmbda > 0`` or ``--seq_kd``), else None."""
        args: DistillationConfig = self.args
        if not args.samples_sequences:
            return None
        if self.teacher is None:
            raise ConfigError("--lmbda > 0 / --seq_kd need a live teacher (teacher_model=) to score the samples.")
        if self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
        ):
            raise ConfigError(
                "--lmbda > 0 / --seq_kd generate with the whole student on each process; FSDP and ZeRO-3 shard its "
                "weights. Train on-policy under DDP (or ZeRO-2), or with --lmbda 0."
            )
        pad = getattr(data_collator, "pad_token_id", None)
        if pad is None:
            pad = getattr(processing_class, "pad_token_id", None) or 0
        tokenizer = processing_class if hasattr(processing_class, "apply_chat_template") else None
        sampler = build_sampler(
            args, self._generating_student, self.teacher, tokenizer, pad, rank=self.accelerator.process_index
        )
        self.add_callback(OnPolicyCallback(sampler, self._generating_student))
        return sampler

    def _generating_student(self) -> nn.Module:
        """The student as the engines sample from it: unwrapped from DDP (no gradient hooks)."""
        return self.accelerator.unwrap_model(self.model)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Trainer's micro-batches of one optimizer step, each first replaced by a sampled batch where the sampler
        says so (:class:`distily.on_policy.OnPolicySampler`): here, before Trainer counts the step's real tokens
        (``num_items_in_batch``), so the loss of a sampled batch is normalised by its completion tokens, across
        gradient accumulation and processes, as any other batch."""
        if self.on_policy is not None:
            epoch_iterator = self.on_policy.batches(epoch_iterator, self.state.global_step, num_batches)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _restore_on_policy(self, checkpoint) -> None:
        """On resume: the replay buffer saved in ``checkpoint`` (the sampling RNG needs nothing: it is seeded by
        the step)."""
        if checkpoint and self.on_policy is not None:
            self.on_policy.load(Path(checkpoint))

    # -- objective: one batch, dispatched once -----------------------------------------------------------------

    @property
    def has_teacher(self) -> bool:
        """A live or a recorded teacher (or several)."""
        return self.teacher is not None or self.teacher_cache is not None or self.teachers is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation objective (see the class docstring), normalised by the number of real tokens.

        One batch, one step per method: :meth:`_loss_batch` decides once which terms it has and which path it
        takes; :meth:`_teacher_side` gives the teacher's signal (live or recorded, :meth:`teacher_signal`) and the
        features the intermediate components read; the student's path (:meth:`_loss_chunked` or
        :meth:`_loss_logits`) sums the per-token logit terms; then, the same for every path, the feature terms are
        added, the sum is normalised and the batch's statistics are recorded (:meth:`_record_batch`).

        During training, ``num_items_in_batch`` (the real tokens of the whole accumulated batch, across
        devices) is the normaliser, so gradient accumulation and data parallelism give the same gradients as
        one big batch. With ``chunked_loss`` the heads and the per-token terms are computed chunk by chunk from
        the final hidden states (:mod:`distily.chunked`); otherwise from full logits. Both give the same numbers.
        """
        if self.cross_tokenizer is not None:
            return self._compute_cross_tokenizer_loss(model, inputs, return_outputs, num_items_in_batch)
        batch = self._loss_batch(model, inputs, return_outputs)
        signal, teacher_features = self._teacher_side(inputs, batch)
        objective = self._token_objective(batch, signal)
        student_path = self._loss_chunked if batch.chunked else self._loss_logits
        with self._capture(self.accelerator.unwrap_model(model), "student", batch.mask) as student_features:
            total, stats, outputs = student_path(model, inputs, batch.mask, objective)
        total, feature_sums = self._add_feature_terms(total, student_features, teacher_features)
        local_tokens = batch.mask.sum()
        normaliser = num_items_in_batch if (batch.training and num_items_in_batch is not None) else local_tokens
        # A batch with no real token contributes zero (not 0/0); its gradient is zero too.
        normaliser = normaliser.clamp(min=1) if isinstance(normaliser, torch.Tensor) else max(normaliser, 1)
        loss = total / normaliser
        self._record_batch(batch, objective, stats, feature_sums, normaliser, inputs)
        if batch.training:
            # The loss is already normalised over the accumulated batch when num_items_in_batch is known.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, outputs) if return_outputs else loss

    def _loss_batch(self, model, inputs: dict[str, torch.Tensor], return_outputs: bool) -> LossBatch:
        """Which terms this batch has and which path it takes, decided once before any model runs."""
        args: DistillationConfig = self.args
        training = model.training
        # Metrics computed from logits need the full logits: evaluate those batches on the plain path.
        wants_logits = return_outputs and (self.compute_metrics is not None or self.preprocess_logits_for_metrics)
        labels = inputs["labels"][:, 1:]
        return LossBatch(
            labels=labels,
            mask=labels != -100,
            training=training,
            chunked=self.chunked and not wants_logits,
            kd=args.alpha > 0 and self.logits_weight > 0,
            teacher_ce=not training and self.has_teacher and args.eval_teacher,
        )

    def _token_objective(self, batch: LossBatch, signal: TeacherSignal | None) -> TokenObjective:
        """The per-token logit terms of the batch (``distily.chunked.TokenObjective``), the same on every path."""
        args: DistillationConfig = self.args
        objective = TokenObjective(
            labels=batch.labels[batch.mask],
            loss_fn=self.loss_fn if batch.kd else None,
            teacher=signal,
            temperature=args.temperature,
            kd_weight=self.logits_weight * args.alpha,
            ce_weight=self.logits_weight * (1 - args.alpha),
            student_ce=(args.alpha < 1 and self.logits_weight > 0) or not batch.training,
            teacher_ce=batch.teacher_ce,
            # Evaluation sums its statistics per sequence (see _accumulate_eval).
            sequence_ids=None if batch.training else sequence_index(batch.mask),
            num_sequences=batch.mask.shape[0],
        )
        # Embedding rows that differ by padding: every term on the shared real vocabulary (distily.vocab).
        return self.vocab_alignment.objective(objective) if self.vocab_alignment is not None else objective

    def _add_feature_terms(self, total: torch.Tensor, student_features: dict, teacher_features: dict):
        """``total`` plus every hidden-state/attention component's weighted sum over the real tokens, and those sums
        by component name: the one place feature terms join the objective, whatever the path."""
        if self.intermediate is None:
            return total, {}
        sums = self.intermediate(student_features, teacher_features)
        for component in self.intermediate.components:
            total = total + component.weight * sums[component.name]
        return total, sums

    def _capture(self, model: nn.Module | None, role: str, mask: torch.Tensor):
        """The intermediate objective's hooks on ``model``'s mapped layers for one forward pass (``{}`` without)."""
        if self.intermediate is None:
            return contextlib.nullcontext({})
        return self.intermediate.capture(model, role, mask)

    # -- the teacher's side: one method per source ---------------------------------------------------------------

    def _teacher_side(self, inputs: dict[str, torch.Tensor], batch: LossBatch) -> tuple[TeacherSignal | None, dict]:
        """The teacher's part of a batch, from one pass of the teacher: its signal for the logit terms (None when
        no term needs one) and the features the intermediate components read (``{}`` without them)."""
        with self._capture(self.teacher, "teacher", batch.mask) as captured:
            signal = self.teacher_signal(inputs, batch.mask, batch.chunked) if batch.needs_signal else None
            if signal is None and self.intermediate is not None:
                self.teacher_forward(inputs)  # the hooks keep the mapped layers
        # Normal tensors (the teacher ran in inference mode), so the feature losses can save them for backward.
        return signal, {key: value.clone() for key, value in captured.items()}

    def teacher_signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, chunked: bool) -> TeacherSignal:
        """The teacher's side of the objective for the real next-token positions ``mask`` (B, L-1) of a batch:
        a recorded teacher's top-k rows (:meth:`_recorded_signal`), or a live teacher's final hidden states with
        its head applied per chunk (:meth:`_live_head_signal`, chunked path) or its full logits
        (:meth:`_live_logits_signal`, plain path)."""
        if self.teachers is not None:
            return self._mixture_signal(inputs, mask, chunked)
        if self.teacher_cache is not None:
            return self._recorded_signal(inputs, mask)
        return self._live_head_signal(inputs, mask) if chunked else self._live_logits_signal(inputs, mask)

    def _mixture_signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, chunked: bool) -> TeacherSignal:
        """Several teachers (:mod:`distily.teacher.ensemble`): the weighted mixture of their distributions, or the
        teacher each token is routed to. Live teachers run one after another; a teacher no token of a routed
        batch names is not run (unless the hidden-state terms read it)."""
        ensemble, temperature = self.teachers, self.args.temperature
        log_weights = ensemble.batch_log_weights(inputs, mask)
        used = [True] * len(ensemble.members)
        if ensemble.routed:
            routed = set(ensemble.batch_route(inputs, mask).unique().tolist())
            reads = ensemble.feature_teacher if self.intermediate is not None else None
            used = [i in routed or m.name == reads for i, m in enumerate(ensemble.members)]
        size = self.vocab_alignment.size if self.vocab_alignment is not None else _positions_vocab(self.model)[1]
        if ensemble.recorded:
            device = inputs["input_ids"].device
            caches = [m.cache if u else None for m, u in zip(ensemble.members, used, strict=True)]
            members = [cache.signal(inputs, mask, device) if cache is not None else None for cache in caches]
            return SparseMixtureSignal(members, log_weights, size)
        models = zip(ensemble.members, self._member_devices, used, strict=True)
        entries = [(m.model, device) if u else None for m, device, u in models]
        if not chunked:
            return eager_mixture(entries, inputs, mask, log_weights, temperature, size)
        members = [live_head_signal(*entry, inputs, mask) if entry is not None else None for entry in entries]
        return MixtureSignal(members, log_weights, temperature, size)

    def _recorded_signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> TeacherSignal:
        """``args.teacher_cache``: the top-k rows recorded for the batch's blocks (no teacher runs)."""
        return self.teacher_cache.signal(inputs, mask, inputs["input_ids"].device)

    def _live_head_signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> TeacherSignal:
        """The live teacher's final hidden states, in inference mode and in its own dtype; its head is applied
        one chunk at a time by the chunked path."""
        with torch.inference_mode():
            hidden = teacher_hidden_states(self.teacher, *self._teacher_inputs(inputs))
            hidden = hidden[:, :-1][mask.to(hidden.device)]
        # A normal tensor (cheap: hidden size, not vocabulary), so chunks can be used outside inference mode.
        return HeadTeacherSignal(hidden.clone(), self.teacher.get_output_embeddings(), inputs["input_ids"].device)

    def _live_logits_signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> TeacherSignal:
        """The live teacher's full logits at the real positions."""
        return LogitsTeacherSignal(self.teacher_logits(inputs)[:, :-1][mask])

    def teacher_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen teacher's logits for a batch (no gradients, teacher's own dtype, on the student's device)."""
        input_ids, attention_mask = self._teacher_inputs(inputs)
        with torch.no_grad():
            logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits.to(inputs["input_ids"].device)

    def teacher_forward(self, inputs: dict[str, torch.Tensor]) -> None:
        """The teacher's decoder on a batch, in inference mode, for its intermediate features only (no head)."""
        with torch.inference_mode():
            teacher_hidden_states(self.teacher, *self._teacher_inputs(inputs))

    def _teacher_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's ``input_ids`` and ``attention_mask`` on the teacher's input device."""
        device, attention_mask = self.teacher_input_device, inputs.get("attention_mask")
        return inputs["input_ids"].to(device), attention_mask.to(device) if attention_mask is not None else None

    # -- the student's side: one method per path -----------------------------------------------------------------
    # Each runs the student once and returns (objective summed over the real tokens, stats, outputs).

    def _loss_chunked(self, model, inputs: dict[str, torch.Tensor], mask: torch.Tensor, objective: TokenObjective):
        """The student's final hidden states, then its head and the per-token terms a chunk of real tokens at a
        time (:func:`distily.chunked.chunked_head_objective`): full logits never exist."""
        input_ids = inputs["input_ids"]
        hidden, outputs = student_hidden_states(model, input_ids, inputs.get("attention_mask"))
        # Return the hidden states, not the last position's logits (all this path computed).
        outputs = CausalLMOutputWithPast(hidden_states=outputs.hidden_states)
        if not objective.has_terms:  # hidden states only, during training: the head is not needed at all
            return *objective.zeros(input_ids.device), outputs
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        total, stats = chunked_head_objective(hidden[:, :-1][mask], head, objective, self.loss_chunk_size)
        return total, stats, outputs

    def _loss_logits(self, model, inputs: dict[str, torch.Tensor], mask: torch.Tensor, objective: TokenObjective):
        """The student's full logits, the per-token terms on all real tokens at once (``--chunked_loss false``,
        and evaluation with ``compute_metrics``)."""
        input_ids = inputs["input_ids"]
        outputs = model(input_ids=input_ids, attention_mask=inputs.get("attention_mask"), use_cache=False)
        if not objective.has_terms:  # hidden states only, during training
            return *objective.zeros(input_ids.device), outputs
        total, stats = objective(outputs.logits[:, :-1][mask], slice(None))
        return total, stats, outputs

    # -- a student with its own tokenizer ------------------------------------------------------------------------

    def _compute_cross_tokenizer_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """``compute_loss`` across tokenizers: the student's full logits on its blocks, the teacher's on its own
        tokenisation of the same text (``teacher_input_ids``), the distillation term at the aligned positions
        (:class:`distily.cross_tokenizer.CrossTokenizerObjective`) and the student's cross-entropy on all its real
        tokens, both normalised by the student's real tokens as on the other paths. Blocks without an aligned
        position add no distillation term; they are counted in the logs (``unaligned_blocks``)."""
        args: DistillationConfig = self.args
        if "aligned_student" not in inputs:
            raise ConfigError(
                "--cross_tokenizer_loss needs batches of aligned blocks: a dataset from "
                "distily.cross_tokenizer.prepare_paired_datasets and data_collator=PairedBlockCollator(...)."
            )
        batch = self._loss_batch(model, inputs, return_outputs)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        logits = outputs.logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=-100, reduction="none"
        ).view(batch.labels.shape)
        total = self.logits_weight * (1 - args.alpha) * ce.sum()
        sums = None
        if batch.kd:
            with torch.no_grad():
                teacher_logits = self.teacher(
                    input_ids=inputs["teacher_input_ids"].to(self.teacher_input_device),
                    attention_mask=inputs["teacher_attention_mask"].to(self.teacher_input_device),
                    use_cache=False,
                ).logits
            sums = self.cross_tokenizer(logits, teacher_logits, inputs, batch.mask)
            total = total + self.logits_weight * args.alpha * sums.kd
        local_tokens = batch.mask.sum()
        normaliser = num_items_in_batch if (batch.training and num_items_in_batch is not None) else local_tokens
        normaliser = normaliser.clamp(min=1) if isinstance(normaliser, torch.Tensor) else max(normaliser, 1)
        loss = total / normaliser
        if not batch.training:
            self._accumulate_eval(ce.detach().sum(-1), torch.zeros_like(ce[:, 0]), batch.mask.sum(-1))
            return (loss, outputs) if return_outputs else loss
        components = {"loss_ce": ce.detach().sum() / normaliser}
        if sums is not None:
            components["loss_kd"] = sums.kd.detach() / normaliser
            # Shares of the real tokens: aligned (scored), and of those scored by the exact divergence.
            self._log_sums["aligned_fraction"] += sums.aligned / max(int(local_tokens), 1)
            self._log_counts["aligned_fraction"] += 1
            self._log_sums["exact_fraction"] += sums.exact / max(sums.aligned, 1)
            self._log_counts["exact_fraction"] += 1
            self._log_sums["unaligned_blocks"] += sums.unaligned_blocks  # a count since the last log entry
            self._log_counts["unaligned_blocks"] = 1
        self._record_components(components, normaliser, local_tokens)
        self._tokens_since_log += int(inputs["attention_mask"].sum())
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    # -- bookkeeping: evaluation sums and log components ---------------------------------------------------------

    def _record_batch(self, batch: LossBatch, objective: TokenObjective, stats, feature_sums, normaliser, inputs):
        """The batch's statistics, apart from the loss: an evaluation batch adds its per-sequence sums to the
        perplexities (:meth:`_accumulate_eval`, read by :meth:`evaluation_loop`); a training batch adds its
        components and its token count to the next log entry (:meth:`_record_components`, read by :meth:`log`)."""
        if not batch.training:
            self._accumulate_eval(stats[1], stats[2], batch.mask.sum(-1))
            return
        kd_sum, ce_sum, _ = (stats.sum(-1) if stats.dim() > 1 else stats).unbind()
        components: dict[str, torch.Tensor] = {}
        if batch.kd:
            components["loss_kd"] = kd_sum / normaliser
        if objective.student_ce:
            components["loss_ce"] = ce_sum / normaliser
        for name, value in feature_sums.items():
            components[f"loss_{name}"] = value.detach() / normaliser
        self._record_components(components, normaliser, batch.mask.sum())
        attention_mask = inputs.get("attention_mask")
        self._tokens_since_log += (
            int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()
        )

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
                if self.has_teacher and self.args.eval_teacher and self.cross_tokenizer is None:
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
            if self.on_policy is not None:
                logs.update(self.on_policy.pop_logs(max(len(durations), 1)))
        super().log(logs, start_time)


def cross_tokenizer_objective(args: DistillationConfig, loss_fn, tokenizer, teacher_tokenizer, model, teacher):
    """The run's :class:`distily.cross_tokenizer.CrossTokenizerObjective` (None without --cross_tokenizer_loss):
    the hybrid needs both tokenizers, to know which token strings the two vocabularies share."""
    if args.cross_tokenizer_loss is None:
        return None
    from .cross_tokenizer import CrossTokenizerObjective, SharedVocabulary
    from .students import shared_token_ids

    if tokenizer is None or teacher_tokenizer is None:
        raise ConfigError(
            "--cross_tokenizer_loss needs both tokenizers: pass processing_class=the student's tokenizer and "
            "teacher_tokenizer=the teacher's to DistillationTrainer."
        )
    student_ids, teacher_ids = shared_token_ids(tokenizer, teacher_tokenizer)
    # The logits' widths (a padded embedding matrix has rows no token uses: they fall in "any other token").
    student_size = max(_positions_vocab(model)[1] or 0, len(tokenizer))
    teacher_size = max(_positions_vocab(teacher)[1] or 0, len(teacher_tokenizer)) if teacher is not None else 0
    vocab = SharedVocabulary(student_ids, teacher_ids, student_size, max(teacher_size, len(teacher_tokenizer)))
    return CrossTokenizerObjective(args.cross_tokenizer_loss, vocab, loss_fn, args.temperature)


def sequence_index(mask: torch.Tensor) -> torch.Tensor:
    """The batch row of each selected token of ``mask`` (B, L), in the row-major order of ``tensor[mask]``."""
    return torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
