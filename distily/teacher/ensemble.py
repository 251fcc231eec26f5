"""Several teachers at once: their weights, their shared tokenizer, and the mixture signal the loss reads.

A :class:`TeacherEnsemble` is what :class:`distily.DistillationTrainer` takes as ``teacher_model`` to train from
several teachers: each :class:`TeacherMember` a frozen model (or a recorded cache), a name, a positive weight and
optionally its own device. Weights are normalised to sum to one. The target of the logit terms is their weighted
mixture (:mod:`distily.mixture`), or with ``routed=True`` the teacher each token's document names (the batch's
``teacher_ids``, see :mod:`distily.data.routing`). Live teachers run one after another per batch, so memory holds
one teacher's activations at a time (plus each one's final hidden states, ``tokens × hidden``; the heads run per
chunk). Hidden-state and attention terms read one teacher, ``feature_teacher`` (default: the first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..chunked import HeadTeacherSignal, LogitsTeacherSignal, SparseTeacherSignal, TeacherSignal, teacher_hidden_states
from ..data.hashing import tokenizer_fingerprint
from ..data.routing import ROUTE_COLUMN
from ..errors import ConfigError
from ..mixture import (
    accumulate,
    as_logits,
    merge_sparse,
    mixture_logits,
    normalised_log_weights,
    route_log_weights,
    route_sparse,
)
from ..sparse import SparseTeacher

logger = logging.getLogger(__name__)


@dataclass
class TeacherMember:
    """One teacher of an ensemble: a frozen model (or ``None`` for a recorded one), its name and weight, and the
    device it runs on (``None``: the run's ``teacher_device`` or the student's)."""

    model: nn.Module | None
    name: str
    weight: float = 1.0
    device: str | None = None
    cache: object | None = None  # a distily.teacher.cache.TeacherCache for a recorded teacher


class TeacherEnsemble:
    """Several teachers sharing the student's tokenizer (see the module docstring).

    Raises :class:`ConfigError` for no member, a weight that is not positive, two members with one name, or a
    ``feature_teacher`` that names none of them.
    """

    def __init__(self, members: list[TeacherMember], feature_teacher: str | None = None, routed: bool = False):
        if not members:
            raise ConfigError("A teacher ensemble needs at least one teacher (--teacher NAME, once per teacher).")
        names = [member.name for member in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"Two teachers share a name in {names}: give each --teacher once (or its own name).")
        for member in members:
            if not isinstance(member.weight, (int, float)) or not member.weight > 0 or member.weight == float("inf"):
                raise ConfigError(
                    f"Teacher {member.name!r} has weight {member.weight}: every teacher weight must be a positive "
                    "number (--teacher_weights, or weight: in the teachers: list)."
                )
        live = {member.model is not None for member in members}
        if len(live) != 1:
            raise ConfigError("Mix either live teachers or recorded ones (teacher caches), not both.")
        if feature_teacher is not None and feature_teacher not in names:
            raise ConfigError(f"--feature_teacher {feature_teacher!r} is none of the teachers: {', '.join(names)}.")
        self.members = list(members)
        self.routed = routed
        self.feature_teacher = feature_teacher or names[0]
        self.log_weights = normalised_log_weights([member.weight for member in members])

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    @property
    def weights(self) -> list[float]:
        """The normalised weights (they sum to one)."""
        return self.log_weights.exp().tolist()

    @property
    def recorded(self) -> bool:
        return self.members[0].model is None

    @property
    def feature_member(self) -> TeacherMember:
        """The one teacher the hidden-state and attention terms read."""
        return self.members[self.names.index(self.feature_teacher)]

    def batch_log_weights(self, inputs: dict[str, Tensor], mask: Tensor) -> Tensor:
        """The weights of the batch's selected tokens: ``(T,)`` for a mixture, one-hot ``(N, T)`` when routed."""
        if not self.routed:
            return self.log_weights
        return route_log_weights(self.batch_route(inputs, mask), len(self.members))

    def batch_route(self, inputs: dict[str, Tensor], mask: Tensor) -> Tensor:
        """The teacher index of each selected token ``(N,)`` (routed ensembles)."""
        if ROUTE_COLUMN not in inputs:
            raise ConfigError(
                f"The teachers are routed by a data column, but the batch has no {ROUTE_COLUMN!r}: prepare the data "
                "with --teacher_column (distily.data.prepare_datasets(..., routing=...))."
            )
        return inputs[ROUTE_COLUMN][:, :-1][mask].long()

    def describe(self) -> list[dict]:
        """Name, normalised weight and device of every teacher (manifests, model cards)."""
        return [
            {
                "name": member.name,
                "weight": weight,
                "device": member.device,
                "features": member.name == self.feature_teacher,
            }
            for member, weight in zip(self.members, self.weights, strict=True)
        ]


def as_ensemble(teacher_model) -> TeacherEnsemble | None:
    """``teacher_model`` if it is an ensemble, else ``None`` (a single teacher: today's path)."""
    return teacher_model if isinstance(teacher_model, TeacherEnsemble) else None


