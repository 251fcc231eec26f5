"""The objective: the logits term plus intermediate signals (hidden states, attention maps), by name."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .parsing import parse_json_dict

SIGNALS = ("logits", "hidden_states", "attentions")
# Per-signal defaults of a component's fields (logits take their divergence from --loss/--temperature/--alpha).
COMPONENT_DEFAULTS = {
    # layer_norm: a raw MSE between residual streams is in the thousands on SmolLM2 (massive activations) and
    # drowns the logit term; the normalised MSE is about 1 (notes.md).
    # auto: a pruned student's layers to the teacher layers they came from, else uniform_last (layer_mappers.py).
    "hidden_states": {"loss": "mse", "layer_mapper": "auto", "projector": "linear", "norm": "layer_norm"},
    "attentions": {"loss": "kl", "layer_mapper": "auto", "projector": "identity", "norm": "none"},
}
COMPONENT_KEYS = (
    "signal",
    "weight",
    "loss",
    "layer_mapper",
    "layer_mapper_kwargs",
    "projector",
    "projector_kwargs",
    "norm",
)
DEFAULT_OBJECTIVE = {"logits": {"signal": "logits", "weight": 1.0}}


@dataclass
class ObjectiveComponent:
    """One term of the objective: ``weight · loss(projector(student features), teacher features)``.

    ``signal`` is ``logits`` (its divergence is ``--loss`` at ``--temperature``, mixed with CE by ``--alpha``),
    ``hidden_states`` (decoder layer outputs) or ``attentions`` (attention probabilities; needs eager
    attention). ``layer_mapper`` pairs student and teacher layers (:mod:`distily.layer_mappers`), ``projector``
    maps the student's width to the teacher's (:mod:`distily.projectors`), ``norm`` and ``loss`` come from
    :mod:`distily.feature_losses`.
    """

    name: str
    signal: str
    weight: float = 1.0
    loss: str | None = None
    layer_mapper: str | None = None
    layer_mapper_kwargs: dict = field(default_factory=dict)
    projector: str | None = None
    projector_kwargs: dict = field(default_factory=dict)
    norm: str | None = None

    def __post_init__(self):
        where = f"objective.{self.name}"
        if self.signal not in SIGNALS:
            raise ConfigError(f"{where}.signal {self.signal!r} is not one of {', '.join(SIGNALS)}.")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ConfigError(f"{where}.weight must be a number, got {self.weight!r}.")
        self.weight = float(self.weight)
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ConfigError(f"{where}.weight must be a finite number >= 0, got {self.weight}.")
        if self.signal == "logits":
            extra = [key for key in COMPONENT_KEYS[2:] if getattr(self, key) not in (None, {})]
            if extra:
                raise ConfigError(
                    f"{where} sets {', '.join(extra)}, but the logits term is configured by the top-level --loss, "
                    "--loss_kwargs, --temperature and --alpha; give it only a weight."
                )
            return
        for key, value in COMPONENT_DEFAULTS[self.signal].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key in ("layer_mapper_kwargs", "projector_kwargs"):
            value = getattr(self, key)
            value = parse_json_dict(value, f"{where}.{key}", "{}") if value is not None else {}
            setattr(self, key, value or {})
        from ..feature_losses import FEATURE_LOSSES, FEATURE_NORMS
        from ..layer_mappers import LAYER_MAPPERS, check_mapper_kwargs
        from ..projectors import PROJECTORS, check_projector_kwargs

        for key, registry in (
            ("loss", FEATURE_LOSSES),
            ("layer_mapper", LAYER_MAPPERS),
            ("projector", PROJECTORS),
            ("norm", FEATURE_NORMS),
        ):
            if getattr(self, key) not in registry:
                raise ConfigError(registry.unknown_message(getattr(self, key)) + f" Fix {where}.{key}.")
        if self.signal == "attentions" and (self.projector != "identity" or self.norm != "none"):
            raise ConfigError(
                f"{where}: attention maps are probabilities compared head by head; they take no projector or norm. "
                "Drop projector and norm (or set projector: identity, norm: none)."
            )
        try:
            check_mapper_kwargs(self.layer_mapper, self.layer_mapper_kwargs)
            check_projector_kwargs(self.projector, self.projector_kwargs)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (no name: it is the key), without fields the signal does not use."""
        if self.signal == "logits":
            return {"signal": "logits", "weight": self.weight}
        return {key: getattr(self, key) for key in COMPONENT_KEYS}


def parse_objective(value: Any) -> dict[str, dict[str, Any]]:
    """The ``objective`` setting as a canonical ``{name: component dict}``, validated.

    Accepts ``None`` (logits only), a mapping ``{name: {field: value}}`` (the name is the signal unless
    ``signal`` is given), a list of component dicts (each with ``signal`` and optionally ``name``), or either
    as a JSON string. A logits term of weight 1 is implied unless one is given: write ``logits: {weight: 0}``
    for an objective without logits. Every weight is >= 0 and they do not all vanish.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            value = None
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"--objective is not valid JSON ({err.msg}): {value!r}. Example: --objective "
                    '\'{"hidden_states": {"weight": 1.0}}\' or --objective.hidden_states.weight 1.0.'
                ) from None
    if value is None:
        value = {}
    if isinstance(value, list):
        mapping: dict[str, Any] = {}
        for index, item in enumerate(value):
            if not isinstance(item, dict) or "signal" not in item:
                raise ConfigError(f"objective[{index}] must be a mapping with a signal ({', '.join(SIGNALS)}).")
            item = dict(item)
            name = str(item.pop("name", item["signal"]))
            if name in mapping:
                raise ConfigError(f"objective has two components named {name!r}: give one a distinct name:.")
            mapping[name] = item
        value = mapping
    if not isinstance(value, dict):
        raise ConfigError(f"objective must be a mapping of components or a list, got {type(value).__name__}.")
    components: dict[str, ObjectiveComponent] = {}
    for name, spec in value.items():
        if spec is None:
            spec = {}
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            spec = {"weight": spec}  # shorthand: `hidden_states: 0.5`
        if not isinstance(spec, dict):
            raise ConfigError(f"objective.{name} must be a mapping of fields (weight, loss, ...), got {spec!r}.")
        unknown = sorted(set(spec) - set(COMPONENT_KEYS))
        if unknown:
            raise ConfigError(f"objective.{name} has unknown fields {unknown}; valid: {', '.join(COMPONENT_KEYS)}.")
        signal = spec.get("signal", name)
        if signal not in SIGNALS:
            raise ConfigError(
                f"objective.{name}: {signal!r} is not a signal ({', '.join(SIGNALS)}). Name the component after its "
                f"signal, or set its signal: field."
            )
        components[str(name)] = ObjectiveComponent(name=str(name), **{**spec, "signal": signal})
    if not any(c.signal == "logits" for c in components.values()):
        components = {"logits": ObjectiveComponent(name="logits", signal="logits"), **components}
    if sum(c.weight for c in components.values()) <= 0:
        raise ConfigError(
            "objective weights sum to zero: nothing would be trained. Give at least one component a weight > 0, "
            "e.g. --objective.logits.weight 1.0."
        )
    return {name: component.to_dict() for name, component in components.items()}


def objective_components(objective: dict[str, dict[str, Any]]) -> list[ObjectiveComponent]:
    """The canonical objective dict (see :func:`parse_objective`) as component objects."""
    return [ObjectiveComponent(name=name, **spec) for name, spec in objective.items()]
