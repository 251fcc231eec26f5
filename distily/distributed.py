"""The frozen teacher under DDP, FSDP and DeepSpeed, and the checks that keep multi-process runs honest.

Trainer (through accelerate) prepares the student: DDP wraps it, FSDP shards it, DeepSpeed builds its engine.
The teacher is not trained, so it is never handed to the optimizer; :func:`place_teacher` puts it where the
configuration says:

=================  ==============================================================================================
``replicate``      a whole teacher on every process (DDP, FSDP, ZeRO-1/2; the only choice under DDP); on
                   ``--teacher_device`` when given, so a second GPU or the CPU can hold it
``shard`` (FSDP)   FSDP2 ``fully_shard`` of each transformer block and the root: each process keeps 1/N of the
                   teacher's weights and gathers one block at a time during the forward pass
``shard`` (ZeRO-3) a DeepSpeed ZeRO-3 inference engine (no optimizer); needed when ZeRO-3 loaded the teacher
                   partitioned (``zero.Init``), which transformers does for every model loaded after the
                   ``TrainingArguments`` that enable ZeRO-3
quantised          a bitsandbytes teacher was placed while loading (``device_map``) and is left there
=================  ==============================================================================================
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn
from transformers import TrainerCallback

from .errors import ConfigError
from .modeling import decoder_layers

logger = logging.getLogger(__name__)

DEEPSPEED_EXTRA = "pip install 'distily[deepspeed]'"


def _distributed_type(accelerator) -> str:
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))


def is_ddp(accelerator) -> bool:
    """Plain data parallelism (DDP on GPUs, gloo on CPUs): more than one process, no FSDP or DeepSpeed."""
    return accelerator.num_processes > 1 and _distributed_type(accelerator).startswith("MULTI_")


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this run, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if _distributed_type(accelerator) != "DEEPSPEED" or plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def weights_are_sharded(accelerator) -> bool:
    """True when no process holds the whole student (FSDP, DeepSpeed ZeRO-3)."""
    return _distributed_type(accelerator) == "FSDP" or zero_stage(accelerator) == 3


def check_world_size(world_size: str | None, num_processes: int) -> None:
    """Refuse a launch of N processes (``WORLD_SIZE``) that trains as N independent single-process runs.

    That happens with ``torchrun``/``accelerate launch`` on a machine without GPUs unless ``--use_cpu true``
    selects accelerate's CPU (gloo) backend: each process would train alone and all would write one folder.
    """
    launched = int(world_size) if world_size and world_size.isdigit() else 1
    if launched > 1 and num_processes == 1:
        raise ConfigError(
            f"This process is one of {launched} launched together (WORLD_SIZE={launched}), but training runs in a "
            "single process, so each would train alone. On a machine without GPUs pass --use_cpu true (the gloo "
            "backend); on GPUs check that each process sees its own device."
        )


def resolve_teacher_sharding(requested: str, accelerator, quantized: bool = False) -> str:
    """``replicate`` or ``shard`` for this run, from ``--teacher_sharding`` (``auto``, ``replicate``, ``shard``)."""
    kind, stage = _distributed_type(accelerator), zero_stage(accelerator)
    if requested == "auto":
        return "shard" if stage == 3 and not quantized else "replicate"
    if requested == "shard":
        if quantized:
            raise ConfigError(
                "A bitsandbytes (8/4-bit) teacher cannot be sharded: it is placed whole on each GPU while loading. "
                "Use --teacher_sharding replicate (or auto)."
            )
        if kind != "FSDP" and stage != 3:
            raise ConfigError(
                "--teacher_sharding shard needs FSDP or DeepSpeed ZeRO-3 (see docs/scaling.md); under "
                f"{kind if accelerator.num_processes > 1 else 'a single process'} each process holds a whole "
                "teacher. To save memory, load it in 8/4-bit or bfloat16, or put it on another device with "
                "--teacher_device."
            )
    elif requested == "replicate" and stage == 3 and not quantized:
        raise ConfigError(
            "Under DeepSpeed ZeRO-3 the teacher is loaded partitioned across processes, so it cannot be replicated. "
            "Use --teacher_sharding auto (a ZeRO-3 inference engine), or ZeRO-2 to keep a whole teacher per GPU."
        )
    return requested


def place_teacher(teacher: nn.Module, accelerator, args) -> tuple[nn.Module, torch.device]:
    """Put the frozen teacher where ``args`` says; returns the teacher to call and the device its inputs go to."""
    from .modeling import is_quantized

    quantized = is_quantized(teacher)
    sharding = resolve_teacher_sharding(args.teacher_sharding, accelerator, quantized=quantized)
    if quantized:
        if args.teacher_device is not None:
            logger.info("The quantised teacher stays where it was loaded; --teacher_device only chose that device.")
        return teacher, next(teacher.parameters()).device
    if sharding == "shard":
        if _distributed_type(accelerator) == "FSDP":
            plugin = accelerator.state.fsdp_plugin
            if getattr(plugin, "fsdp_version", 1) != 2:
                raise ConfigError(
                    "--teacher_sharding shard under FSDP needs FSDP2: set fsdp_version: 2 (as configs/accelerate/"
                    "fsdp.yaml does) or use --teacher_sharding replicate."
                )
            mesh = getattr(accelerator, "torch_device_mesh", None)
            if mesh is not None and mesh.ndim > 1:  # e.g. data-parallel × shard dimensions: shard like the student
                mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
            shard_teacher_fsdp2(teacher, mesh=mesh, offload_policy=getattr(plugin, "cpu_offload", None))
            return teacher, accelerator.device
        return deepspeed_teacher(teacher, accelerator), accelerator.device
    device = torch.device(args.teacher_device) if args.teacher_device is not None else args.device
    teacher.to(device)
    return teacher, device


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (``model.layers``, ``transformer.h``, ...)."""
    return decoder_layers(model)


