"""The layer-mapper registry: which teacher layer each student layer learns from.

A mapper receives the two layer counts and returns ``(student_layer, teacher_layer)`` pairs. Layers are
numbered from 1 (the output of the first decoder layer) to the model's ``num_hidden_layers`` (the output of
the last decoder layer, before the final norm), as in Hugging Face's ``hidden_states[i]``. Parameters come
from the component's ``layer_mapper_kwargs``, never from the name. :func:`map_layers` checks every pair.

With ``S`` student and ``T`` teacher layers (golden values for S = 4, T = 30 in ``tests/test_hidden.py``):

* ``all``: every student layer s to ``⌊s·T/S⌋`` -> (1,7) (2,15) (3,22) (4,30)
* ``last``: the last layers -> (4,30)
* ``last_k``: the last ``k`` pairs of ``all`` (k=2) -> (3,22) (4,30)
* ``indices``: explicit ``pairs`` -> as given
* ``uniform``: DistilBERT-style, every ``stride``-th teacher layer (default ``⌊T/S⌋``): s to ``s·stride``
  -> (1,7) (2,14) (3,21) (4,28)
* ``uniform_last``: the same stride, aligned so the last layers meet: s to ``T − (S − s)·stride``
  -> (1,9) (2,16) (3,23) (4,30)
* ``source``: each student layer to the teacher layer it was copied or pruned from (``layers``, default the
  student's record) -> for the layer subset [0, 10, 19, 29]: (1,1) (2,11) (3,20) (4,30)
* ``auto`` (the default of hidden-state and attention components): ``source`` for a pruned student whose record
  names layers of this teacher, else ``uniform_last``. A layer-subset student keeps ``uniform_last``, the pairing
  the hidden-state benchmark measured (notes.md); ask for ``source`` to pair it by origin.

A student records where its layers came from in ``config.distily_init`` (:func:`source_record`): the layers of
the model it was cut from, and, when that model was itself cut from another (iterative pruning: prune, distil,
prune the distilled student again), the composed layers of every model up the chain, so ``source`` pairs the
round-two student with the original teacher as well as with the round-one student.

Register your own::

    @distily.register_layer_mapper("first")
    def first(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
        return [(1, 1)]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from .modeling import layer_count
from .registry import Registry, check_kwargs

LayerPairs = list[tuple[int, int]]
LayerMapper = Callable[..., LayerPairs]

LAYER_MAPPERS: Registry = Registry("layer mapper", "distily.register_layer_mapper")


def register_layer_mapper(name: str, *, override: bool = False):
    """Register a function ``(student_layers, teacher_layers, **kwargs) -> [(s, t), ...]`` under ``name``."""
    return LAYER_MAPPERS.register(name, override=override)


@register_layer_mapper("all")
def all_layers(student_layers: int, teacher_layers: int) -> LayerPairs:
    """Every student layer s to its proportional teacher layer ⌊s·T/S⌋ (the last to the last)."""
    return [(s, s * teacher_layers // student_layers) for s in range(1, student_layers + 1)]


@register_layer_mapper("last")
def last(student_layers: int, teacher_layers: int) -> LayerPairs:
    """The last student layer to the last teacher layer: (S, T)."""
    return [(student_layers, teacher_layers)]


@register_layer_mapper("last_k")
def last_k(student_layers: int, teacher_layers: int, *, k: int = 2) -> LayerPairs:
    """The last ``k`` pairs of ``all``: s in S−k+1..S to ⌊s·T/S⌋."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= student_layers:
        raise ValueError(
            f"last_k needs 1 <= k <= {student_layers} (the student's layers), got k={k!r}. "
            "Set layer_mapper_kwargs: {k: 2}."
        )
    return all_layers(student_layers, teacher_layers)[-k:]


@register_layer_mapper("indices")
def indices(student_layers: int, teacher_layers: int, *, pairs: Sequence[Sequence[int]] = ()) -> LayerPairs:
    """Explicit ``pairs``: ``[[student_layer, teacher_layer], ...]``, used as given."""
    if not pairs:
        raise ValueError("indices needs layer_mapper_kwargs: {pairs: [[1, 8], [4, 30]]} (student, teacher) pairs.")
    result = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"indices: each pair is [student_layer, teacher_layer], got {list(pair)!r}.")
        result.append((int(pair[0]), int(pair[1])))
    return result


def _stride(student_layers: int, teacher_layers: int, stride: int | None) -> int:
    stride = teacher_layers // student_layers if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"uniform mappers need a whole stride >= 1, got {stride!r}.")
    if stride * student_layers > teacher_layers:
        raise ValueError(
            f"stride {stride} × {student_layers} student layers passes the teacher's {teacher_layers} layers. "
            f"Use a stride of at most {teacher_layers // student_layers}."
        )
    return stride


@register_layer_mapper("uniform")
def uniform(student_layers: int, teacher_layers: int, *, stride: int | None = None) -> LayerPairs:
    """DistilBERT-style: student layer s to teacher layer s·stride (default stride ⌊T/S⌋)."""
    stride = _stride(student_layers, teacher_layers, stride)
    return [(s, s * stride) for s in range(1, student_layers + 1)]


@register_layer_mapper("uniform_last")
def uniform_last(student_layers: int, teacher_layers: int, *, stride: int | None = None) -> LayerPairs:
    """``uniform`` shifted so the last layers meet: s to T − (S − s)·stride (default stride ⌊T/S⌋)."""
    stride = _stride(student_layers, teacher_layers, stride)
    return [(s, teacher_layers - (student_layers - s) * stride) for s in range(1, student_layers + 1)]


