"""What a pruned model keeps: the target shape checked against the teacher, then the units chosen by importance.

Grouped-query attention: with ``g = heads / kv_heads`` query heads per key/value group in the teacher and
``g' = heads' / kv_heads'`` in the target, each layer keeps the ``kv_heads'`` groups whose ``g'`` best query
heads score highest (summed), and in each kept group those ``g'`` heads. Dropping query heads evenly within the
groups (``kv_heads' = kv_heads``) and dropping whole groups (``g' = g``) are the two ends of the same rule; both
keep every kept query head attached to its own key/value head, which is what makes the cut exact (a query head
moved to another group would read other keys). Heads, neurons and layers keep the teacher's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.prune import PRUNE_TARGET_KEYS, normalise_target
from ..errors import PruneError
from .families import Family, Shape
from .importance import Importance


@dataclass
class KeepPlan:
    """Indices into the teacher kept by the pruned model (per kept layer for heads and neurons)."""

    shape: Shape
    layers: list[int]
    query_heads: list[list[int]]
    kv_heads: list[list[int]]
    neurons: list[list[int]]
    channels: list[int]

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "query_heads": self.query_heads,
            "kv_heads": self.kv_heads,
            "neurons": self.neurons,
            "channels": self.channels,
        }


def resolve_target(teacher_config, family: Family, target, flag: str = "--target") -> Shape:
    """The target shape: the given keys, the teacher's sizes for the rest; every limit checked with the fix."""
    given = normalise_target(target, flag)
    teacher = family.shape(teacher_config)
    sizes = {key: given.get(key, getattr(teacher, key)) for key in PRUNE_TARGET_KEYS}
    if "num_attention_heads" in given and "num_key_value_heads" not in given and family.name == "gpt2":
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
    if family.name == "gpt2" and "num_attention_heads" in given and "hidden_size" not in given:
        sizes["hidden_size"] = sizes["num_attention_heads"] * teacher.head_dim
    for key in PRUNE_TARGET_KEYS:
        if sizes[key] > getattr(teacher, key):
            what = "deeper" if key == "num_hidden_layers" else "wider"
            raise PruneError(
                f"{flag}: {key}={sizes[key]} is {what} than the teacher ({getattr(teacher, key)}); pruning only "
                f"removes. Use at most {getattr(teacher, key)}."
            )
    heads, kv = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if heads % kv:
        divisors = [d for d in range(1, teacher.num_key_value_heads + 1) if heads % d == 0]
        raise PruneError(
            f"{flag}: {heads} query heads cannot be split evenly over {kv} key/value groups. Use a "
            f"num_key_value_heads that divides {heads} ({', '.join(map(str, divisors))}), or a multiple of {kv} heads."
        )
    group, teacher_group = heads // kv, teacher.num_attention_heads // teacher.num_key_value_heads
    if group > teacher_group:
        raise PruneError(
            f"{flag}: {heads} query heads over {kv} key/value groups is {group} per group, but the teacher's groups "
            f"hold {teacher_group}; a query head cannot join another group. Keep more groups: num_key_value_heads "
            f"≥ {-(-heads // teacher_group)}."
        )
    shape = Shape(**sizes, head_dim=teacher.head_dim)
    family.check_shape(teacher, shape, flag)
    return shape


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores in their original order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def choose(
    importance: Importance, target: Shape, aggregation: str, layer_score: str, teacher_layers: list[int] | None = None
) -> KeepPlan:
    """The units to keep: the best layers (or ``teacher_layers`` as given), then per kept layer its best heads
    (by group) and neurons, then the channels scoring highest over the kept layers' norms."""
    teacher = importance.shape
    layers = teacher_layers or _top(importance.layers(layer_score), target.num_hidden_layers)
    head_scores, neuron_scores = importance.heads(aggregation), importance.neurons(aggregation)
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    keep_per_group = target.num_attention_heads // target.num_key_value_heads
    query_heads, kv_heads, neurons = [], [], []
    for layer in layers:
        by_group = head_scores[layer].view(teacher.num_key_value_heads, group)
        within = [_top(by_group[g], keep_per_group) for g in range(teacher.num_key_value_heads)]
        group_scores = torch.tensor([float(by_group[g, within[g]].sum()) for g in range(len(within))])
        groups = _top(group_scores, target.num_key_value_heads)
        kv_heads.append(groups)
        query_heads.append([g * group + h for g in groups for h in within[g]])
        neurons.append(_top(neuron_scores[layer], target.intermediate_size))
    channels = _top(importance.channels(aggregation, layers), target.hidden_size)
    return KeepPlan(target, list(layers), query_heads, kv_heads, neurons, channels)


def check_layers(teacher_layers: list[int], teacher: Shape) -> list[int]:
    """Explicit teacher layer indices (0-based, increasing, in range)."""
    layers = [int(i) for i in teacher_layers]
    if sorted(set(layers)) != layers or not all(0 <= i < teacher.num_hidden_layers for i in layers):
        raise PruneError(
            f"teacher_layers must be increasing indices in 0..{teacher.num_hidden_layers - 1}, got {teacher_layers}."
        )
    return layers
