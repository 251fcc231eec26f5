"""Cut a teacher down to a :class:`~distily.pruning.plan.KeepPlan`: a new model of the pruned config whose every
tensor is the teacher's, sliced along each dimension by its family's :class:`~distily.pruning.families.Rule`.

Every tensor of the pruned model is accounted for: a tensor with no rule must have the teacher's shape, and a
sliced one that does not come out at the pruned model's shape is an error, never a silent random init.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..errors import PruneError
from ..layer_mappers import source_record
from ..modeling import decoder_layers_path
from .families import Family, Shape, pruned_config
from .plan import KeepPlan


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """The rows of a head-major projection that belong to ``heads``."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]) if heads else torch.empty(0)


def _indices(plan: KeepPlan, teacher: Shape, layer: int | None) -> dict[str, torch.Tensor]:
    """The index set of each rule symbol, for one kept layer (position ``layer`` in the plan) or the top level."""
    sets = {"C": torch.tensor(plan.channels)}
    if layer is not None:
        q = _rows(plan.query_heads[layer], teacher.head_dim)
        sets["Q"] = q
        sets["KV"] = _rows(plan.kv_heads[layer], teacher.head_dim)
        sets["N"] = torch.tensor(plan.neurons[layer])
        hidden = teacher.num_attention_heads * teacher.head_dim
        sets["QKV"] = torch.cat([q, q + hidden, q + 2 * hidden])
    return {key: value.long() for key, value in sets.items()}


@torch.no_grad()
def trim(teacher: PreTrainedModel, family: Family, plan: KeepPlan, dtype: torch.dtype = torch.float32):
    """The pruned model (float32 by default, train mode), with ``config.distily_init`` naming what it kept."""
    teacher_shape = family.shape(teacher.config)
    config = pruned_config(teacher.config, family, teacher_shape, plan.shape, plan.layers)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix = decoder_layers_path(model)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    teacher_state = teacher.state_dict()
    scale = family.norm_scale(teacher_shape, plan.shape)
    for name, tensor in model.state_dict().items():
        match = pattern.match(name)
        position = int(match.group(1)) if match else None
        source = f"{prefix}.{plan.layers[position]}.{match.group(2)}" if match else name
        if source not in teacher_state:
            raise PruneError(f"The pruned model's tensor {name} has no teacher tensor {source} to come from.")
        value = teacher_state[source]
        rule = family.rule(name)
        if rule is not None:
            sets = _indices(plan, teacher_shape, position)
            for dim, symbol in enumerate(rule.dims):
                if symbol is not None:
                    value = value.index_select(dim, sets[symbol].to(value.device))
            if rule.norm_gain and scale != 1.0:
                value = value.to(torch.float64) * scale
        if value.shape != tensor.shape:
            raise PruneError(
                f"Cannot cut {source} {tuple(teacher_state[source].shape)} to {name} {tuple(tensor.shape)} for "
                f"{type(teacher).__name__}: this layout is not one distily's {family.name} family knows."
            )
        tensor.copy_(value.to(tensor.dtype))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.config.distily_init = source_record(teacher.config, plan.layers, pruned=True)
    model.train()
    return model
