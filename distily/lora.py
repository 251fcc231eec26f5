"""LoRA and DoRA students: train low-rank adapters on a frozen student, then merge them into its weights.

Useful when the student is an existing pretrained model (``--student PATH``) whose knowledge should be kept
while it learns the teacher's distributions, or when the optimizer states of a full student do not fit.

* :func:`apply_lora` wraps the student in a ``peft`` model with adapters on the chosen linear layers
  (``--lora_r``, ``--lora_alpha``, ``--lora_dropout``, ``--lora_target_modules``, ``--use_dora``);
* :func:`merge_peft` returns a plain ``transformers`` model with the adapters folded into the weights
  (``W + (alpha / r) · B A``; DoRA also rescales by its learned magnitude) -- what export and
  ``AutoModelForCausalLM.from_pretrained`` want;
* :func:`merge_adapter` does the same for adapters saved on disk;
* :func:`save_student` writes the end of a run: the merged model in the run folder, the adapters alone in
  ``adapter/``.

ReLoRA (periodically merging the adapters and starting new ones, for full-rank updates from low-rank steps)
is not built; docs/scaling.md has a note.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from .config import ConfigError, PeftArguments
from .modeling import merge_adapter
from .run_folder import RunFolder

logger = logging.getLogger(__name__)

ADAPTER_DIR = RunFolder.ADAPTER_DIR  # re-exported


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (possibly wrapped by DDP/FSDP/DeepSpeed, unwrap it first)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a core dependency, but a model can exist without it being importable
        return False
    return isinstance(model, PeftModel)


def apply_lora(model: PreTrainedModel, args: PeftArguments):
    """``model`` with LoRA (or DoRA) adapters on ``args.target_modules``; only the adapters are trainable.

    The adapters start as a zero update (B = 0), so the wrapped model computes exactly what ``model`` did.
    """
    if not args.enabled:
        raise ConfigError("apply_lora needs PeftArguments with lora_r set (e.g. lora_r=16).")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        use_dora=args.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # peft's message names the modules it could not find
        raise ConfigError(f"--lora_target_modules {args.lora_target_modules!r}: {err}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(
        "%s student: %d trainable parameters of %d (%.2f%%).",
        "DoRA" if args.use_dora else "LoRA", trainable, total, 100.0 * trainable / max(total, 1),
    )  # fmt: skip
    return peft_model


def merge_peft(model: nn.Module) -> nn.Module:
    """The student with its adapters merged into the base weights, as a plain ``transformers`` model.

    The given model is left as it is (the merge happens on a copy), so training or evaluating it can go on. A
    model without adapters is returned unchanged. This is the hook export uses for a LoRA/DoRA student.
    """
    if not is_peft_model(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def merge_saved_adapter(base: str | Path, adapter: str | Path) -> PreTrainedModel:
    """Alias of :func:`merge_adapter` with the base first (its earlier signature)."""
    return merge_adapter(adapter, base)


def save_student(trainer, output_dir: str | Path, base: str | None = None) -> None:
    """Save the trained student in ``output_dir`` so that ``AutoModelForCausalLM.from_pretrained`` loads it.

    A full student is saved by ``trainer.save_model``. A LoRA/DoRA student is saved twice: its adapters alone in
    ``output_dir/adapter`` (``PeftModel.from_pretrained(base_model, ...)`` loads them), and the merged model in
    ``output_dir``. When the weights are sharded across processes (FSDP, DeepSpeed ZeRO-3) the merge reloads the
    base student from ``base`` (the ``--student`` folder) and applies the saved adapters.
    Call it on every process: saving gathers sharded weights.
    """
    output_dir = Path(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        trainer.save_model(str(output_dir))
        return
    adapter_dir = RunFolder(output_dir).adapter_dir
    trainer.save_model(str(adapter_dir))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    from .distributed import weights_are_sharded

    if weights_are_sharded(trainer.accelerator):
        if base is None:
            raise ConfigError("A LoRA student trained with sharded weights is merged from --student; none was given.")
        merged = merge_adapter(adapter_dir, base)
    else:
        merged = merge_peft(model)
    merged.save_pretrained(str(output_dir))
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(output_dir))
    logger.info("Saved the merged student in %s and its adapters in %s.", output_dir, adapter_dir)
