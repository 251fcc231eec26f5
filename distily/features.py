"""Intermediate signals: decoder-layer outputs and attention maps, captured by hooks, and their objective.

Only the layers a component's mapper names are kept. A forward hook on each mapped decoder layer (or its
attention module) keeps that layer's output for the real tokens of the batch and nothing else; the teacher
runs under inference mode, so none of its other activations outlive its forward pass. For the student the
captured tensors are part of the autograd graph (they are kept alive for the backward pass anyway).

Layer ``i`` (1-based) is the output of the ``i``-th decoder layer, the residual stream before the final
norm. Attention maps are the softmax probabilities, which only eager attention materialises.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import Tensor, nn

from .config import ObjectiveComponent
from .errors import ConfigError
from .feature_losses import FEATURE_LOSSES, FEATURE_NORMS
from .layer_mappers import map_layers, mapper_kwargs_for
from .modeling import LAYER_LISTS, decoder_layers  # noqa: F401  (re-exported)
from .projectors import build_projector

logger = logging.getLogger(__name__)

ATTENTION_MODULES = ("self_attn", "attn", "attention", "self_attention")


def attention_module(layer: nn.Module) -> nn.Module:
    for name in ATTENTION_MODULES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ConfigError(f"Cannot find the attention module of {type(layer).__name__} (looked for {ATTENTION_MODULES}).")


def hidden_size(model: nn.Module) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return int(config.hidden_size)


def require_eager_attention(model: nn.Module, role: str) -> None:
    """Switch ``model`` to eager attention (the only kind that returns probabilities), or explain the fix."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "eager") == "eager":
        return
    try:
        model.set_attn_implementation("eager")
    except Exception as err:  # a model without an eager path
        raise ConfigError(
            f"An attentions objective needs the {role}'s attention probabilities, which only eager attention "
            f"returns, and {type(model).__name__} could not switch to it ({err}). Load the {role} with "
            "attn_implementation='eager', or drop the attentions component."
        ) from None
    logger.warning(
        "Switched the %s to eager attention for the attentions objective: it materialises (batch, heads, seq, seq) "
        "probabilities per layer, slower and larger than SDPA/flash attention.",
        role,
    )


def _select(tensor: Tensor, mask: Tensor) -> Tensor:
    """The real next-token positions ``mask`` (B, L-1) of a (B, L, ...) tensor: (N, ...)."""
    return tensor[:, :-1][mask.to(tensor.device)]


@contextlib.contextmanager
def capture(
    model: nn.Module, hidden_layers: set[int], attention_layers: set[int], mask: Tensor
) -> Iterator[dict[tuple[str, int], Tensor]]:
    """Within the block, forward passes of ``model`` fill the yielded dict with
    ``("hidden_states", i) -> (N, hidden)`` and ``("attentions", i) -> (N, heads, L)`` for the real tokens."""
    captured: dict[tuple[str, int], Tensor] = {}
    if not hidden_layers and not attention_layers:
        yield captured
        return
    layers = decoder_layers(model)
    handles = []

    def keep_hidden(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured["hidden_states", index] = _select(hidden, mask)

        return hook

    def keep_attention(index):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise ConfigError(
                    f"{type(model).__name__} returned no attention probabilities from layer {index}: they exist only "
                    "with eager attention. Load the model with attn_implementation='eager' "
                    "(model.set_attn_implementation('eager')), or drop the attentions component."
                )
            # (B, heads, L, L) -> (B, L, heads, L): one row of probabilities per query token and head.
            captured["attentions", index] = _select(weights.transpose(1, 2), mask)

        return hook

    try:
        for index in sorted(hidden_layers):
            handles.append(layers[index - 1].register_forward_hook(keep_hidden(index)))
        for index in sorted(attention_layers):
            handles.append(attention_module(layers[index - 1]).register_forward_hook(keep_attention(index)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class IntermediateObjective(nn.Module):
    """The hidden-state and attention components of an objective, with their projectors.

    For a component c with layer pairs P_c, norm n, projector f_p per pair and per-token loss D:
    ``L_c = (1/|P_c|) Σ_{(i,j)∈P_c} Σ_tokens D(n(f_p(s_i)), n(t_j))`` (summed over tokens; the trainer divides by
    the number of real tokens and multiplies by the component's weight). Projector parameters live in
    ``self.projectors[component][pair]``.
    """

    def __init__(self, components: list[ObjectiveComponent], student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.components = [c for c in components if c.signal != "logits"]
        student_layers, teacher_layers = len(decoder_layers(student)), len(decoder_layers(teacher))
        self.pairs: dict[str, list[tuple[int, int]]] = {}
        self.projectors = nn.ModuleDict()
        for component in self.components:
            try:
                # source and auto read the student's record of where its layers came from
                mapper_kwargs = mapper_kwargs_for(
                    component.layer_mapper, component.layer_mapper_kwargs, student, teacher_layers
                )
                pairs = map_layers(component.layer_mapper, student_layers, teacher_layers, mapper_kwargs)
                if component.signal == "hidden_states":
                    dims = hidden_size(student), hidden_size(teacher)
                    self.projectors[component.name] = nn.ModuleList(
                        build_projector(component.projector, *dims, component.projector_kwargs) for _ in pairs
                    )
            except ValueError as err:
                raise ConfigError(f"objective.{component.name}: {err}") from None
            self.pairs[component.name] = pairs
        if any(c.signal == "attentions" for c in self.components):
            require_eager_attention(student, "student")
            require_eager_attention(teacher, "teacher")

    def layers(self, role: str, signal: str) -> set[int]:
        """The layers of ``role`` (student or teacher) whose ``signal`` some component reads."""
        side = 0 if role == "student" else 1
        return {pair[side] for c in self.components if c.signal == signal for pair in self.pairs[c.name]}

    @contextlib.contextmanager
    def capture(self, model: nn.Module, role: str, mask: Tensor) -> Iterator[dict[tuple[str, int], Tensor]]:
        """Capture what this objective needs from ``model`` (``role``: student or teacher) during the block."""
        with capture(model, self.layers(role, "hidden_states"), self.layers(role, "attentions"), mask) as captured:
            yield captured

    def forward(
        self, student: dict[tuple[str, int], Tensor], teacher: dict[tuple[str, int], Tensor]
    ) -> dict[str, Tensor]:
        """Each component's loss summed over tokens (averaged over its layer pairs), by component name."""
        totals: dict[str, Tensor] = {}
        for component in self.components:
            loss_fn, norm = FEATURE_LOSSES[component.loss], FEATURE_NORMS[component.norm]
            pairs = self.pairs[component.name]
            total = None
            for index, (s, t) in enumerate(pairs):
                s_feat = student[component.signal, s]
                t_feat = teacher[component.signal, t].to(s_feat.device)
                if component.signal == "hidden_states":
                    projector = self.projectors[component.name][index]
                    weight = next(projector.parameters(), None)
                    s_feat = projector(s_feat.to(weight.dtype) if weight is not None else s_feat)
                    s_feat, t_feat = norm(s_feat.float()), norm(t_feat.float())
                per_token = loss_fn(s_feat.float(), t_feat.float())
                if per_token.shape != s_feat.shape[:1]:
                    raise ValueError(
                        f"Feature loss {component.loss!r} must return one value per token ({s_feat.shape[0]},), got "
                        f"{tuple(per_token.shape)}."
                    )
                total = per_token.sum() if total is None else total + per_token.sum()
            totals[component.name] = total / len(pairs)
        return totals
