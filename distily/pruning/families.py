"""The architectures structured pruning knows: where their heads, neurons and channels live, and how to cut them.

A :class:`Family` answers three questions for one layout of weights:

* **shape**: the five prunable sizes of a config (:class:`Shape`), and the config of a pruned model;
* **where**: the modules whose inputs the importance hooks read (the attention output projection, whose input is
  the concatenated head outputs; the MLP output projection, whose input is the neurons' activations; the norms,
  whose inputs are the residual stream's channels) and the final norm;
* **how to cut**: one :class:`Rule` per tensor name, naming the index set each dimension is sliced by
  (``C`` hidden channels, ``Q`` query-head rows, ``KV`` key/value-head rows, ``N`` MLP neurons, ``QKV`` GPT-2's
  fused query/key/value columns) and whether the tensor is a norm gain that the hidden-size change rescales.

Two families: Llama (SmolLM2, Llama, Mistral, Qwen2, Qwen3: ``nn.Linear`` weights stored ``(out, in)``) and
GPT-2 (``Conv1D`` weights stored ``(in, out)``, fused ``c_attn``, LayerNorm with a bias, learned positions).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config.prune import PRUNE_TARGET_KEYS
from ..errors import PruneError
from ..modeling import decoder_layers


@dataclass(frozen=True)
class Shape:
    """The prunable sizes of a decoder-only LM; ``head_dim`` never changes (RoPE and the attention scale keep it)."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int

    def as_dict(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in (*PRUNE_TARGET_KEYS, "head_dim")}


@dataclass(frozen=True)
class Rule:
    """How one tensor is cut: ``dims[i]`` names the index set dimension ``i`` keeps (None: all of it)."""

    pattern: str
    dims: tuple[str | None, ...]
    norm_gain: bool = False

    def matches(self, name: str) -> bool:
        return re.search(rf"(^|\.){self.pattern}$", name) is not None