@register_layer_mapper("source")
def source(student_layers: int, teacher_layers: int, *, layers: Sequence[int] = ()) -> LayerPairs:
    """Each student layer s to the teacher layer it was copied or pruned from: ``layers[s − 1] + 1``.

    ``layers`` are 0-based teacher indices, one per student layer; left out, they are read from the student's
    ``config.distily_init`` (a layer-subset or pruned student records them; see :func:`student_source_layers`).
    """
    if len(layers) != student_layers:
        raise ValueError(
            f"source needs one teacher layer per student layer ({student_layers}), got {list(layers)!r}. The student "
            "records them when it is built from the teacher (--student_init auto/teacher/prune); else set "
            "layer_mapper_kwargs: {layers: [0, 10, 19, 29]}."
        )
    return [(s, int(layers[s - 1]) + 1) for s in range(1, student_layers + 1)]


@register_layer_mapper("auto")
def auto(student_layers: int, teacher_layers: int, *, layers: Sequence[int] = ()) -> LayerPairs:
    """``source`` when ``layers`` are given (the trainer passes a pruned student's record), else ``uniform_last``."""
    if layers:
        return source(student_layers, teacher_layers, layers=layers)
    return uniform_last(student_layers, teacher_layers)


def _layer_chain(record: dict) -> list[dict]:
    """A ``distily_init`` record's layers per model up its chain, nearest first: ``[{"num_hidden_layers": N,
    "layers": [...]}, ...]`` (the model it was cut from, then its ``ancestors``)."""
    nearest = {"num_hidden_layers": record.get("teacher_num_hidden_layers"), "layers": record["teacher_layers"]}
    return [nearest, *record.get("ancestors", [])]


def source_record(parent_config, layers: Sequence[int], **extra) -> dict:
    """The ``distily_init`` of a model whose layers are ``layers`` (0-based) of the model configured by
    ``parent_config``: ``teacher_layers`` (of the parent) and ``ancestors``, the same layers composed through the
    parent's own record (``[{"num_hidden_layers": N, "layers": [...]}, ...]``, nearest first)."""
    layers = [int(layer) for layer in layers]
    record = {"from": "teacher", "teacher_layers": layers, **extra}
    parent = getattr(parent_config, "distily_init", None) or {}
    if parent.get("from") == "teacher" and parent.get("teacher_layers"):
        record["ancestors"] = [
            {"num_hidden_layers": entry["num_hidden_layers"], "layers": [int(entry["layers"][i]) for i in layers]}
            for entry in _layer_chain(parent)
        ]
    record["teacher_num_hidden_layers"] = layer_count(parent_config)
    return record


def student_source_layers(model, teacher_layers: int | None = None) -> list[int]:
    """The 0-based layer of the teacher each layer of ``model`` came from, as it recorded them (empty if it did
    not). With ``teacher_layers`` (the teacher's layer count), the record of the model in its chain with that many
    layers: the one it was cut from, or an ancestor; empty when none has that many."""
    config = getattr(model, "config", None)
    init = getattr(config, "distily_init", None) or {}
    if init.get("from") != "teacher" or not init.get("teacher_layers"):
        return []
    direct = list(init["teacher_layers"])
    if teacher_layers is None:
        return direct
    for entry in _layer_chain(init):
        if entry["num_hidden_layers"] == teacher_layers:
            return list(entry["layers"])
    # Records written before the layer counts were: the direct layers, when they fit this teacher.
    if init.get("teacher_num_hidden_layers") is None and max(direct) < teacher_layers:
        return direct
    return []


def mapper_kwargs_for(name: str, kwargs: dict | None, student, teacher_layers: int) -> dict:
    """``kwargs`` with the student's record as ``layers`` where the mapper reads it: always for ``source``; for
    ``auto`` only when the student was pruned (``distily_init["pruned"]``)."""
    kwargs = dict(kwargs or {})
    if name not in ("source", "auto") or "layers" in kwargs:
        return kwargs
    init = getattr(getattr(student, "config", None), "distily_init", None) or {}
    if name == "auto" and not init.get("pruned"):
        return kwargs
    layers = student_source_layers(student, teacher_layers)
    return {**kwargs, "layers": layers} if layers or name == "source" else kwargs


def check_mapper_kwargs(name: str, kwargs: dict | None) -> None:
    """Reject parameters the mapper ``name`` does not take, listing those it does."""
    params = list(inspect.signature(LAYER_MAPPERS[name]).parameters.values())[2:]
    check_kwargs(f"Layer mapper {name!r}", "layer_mapper_kwargs", params, kwargs)


def map_layers(name: str, student_layers: int, teacher_layers: int, kwargs: dict | None = None) -> LayerPairs:
    """The pairs of mapper ``name`` for these layer counts, checked: in range, at least one, no duplicates."""
    check_mapper_kwargs(name, kwargs)
    pairs = [(int(s), int(t)) for s, t in LAYER_MAPPERS[name](student_layers, teacher_layers, **(kwargs or {}))]
    if not pairs:
        raise ValueError(f"Layer mapper {name!r} returned no pairs for {student_layers} -> {teacher_layers} layers.")
    bad = [(s, t) for s, t in pairs if not (1 <= s <= student_layers and 1 <= t <= teacher_layers)]
    if bad:
        raise ValueError(
            f"Layer mapper {name!r} gave pairs out of range: {bad}. Layers are numbered 1..{student_layers} for the "
            f"student and 1..{teacher_layers} for the teacher (the output of each decoder layer)."
        )
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"Layer mapper {name!r} gave the same pair twice: {pairs}.")
    return pairs