def check_same_tokenizer(tokenizers: dict[str, object]) -> None:
    """Refuse teachers whose tokenizers differ (vocabulary, merges, special tokens: the fingerprint of
    :func:`distily.data.hashing.tokenizer_fingerprint`)."""
    fingerprints = {name: tokenizer_fingerprint(tokenizer) for name, tokenizer in tokenizers.items()}
    if len(set(fingerprints.values())) > 1:
        first = next(iter(fingerprints))
        differ = [name for name, value in fingerprints.items() if value != fingerprints[first]]
        raise ConfigError(
            f"The teachers' tokenizers differ: {', '.join(differ)} tokenise differently from {first!r} (vocabulary, "
            "merges or special tokens). Several teachers must share the student's tokenizer: pick teachers of one "
            "tokenizer family, or distil from one of them."
        )


# -- one member's signal -----------------------------------------------------------------------------------------


def member_inputs(inputs: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The batch's ``input_ids`` and ``attention_mask`` on a teacher's input device."""
    attention_mask = inputs.get("attention_mask")
    return inputs["input_ids"].to(device), attention_mask.to(device) if attention_mask is not None else None


def live_head_signal(model: nn.Module, device, inputs: dict[str, Tensor], mask: Tensor) -> HeadTeacherSignal:
    """A live teacher's final hidden states at the selected tokens, its head applied per chunk."""
    with torch.inference_mode():
        hidden = teacher_hidden_states(model, *member_inputs(inputs, device))
        hidden = hidden[:, :-1][mask.to(hidden.device)]
    return HeadTeacherSignal(hidden.clone(), model.get_output_embeddings(), inputs["input_ids"].device)


def live_logits(model: nn.Module, device, inputs: dict[str, Tensor], mask: Tensor) -> Tensor:
    """A live teacher's full logits at the selected tokens, on the student's device."""
    input_ids, attention_mask = member_inputs(inputs, device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits[:, :-1][mask.to(logits.device)].to(inputs["input_ids"].device)


# -- the mixture signals -----------------------------------------------------------------------------------------


class MixtureSignal(TeacherSignal):
    """The weighted mixture of dense teacher signals at temperature ``T``, as logits ``T · log p_mix`` over the
    first ``size`` ids, one range of tokens at a time (``None`` members: weight zero on every token)."""

    def __init__(self, members: list[TeacherSignal | None], log_weights: Tensor, temperature: float, size: int):
        self.members, self.log_weights, self.temperature, self.size = members, log_weights, temperature, size

    def logits(self, rows: slice) -> Tensor:
        log_weights = self.log_weights if self.log_weights.dim() == 1 else self.log_weights[rows]
        member_logits = [member.logits(rows) if member is not None else None for member in self.members]
        return mixture_logits(member_logits, log_weights, self.temperature, self.size)


def eager_mixture(
    models: list[tuple[nn.Module, object] | None],
    inputs: dict[str, Tensor],
    mask: Tensor,
    log_weights: Tensor,
    temperature: float,
    size: int,
) -> LogitsTeacherSignal:
    """The full-logit path: each live teacher's logits in turn, added to a running mixture and freed, so at most
    one teacher's logits and the mixture are in memory."""
    acc = None
    for index, entry in enumerate(models):
        if entry is not None:
            acc = accumulate(acc, live_logits(*entry, inputs, mask), log_weights, index, temperature, size)
    return LogitsTeacherSignal(as_logits(acc, temperature))


class SparseMixtureSignal(SparseTeacherSignal):
    """Recorded teachers merged into one sparse teacher per range of tokens (:func:`distily.mixture.merge_sparse`),
    or, with per-token one-hot weights (routing), the named teacher's own top-k (:func:`~distily.mixture.route_sparse`).

    ``teacher_nll`` is ``Σ_j w_j · NLL_j``: the named teacher's when routed; for a mixture an upper bound of the
    mixture's own NLL (Jensen), since the recorded teachers kept only their top-k.
    """

    def __init__(self, members: list[SparseTeacherSignal | None], log_weights: Tensor, size: int):
        self.members, self.log_weights, self.size = members, log_weights, size
        self.routed = log_weights.dim() == 2

    def top_k(self, rows: slice) -> SparseTeacher:
        parts = [member.top_k(rows) if member is not None else None for member in self.members]
        if self.routed:
            device = next(part.ids.device for part in parts if part is not None)
            return route_sparse(parts, self.log_weights[rows].argmax(-1).to(device))
        return merge_sparse(parts, self.log_weights, self.size)

    def teacher_nll(self, rows: slice) -> Tensor:
        log_weights = self.log_weights if self.log_weights.dim() == 1 else self.log_weights[rows]
        total = None
        for index, member in enumerate(self.members):
            if member is None:
                continue
            nll = member.teacher_nll(rows).to(torch.float64)
            weight = (log_weights[index] if log_weights.dim() == 1 else log_weights[:, index]).exp().to(nll.device)
            term = weight * nll
            total = term if total is None else total + term
        return total.float()