class Family:
    """One architecture family; subclasses fill in the names."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()

    def shape(self, config) -> Shape:
        raise NotImplementedError

    def check_shape(self, teacher: Shape, target: Shape, flag: str) -> None:
        """Family-specific limits on a target shape (beyond "no wider, no deeper than the teacher")."""

    def pruned_config_overrides(self, config, teacher: Shape, target: Shape, layers: list[int]) -> dict:
        raise NotImplementedError

    # Where the importance hooks read.
    def attention_output(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def head_output_weight(self, layer: nn.Module, shape: Shape) -> torch.Tensor:
        """The attention output projection as ``(hidden, heads, head_dim)``: head h writes ``W[:, h] @ x_h``."""
        raise NotImplementedError

    def mlp_output(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return decoder_layers(model)

    def rule(self, name: str) -> Rule | None:
        """The first rule matching a tensor name (None: the tensor keeps its shape)."""
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def norm_scale(self, teacher: Shape, target: Shape) -> float:
        """Factor on the kept norm gains (1: the norm needs none)."""
        return 1.0


class LlamaFamily(Family):
    """Llama-style decoders: RMSNorm, q/k/v/o projections with grouped-query attention, a gated MLP.

    Cutting hidden channels changes RMSNorm's denominator from ``Σx²/H`` to ``Σx²/H'``. The kept gains are scaled
    by ``√(H/H')`` and ``rms_norm_eps`` by ``H/H'``, so each norm divides by ``√(Σ_kept x²/H + ε)`` as the teacher
    would if the cut channels were zero: pruning then equals zeroing exactly (Qwen3's per-head q/k norms share
    ``rms_norm_eps``, so there ε stays and the match holds up to ε).
    """

    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    rules = (
        Rule(r"(q_norm|k_norm)\.weight", (None,)),
        Rule(r"embed_tokens\.weight", (None, "C")),
        Rule(r"lm_head\.weight", (None, "C")),
        Rule(r"(input_layernorm|post_attention_layernorm|norm)\.weight", ("C",), norm_gain=True),
        Rule(r"q_proj\.weight", ("Q", "C")),
        Rule(r"q_proj\.bias", ("Q",)),
        Rule(r"(k_proj|v_proj)\.weight", ("KV", "C")),
        Rule(r"(k_proj|v_proj)\.bias", ("KV",)),
        Rule(r"o_proj\.weight", ("C", "Q")),
        Rule(r"(o_proj|down_proj)\.bias", ("C",)),
        Rule(r"(gate_proj|up_proj)\.weight", ("N", "C")),
        Rule(r"(gate_proj|up_proj)\.bias", ("N",)),
        Rule(r"down_proj\.weight", ("C", "N")),
    )

    def shape(self, config) -> Shape:
        heads = config.num_attention_heads
        return Shape(
            num_hidden_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            intermediate_size=config.intermediate_size,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    def check_shape(self, teacher: Shape, target: Shape, flag: str) -> None:
        if target.hidden_size % target.num_attention_heads:
            # transformers' LlamaConfig refuses to save such a config, although head_dim is explicit
            lower = target.hidden_size - target.hidden_size % target.num_attention_heads
            raise PruneError(
                f"{flag}: transformers' Llama config needs hidden_size to be a multiple of num_attention_heads "
                f"({target.num_attention_heads}); {target.hidden_size} is not. Use {lower} or "
                f"{lower + target.num_attention_heads}."
            )

    def pruned_config_overrides(self, config, teacher: Shape, target: Shape, layers: list[int]) -> dict:
        overrides = {key: getattr(target, key) for key in PRUNE_TARGET_KEYS}
        overrides["head_dim"] = teacher.head_dim  # explicit: hidden_size need not be heads × head_dim any more
        if target.hidden_size != teacher.hidden_size and config.model_type != "qwen3":
            overrides["rms_norm_eps"] = config.rms_norm_eps * teacher.hidden_size / target.hidden_size
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == teacher.num_hidden_layers:
            overrides["layer_types"] = [layer_types[index] for index in layers]
        return overrides

    def norm_scale(self, teacher: Shape, target: Shape) -> float:
        return (teacher.hidden_size / target.hidden_size) ** 0.5

    def attention_output(self, layer):
        return layer.self_attn.o_proj

    def head_output_weight(self, layer, shape):
        weight = layer.self_attn.o_proj.weight  # (hidden, heads · head_dim)
        return weight.view(weight.shape[0], shape.num_attention_heads, shape.head_dim)

    def mlp_output(self, layer):
        return layer.mlp.down_proj

    def layer_norms(self, layer):
        return [layer.input_layernorm, layer.post_attention_layernorm]

    def final_norm(self, model):
        return model.get_decoder().norm


class GPT2Family(Family):
    """GPT-2: ``Conv1D`` weights stored ``(in, out)``, fused ``c_attn`` (q, k and v blocks of ``n_embd`` columns),
    LayerNorm with a bias, learned position embeddings, no grouped-query attention.

    GPT-2 derives ``head_dim`` from ``n_embd / n_head``, so heads and hidden size are cut together
    (``n_embd' = n_head' · head_dim``). LayerNorm subtracts the mean over the channels it sees, which no gain can
    undo, so a channel cut is an approximation here (heads, neurons and layers are exact).
    """

    name = "gpt2"
    model_types = ("gpt2",)
    rules = (
        Rule(r"(wte|wpe)\.weight", (None, "C")),
        Rule(r"lm_head\.weight", (None, "C")),
        Rule(r"(ln_1|ln_2|ln_f)\.(weight|bias)", ("C",)),
        Rule(r"attn\.c_attn\.weight", ("C", "QKV")),
        Rule(r"attn\.c_attn\.bias", ("QKV",)),
        Rule(r"attn\.c_proj\.weight", ("Q", "C")),
        Rule(r"(attn|mlp)\.c_proj\.bias", ("C",)),
        Rule(r"mlp\.c_fc\.weight", ("C", "N")),
        Rule(r"mlp\.c_fc\.bias", ("N",)),
        Rule(r"mlp\.c_proj\.weight", ("N", "C")),
    )

    def shape(self, config) -> Shape:
        return Shape(
            num_hidden_layers=config.n_layer,
            hidden_size=config.n_embd,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_head,
            intermediate_size=config.n_inner or 4 * config.n_embd,
            head_dim=config.n_embd // config.n_head,
        )

    def check_shape(self, teacher: Shape, target: Shape, flag: str) -> None:
        if target.num_key_value_heads != target.num_attention_heads:
            raise PruneError(
                f"{flag}: GPT-2 has no grouped-query attention, so num_key_value_heads must equal num_attention_heads "
                f"({target.num_attention_heads}), got {target.num_key_value_heads}. Drop num_key_value_heads."
            )
        if target.hidden_size != target.num_attention_heads * teacher.head_dim:
            raise PruneError(
                f"{flag}: GPT-2's LayerNorms and attention take hidden_size = num_attention_heads × head_dim "
                f"({teacher.head_dim}); hidden_size {target.hidden_size} with {target.num_attention_heads} heads "
                f"does not fit. Set both, e.g. hidden_size {target.num_attention_heads * teacher.head_dim} with "
                f"{target.num_attention_heads} heads."
            )

    def pruned_config_overrides(self, config, teacher: Shape, target: Shape, layers: list[int]) -> dict:
        return {
            "n_layer": target.num_hidden_layers,
            "n_embd": target.hidden_size,
            "n_head": target.num_attention_heads,
            "n_inner": target.intermediate_size,
        }

    def attention_output(self, layer):
        return layer.attn.c_proj

    def head_output_weight(self, layer, shape):
        weight = layer.attn.c_proj.weight  # Conv1D: (heads · head_dim, hidden)
        return weight.t().reshape(weight.shape[1], shape.num_attention_heads, shape.head_dim)

    def mlp_output(self, layer):
        return layer.mlp.c_proj

    def layer_norms(self, layer):
        return [layer.ln_1, layer.ln_2]

    def final_norm(self, model):
        return model.get_decoder().ln_f


FAMILIES: tuple[Family, ...] = (LlamaFamily(), GPT2Family())


def family_of(config) -> Family:
    """The family of a model's config; an error naming the supported architectures for any other."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for family in FAMILIES for t in family.model_types)
    raise PruneError(
        f"Structured pruning supports the model types {supported}; this model is {model_type!r}. Use "
        "--student_init auto (a layer subset) for it, or prune a supported architecture."
    )


def pruned_config(config, family: Family, teacher: Shape, target: Shape, layers: list[int]):
    """The teacher's config at the target shape (loading-only fields dropped)."""
    from ..students import student_config_from_teacher

    overrides = family.pruned_config_overrides(config, teacher, target, layers)
    return student_config_from_teacher(copy.deepcopy(config), overrides)
