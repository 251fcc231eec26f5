"""Converting a Llama-layout student into a BitNet b1.58 ``BitNetForCausalLM``, and calibrating its SubLN gains.

BitNet's blocks are Llama's plus **SubLN**: an RMSNorm on the input of the two projections whose input is not
already normalised, before ``o_proj`` (``attn_sub_norm``) and before ``down_proj`` (``ffn_sub_norm``); ``q/k/v``
and ``gate/up`` read the output of the block's own RMSNorm (``input_layernorm`` / ``post_attention_layernorm``).
That layout is exactly transformers' ``BitNetForCausalLM`` (the architecture of microsoft/bitnet-b1.58-2B-4T) and
llama.cpp's ``bitnet`` graph, so the student is converted *into* a ``BitNetForCausalLM`` whose decoder projections
are :class:`~distily.bitnet.layers.BitLinear` modules. Its config records the options and the storage format
(:data:`CONFIG_KEY`) and the ``quantization_config`` transformers loads it with.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..errors import ConfigError
from ..modeling import decoder_layers
from .layers import VALUES_PER_BYTE, BitLinear, SubLNorm, is_bitnet_student
from .options import BitNetOptions

logger = logging.getLogger(__name__)

# The projections that become BitLinear, by their name inside a decoder block (Llama / BitNet layout).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Teacher/student families whose blocks have exactly the BitNet layout minus the two sub-norms.
SUPPORTED_MODEL_TYPES = ("llama",)
# Random token sequences used to calibrate the SubLN gains when no data is given (see calibrate_sub_norms).
CALIBRATION_SEQUENCES, CALIBRATION_LENGTH, CALIBRATION_SEED = 8, 64, 0
CONFIG_KEY = "distily_bitnet"  # where a BitNet student's config records its options and format


# ----------------------------------------------------------------------------------------------------------------
# Conversion of a Llama-layout student


def check_convertible(config) -> None:
    """A student converts to ``BitNetForCausalLM`` only if its blocks have that layout; errors say what differs."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"BitNet students are built as transformers' BitNetForCausalLM (the Llama block layout plus SubLN), "
            f"but this student is a {model_type!r} model ({type(config).__name__}). Use a Llama-family teacher "
            f'(SmolLM, Llama, ...; supported model types: {", ".join(SUPPORTED_MODEL_TYPES)}) or drop "bitnet".'
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ConfigError(f"BitNet projections have no bias, but the student's config sets {flag}=true.")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ConfigError(
            f"BitNet's attention sub-norm has hidden_size={config.hidden_size} features, but the attention output "
            f"has num_attention_heads·head_dim = {config.num_attention_heads}·{head_dim}. Use a student whose "
            "heads exactly tile hidden_size."
        )
    for name in ("hidden_size", "intermediate_size"):
        if getattr(config, name) % VALUES_PER_BYTE:
            raise ConfigError(
                f"Packed ternary weights hold {VALUES_PER_BYTE} output rows per byte, so {name} must be a multiple "
                f"of {VALUES_PER_BYTE}; got {getattr(config, name)}."
            )


def bitnet_config_from(config, options: BitNetOptions):
    """The ``BitNetConfig`` with the same shapes, activation, RoPE and tokens as a Llama-layout ``config``."""
    from transformers import BitNetConfig

    keep = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
        "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout",
        "rope_parameters", "head_dim",
    )  # fmt: skip
    values = {name: copy.deepcopy(getattr(config, name)) for name in keep if hasattr(config, name)}
    bitnet = BitNetConfig(**values, attention_bias=False)
    for name in ("distily_init", "dtype"):
        if getattr(config, name, None) is not None:
            setattr(bitnet, name, copy.deepcopy(getattr(config, name)))
    set_bitnet_metadata(bitnet, options, packed=False)
    return bitnet


def set_bitnet_metadata(config, options: BitNetOptions, packed: bool) -> None:
    """Record the options and the storage format, and the ``quantization_config`` transformers loads it with."""
    setattr(config, CONFIG_KEY, {**asdict(options), "format": "packed" if packed else "latent"})
    config.quantization_config = {
        "quant_method": "bitnet",
        "linear_class": "autobitlinear",
        "quantization_mode": "offline" if packed else "online",
        "modules_to_not_convert": ["lm_head"],
        "use_rms_norm": False,
        "rms_norm_eps": config.rms_norm_eps,
    }


def swap_in_bitlinear(model: nn.Module) -> nn.Module:
    """Replace every decoder projection (attention and MLP; not embeddings, not the LM head) by a BitLinear that
    takes over its weight parameter, and wrap the two SubLN norms of each block in :class:`SubLNorm`."""
    for layer in decoder_layers(model):
        for parent, names in ((layer.self_attn, ATTENTION_PROJECTIONS), (layer.mlp, MLP_PROJECTIONS)):
            for name in names:
                module = getattr(parent, name)
                if not isinstance(module, BitLinear):
                    setattr(parent, name, BitLinear.from_linear(module))
        for parent, name in ((layer.self_attn, "attn_sub_norm"), (layer.mlp, "ffn_sub_norm")):
            if not isinstance(getattr(parent, name), SubLNorm):
                setattr(parent, name, SubLNorm.from_norm(getattr(parent, name)))
    return model