def shard_teacher_fsdp2(teacher: nn.Module, mesh=None, offload_policy=None) -> nn.Module:
    """Shard a frozen teacher with FSDP2 ``fully_shard``: each block, then the root (embeddings, norm, head).

    Each process keeps 1/N of every weight. In the forward pass each block's weights are gathered just before it
    runs and freed after it (``reshard_after_forward``), so the peak is one whole block plus the shards. Every
    process must call the teacher the same number of times, which the Trainer's even batches guarantee.
    ``mesh`` defaults to all processes on the current device type.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": True}
    if offload_policy is not None and not isinstance(offload_policy, bool):
        kwargs["offload_policy"] = offload_policy
    for block in transformer_blocks(teacher):
        fully_shard(block, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher


def deepspeed_teacher(teacher: nn.Module, accelerator):
    """The teacher as a DeepSpeed ZeRO-3 inference engine (no optimizer), its weights partitioned like the student's.

    The run's DeepSpeed config is reused without its optimizer, scheduler and optimizer offload; the bucket sizes
    left as ``auto`` (which Trainer only fills for the student, at train time) are set from the teacher's width.
    """
    try:
        import deepspeed
    except ImportError:
        raise ImportError(f"A ZeRO-3 teacher needs DeepSpeed, which is not installed: {DEEPSPEED_EXTRA}") from None
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
    if hidden:
        defaults = {
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
        }
        for key, value in defaults.items():
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def wrap_student_for_training(trainer) -> None:
    """Under DDP, wrap the student for training before an evaluation that comes before ``train()``.

    Trainer's ``evaluation_loop`` prepares a not-yet-trained model with ``prepare_model(evaluation_mode=True)``,
    which marks it as prepared without the DDP wrapper; a later ``train()`` then trusts that mark, and the
    processes never average their gradients (each trains on its own shard of the data). Preparing it here for
    training gives ``train()`` the DDP-wrapped model, which the evaluation leaves alone.
    """
    if not is_ddp(trainer.accelerator) or trainer.model_wrapped is not trainer.model:
        return
    if not any(p.requires_grad for p in trainer.model.parameters()):
        return
    trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)


def evaluates_inside_training(accelerator) -> bool:
    """FSDP and DeepSpeed runs evaluate the untrained student from inside ``train()`` (``eval_on_start``).

    Trainer's evaluation of a not-yet-trained model prepares it alone, which FSDP2 refuses (it shards model and
    optimizer together) and which leaves DeepSpeed with an inference engine; at step 0 of ``train()`` the
    student is already prepared for training, as for every later evaluation.
    """
    return _distributed_type(accelerator) in ("FSDP", "DEEPSPEED")


class FirstEvaluation(TrainerCallback):
    """Keeps the metrics of the evaluation at step 0 (``eval_on_start``): the untrained student's."""

    def __init__(self):
        self.metrics: dict[str, float] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.metrics is None and state.global_step == 0 and metrics is not None:
            self.metrics = dict(metrics)


def world_size_from_env() -> str | None:
    return os.environ.get("WORLD_SIZE")