def _sub_norms(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The (attention, MLP) SubLN RMSNorm modules of a BitNet block."""
    return layer.self_attn.attn_sub_norm, layer.mlp.ffn_sub_norm


@torch.no_grad()
def calibrate_sub_norms(fp_model: nn.Module, bitnet_model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Set each SubLN gain so that ``sub_norm(x) ≈ x`` on the inputs ``fp_model`` gives ``o_proj``/``down_proj``.

    An RMSNorm with unit weight is not the identity: it rescales every token to unit RMS. For channel ``c`` the
    gain minimising ``E[(w_c·x_c/r − x_c)²]`` (``r`` the token's RMS, with the norm's eps) is
    ``w_c = E[x_c²/r] / E[x_c²/r²]``, estimated on ``input_ids``. Returns the mean gain per sub-norm (for logs).
    """
    sums: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def record(key: str, eps: float):
        def hook(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            numerator, denominator = (x.pow(2) / rms).sum(0), (x.pow(2) / rms.pow(2)).sum(0)
            if key in sums:
                sums[key][0] += numerator
                sums[key][1] += denominator
            else:
                sums[key] = [numerator, denominator]

        return hook

    for index, (fp_layer, layer) in enumerate(zip(decoder_layers(fp_model), decoder_layers(bitnet_model), strict=True)):
        attn_norm, ffn_norm = _sub_norms(layer)
        for module, norm, key in (
            (fp_layer.self_attn.o_proj, attn_norm, f"{index}.attn"),
            (fp_layer.mlp.down_proj, ffn_norm, f"{index}.ffn"),
        ):
            hooks.append(module.register_forward_pre_hook(record(key, norm.variance_epsilon)))
    was_training = fp_model.training
    try:
        fp_model.eval()
        fp_model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        fp_model.train(was_training)
    gains = {}
    for index, layer in enumerate(decoder_layers(bitnet_model)):
        attn_norm, ffn_norm = _sub_norms(layer)
        for norm, key in ((attn_norm, f"{index}.attn"), (ffn_norm, f"{index}.ffn")):
            numerator, denominator = sums[key]
            gain = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-30), torch.ones_like(numerator))
            norm.weight.copy_(gain.to(norm.weight.dtype))
            gains[key] = float(gain.mean())
    return gains


def calibration_ids(config, device=None) -> torch.Tensor:
    """A fixed batch of random token ids (seeded): data-free input for :func:`calibrate_sub_norms`."""
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    length = min(CALIBRATION_LENGTH, config.max_position_embeddings)
    ids = torch.randint(0, config.vocab_size, (CALIBRATION_SEQUENCES, length), generator=generator)
    return ids.to(device) if device is not None else ids


def convert_to_bitnet(
    model: PreTrainedModel, options: BitNetOptions | None = None, calibration_input_ids: torch.Tensor | None = None
) -> PreTrainedModel:
    """A ``BitNetForCausalLM`` with ``model``'s weights, SubLN norms and :class:`BitLinear` decoder projections.

    ``model`` is a Llama-layout causal LM (the student :func:`distily.build_student` made). Every tensor is
    copied; the two new sub-norms per block start as the identity on ``model``'s own activations when the
    student was initialised from the teacher (:func:`calibrate_sub_norms` on ``calibration_input_ids``, default a
    fixed batch of random tokens), and at 1 (BitNet's own init) for a randomly initialised student. The result
    is in train mode, in ``model``'s dtype and on its device, with ``quant_lambda`` = 1.
    """
    options = options or BitNetOptions()
    check_convertible(model.config)
    config = bitnet_config_from(model.config, options)
    parameter = next(model.parameters())
    # Built in the target dtype (not cast afterwards), like from_pretrained: RoPE's inv_freq stays float32.
    bitnet = AutoModelForCausalLM.from_config(config, dtype=parameter.dtype).to(parameter.device)
    missing, unexpected = bitnet.load_state_dict(model.state_dict(), strict=False)
    expected_missing = {k for k in bitnet.state_dict() if k.endswith(("attn_sub_norm.weight", "ffn_sub_norm.weight"))}
    if config.tie_word_embeddings:
        expected_missing.add("lm_head.weight")
    if set(missing) - expected_missing or unexpected:
        raise ConfigError(f"Cannot map the student onto BitNetForCausalLM: missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        bitnet.tie_weights()
    if (getattr(model.config, "distily_init", None) or {}).get("from") == "teacher":
        ids = calibration_input_ids if calibration_input_ids is not None else calibration_ids(config, parameter.device)
        gains = calibrate_sub_norms(model, bitnet, ids.to(parameter.device))
        logger.info("SubLN gains calibrated to the teacher-initialised student: %s", _summary(gains))
    swap_in_bitlinear(bitnet)
    bitnet.train(model.training)
    return bitnet


def _summary(gains: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.3g}" for key, value in gains.items())


def bitnet_options_of(model: nn.Module) -> BitNetOptions | None:
    """The options a BitNet student was converted with (from its config), or None for other models."""
    recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not recorded or not is_bitnet_student(model):
        return None
    return BitNetOptions(**{k: v for k, v in recorded.items() if k in BitNetOptions.__dataclass_fields__})
