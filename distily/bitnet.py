"""BitNet b1.58 students: ternary-weight ``BitLinear``, conversion, quantisation warm-up, packed export.

The recipe (Ma et al., "The Era of 1-bit LLMs", 2024, and the "BitNet b1.58 2B4T" technical report, 2025):

* **weights** -- absmean quantisation to {-1, 0, +1} with one scale per tensor:
  ``γ = mean|W|``, ``W_t = clamp(round(W / γ), -1, 1)``, ``W ≈ γ · W_t``;
* **activations** -- per-token absmax quantisation to 8 bits:
  ``s = 127 / max|x|`` over the features of each token, ``x_q = clamp(round(s · x), -128, 127)``, ``x ≈ x_q / s``;
* **straight-through estimator** (STE) -- ``round`` and ``clamp`` pass gradients through unchanged, so the
  latent full-precision weights keep training;
* **SubLN** -- an RMSNorm on the input of the two projections whose input is not already normalised: before
  ``o_proj`` (``attn_sub_norm``) and before ``down_proj`` (``ffn_sub_norm``). ``q/k/v`` and ``gate/up`` read the
  output of the block's own RMSNorm (``input_layernorm`` / ``post_attention_layernorm``).

That layout is exactly transformers' ``BitNetForCausalLM`` (the architecture of microsoft/bitnet-b1.58-2B-4T) and
llama.cpp's ``bitnet`` graph, so a Llama-layout student is converted *into* a ``BitNetForCausalLM`` whose
decoder projections are :class:`BitLinear` modules. Everything it saves then loads with plain transformers:

* the latent (training) weights, as a BitNet model with ``quantization_config`` ``{"quant_method": "bitnet",
  "linear_class": "autobitlinear", "quantization_mode": "online"}`` (run folders and checkpoints);
* the packed export (:func:`save_packed`): 2-bit codes, four weights per byte, plus one ``weight_scale`` per
  projection, with ``quantization_mode: "offline"``; its logits equal the training model's in eval mode.

Quantisation warm-up (Hugging Face, "Fine-tuning LLMs to 1.58bit", 2024): the forward pass blends
``x + λ·(Q(x) − x)`` and ``W + λ·(Q(W) − W)`` with ``λ`` rising linearly from 0 to 1 over
``warmup_steps`` optimizer steps (:class:`BitNetWarmup`, driven by ``state.global_step`` so it survives resume).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, TrainerCallback
from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

from .errors import ConfigError
from .modeling import decoder_layers

logger = logging.getLogger(__name__)

# Ternary codes are stored as value + 1 in {0, 1, 2}, 2 bits each, four per byte.
VALUES_PER_BYTE = 4
# Smallest scale denominator (mean|W| or max|x|), as in the BitNet reference code: keeps all-zero inputs finite.
SCALE_EPS = 1e-5
ACTIVATION_QMAX = 127  # symmetric int8: codes in [-128, 127], scale 127 / max|x|
# The projections that become BitLinear, by their name inside a decoder block (Llama / BitNet layout).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Teacher/student families whose blocks have exactly the BitNet layout minus the two sub-norms.
SUPPORTED_MODEL_TYPES = ("llama",)
# Random token sequences used to calibrate the SubLN gains when no data is given (see calibrate_sub_norms).
CALIBRATION_SEQUENCES, CALIBRATION_LENGTH, CALIBRATION_SEED = 8, 64, 0
CONFIG_KEY = "distily_bitnet"  # where a BitNet student's config records its options and format

# ----------------------------------------------------------------------------------------------------------------
# Options


@dataclass
class BitNetOptions:
    """How a student becomes a BitNet b1.58 student (``--student_config '{"bitnet": {...}}'``).

    ``warmup_steps``: optimizer steps over which quantisation is blended in, ``λ = min(1, step / warmup_steps)``;
    0 quantises fully from the first step. ``learning_rate``: peak learning rate of the ternary projections'
    latent weights (their own optimizer group, same schedule); None uses ``--learning_rate``. A ternary code
    flips only when its latent weight moves by a fraction of ``γ = mean|W|``, so these weights want larger steps
    than the embeddings and norms (notes.md, benchmarks/RESULTS.md). ``true`` instead of an object takes the
    defaults.
    """

    warmup_steps: int = 0
    learning_rate: float | None = None

    def __post_init__(self):
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(
                f"bitnet warmup_steps must be a whole number >= 0, got {self.warmup_steps!r}. "
                'Example: --student_config \'{"bitnet": {"warmup_steps": 100}}\' (0 = quantise from step 0).'
            )
        rate = self.learning_rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            raise ConfigError(
                f"bitnet learning_rate must be a number > 0 (or null for --learning_rate), got {rate!r}. "
                'Example: --student_config \'{"bitnet": {"learning_rate": 0.002}}\'.'
            )


def parse_bitnet_option(value: Any) -> BitNetOptions | None:
    """``true`` / ``false`` / ``null`` / an object of :class:`BitNetOptions` fields -> options or None."""
    if value is None or value is False:
        return None
    if value is True:
        return BitNetOptions()
    if isinstance(value, BitNetOptions):
        return value
    if isinstance(value, dict):
        known = set(BitNetOptions.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(
                f"--student_config bitnet has unknown options {unknown}. Known: {sorted(known)}, e.g. "
                '\'{"bitnet": {"warmup_steps": 100}}\'.'
            )
        return BitNetOptions(**value)
    raise ConfigError(
        f'--student_config "bitnet" must be true, false or an object like {{"warmup_steps": 100}}, got {value!r}.'
    )


def split_bitnet_overrides(overrides: dict | None) -> tuple[dict, BitNetOptions | None]:
    """Separate distily's ``bitnet`` key from the model-config overrides of ``--student_config``."""
    overrides = dict(overrides or {})
    return overrides, parse_bitnet_option(overrides.pop("bitnet", None))


# ----------------------------------------------------------------------------------------------------------------
# Quantisers (the exact arithmetic of the forward pass; golden-tested)


def absmean_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weights and their per-tensor scale: ``γ = max(mean|W|, eps)``, ``W_t = clamp(round(W / γ), -1, 1)``.

    Computed in float32 whatever the weight's dtype. Returns ``(W_t, γ)``: ``W_t`` float32 with values in
    {-1, 0, 1}, ``γ`` a float32 scalar tensor; ``γ · W_t`` is the dequantised weight.
    """
    w = weight.detach().float()
    gamma = w.abs().mean().clamp(min=SCALE_EPS)
    return (w * (1.0 / gamma)).round().clamp(-1, 1), gamma


def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 8-bit activations: ``s = 127 / max(max|x|, eps)`` over the last dimension,
    ``x_q = clamp(round(s · x), -128, 127)``. Returns ``(x_q, s)`` in float32; ``x_q / s`` dequantises."""
    xf = x.detach().float()
    scale = ACTIVATION_QMAX / xf.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS)
    return (xf * scale).round().clamp(-ACTIVATION_QMAX - 1, ACTIVATION_QMAX), scale


def straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass (bit for bit: ``source − source`` is exactly 0), the gradient of ``source``
    in the backward pass: the straight-through estimator."""
    return value + (source - source.detach())


def fake_quantize_activations(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``x + λ·(x_q/s − x)`` with the straight-through (identity) gradient; exactly ``x_q / s`` when λ = 1."""
    q, scale = absmax_quantize(x)
    dequantised = (q / scale).to(x.dtype)
    return straight_through(dequantised, x) if strength == 1.0 else x + strength * (dequantised - x).detach()


# ----------------------------------------------------------------------------------------------------------------
# BitLinear


class BitLinear(nn.Module):
    """A bias-free linear layer with ternary weights and 8-bit activations, trained through an STE.

    Holds the latent full-precision ``weight`` (a parameter, trained); the ternary weight and its scale are
    recomputed from it in every forward pass (:func:`absmean_quantize`), the activations are quantised per token
    (:func:`absmax_quantize`). With ``quant_lambda`` = 1 (the default, set by :class:`BitNetWarmup` during
    warm-up) the output is ``linear(x_q / s, W_t) · γ`` -- the same arithmetic as transformers'
    ``AutoBitLinear`` on the packed export, so the exported model reproduces these logits exactly. With
    ``quant_lambda`` = λ < 1 it is ``linear(x + λ(x̂ − x), W + λ(γW_t − W))``; λ = 0 is the plain linear layer.
    The gradient reaching ``weight`` and the input is the straight-through one in both cases.
    """

    def __init__(
        self, in_features: int, out_features: int, device=None, dtype=None, weight: nn.Parameter | None = None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(weight, a=5**0.5)  # nn.Linear's default
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {(out_features, in_features)}")
        self.weight = weight
        # Not a buffer: the warm-up callback recomputes it from global_step, so it is never saved or resumed.
        self.quant_lambda = 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitLinear:
        """A BitLinear that takes over ``linear``'s weight parameter (the same tensor, not a copy)."""
        if linear.bias is not None:
            raise ConfigError("BitLinear has no bias; this projection has one (attention_bias / mlp_bias).")
        return cls(linear.in_features, linear.out_features, weight=linear.weight)

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_t as int8, γ as a float32 scalar)``: what the packed export stores."""
        values, gamma = absmean_quantize(self.weight)
        return values.to(torch.int8), gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        strength = float(self.quant_lambda)
        weight = self.weight
        values, gamma = absmean_quantize(weight)
        if strength == 1.0:
            # W_t itself (integer-valued) in the product, γ applied to the output; the gradient reaching the latent
            # weight is d/dW of W/γ, so that d(out)/dW is the dequantised-activation one of the plain STE.
            ternary = straight_through(values.to(weight.dtype), weight * (1.0 / gamma).to(weight.dtype))
            out = F.linear(fake_quantize_activations(x), ternary)
            return out * gamma.to(out.dtype)
        dequantised = (values * gamma).to(weight.dtype)
        blended = weight + strength * (dequantised - weight).detach()
        return F.linear(fake_quantize_activations(x, strength), blended)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant_lambda={self.quant_lambda}"


class SubLNorm(BitNetRMSNorm):
    """BitNet's SubLN RMSNorm (``attn_sub_norm``, ``ffn_sub_norm``), blended in during the warm-up.

    ``x + λ·(RMSNorm(x) − x)``: with ``quant_lambda`` = 1 (the default) exactly transformers' ``BitNetRMSNorm``
    (same parameter name, same arithmetic), with λ = 0 the identity -- so a converted student at λ = 0 computes
    exactly what the full-precision student did. Unlike the quantisers, the blend is not detached: the gain trains.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight: nn.Parameter | None = None):
        super().__init__(hidden_size, eps=eps)
        if weight is not None:
            self.weight = weight
        self.quant_lambda = 1.0

    @classmethod
    def from_norm(cls, norm: nn.Module) -> SubLNorm:
        """A SubLNorm that takes over ``norm``'s gain parameter (the same tensor)."""
        return cls(norm.weight.shape[0], eps=norm.variance_epsilon, weight=norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        strength = float(self.quant_lambda)
        if strength == 1.0:
            return super().forward(x)
        return x if strength == 0.0 else x + strength * (super().forward(x) - x)


def bitlinear_modules(model: nn.Module) -> dict[str, BitLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, BitLinear)}


def is_bitnet_student(model: nn.Module) -> bool:
    return any(isinstance(module, BitLinear) for module in model.modules())


def set_quant_lambda(model: nn.Module, value: float) -> None:
    """Set the warm-up blend λ of every BitLinear and SubLN norm in ``model`` (1 = the BitNet model)."""
    for module in model.modules():
        if isinstance(module, (BitLinear, SubLNorm)):
            module.quant_lambda = float(value)


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


# ----------------------------------------------------------------------------------------------------------------
# Warm-up


def warmup_lambda(step: int, warmup_steps: int) -> float:
    """``min(1, step / warmup_steps)``; 1 from the start when ``warmup_steps`` is 0."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


class BitNetWarmup(TrainerCallback):
    """Sets every BitLinear's ``quant_lambda`` from ``state.global_step`` before each optimizer step.

    The schedule is a function of the step count alone, so a resumed run continues it exactly. When training
    ends λ is set back to 1, so the evaluation after training and the saved model are the fully ternary student.
    """

    def __init__(self, model: nn.Module, warmup_steps: int):
        self.model = model
        self.warmup_steps = warmup_steps

    def on_step_begin(self, args, state, control, **kwargs):
        set_quant_lambda(self.model, warmup_lambda(state.global_step, self.warmup_steps))

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step < self.warmup_steps:
            logger.warning(
                "Training stopped at step %d, before the BitNet warm-up (%d steps) reached full quantisation; "
                "the saved model is the fully ternary one.",
                state.global_step,
                self.warmup_steps,
            )
        set_quant_lambda(self.model, 1.0)


def bitnet_options_of(model: nn.Module) -> BitNetOptions | None:
    """The options a BitNet student was converted with (from its config), or None for other models."""
    recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not recorded or not is_bitnet_student(model):
        return None
    return BitNetOptions(**{k: v for k, v in recorded.items() if k in BitNetOptions.__dataclass_fields__})


def separate_latent_weights(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Move the ternary projections' latent weights into their own parameter groups at ``learning_rate`` (one
    per existing group they were in, so weight decay and other settings carry over). Call before the learning-rate
    scheduler is built, so it scales the new groups too. Returns how many weights moved (0: nothing to do)."""
    options = bitnet_options_of(model)
    if options is None or options.learning_rate is None:
        return 0
    latent = {id(module.weight) for module in bitlinear_modules(model).values()}
    rate = float(options.learning_rate)
    moved_groups = []
    for group in optimizer.param_groups:
        moved = [p for p in group["params"] if id(p) in latent]
        if moved and not group.get("bitnet_latent"):  # (Trainer hands back its optimizer on a second call)
            group["params"] = [p for p in group["params"] if id(p) not in latent]
            settings = {key: value for key, value in group.items() if key not in ("params", "initial_lr")}
            moved_groups.append({**settings, "params": moved, "lr": rate, "bitnet_latent": True})
    for group in moved_groups:
        optimizer.add_param_group(group)
    return sum(len(group["params"]) for group in moved_groups)


def warmup_callback(model: nn.Module) -> BitNetWarmup | None:
    """The warm-up callback a trainer needs for ``model``, or None (not a BitNet student, or no warm-up)."""
    options = bitnet_options_of(model)
    if options is None or options.warmup_steps == 0:
        return None
    return BitNetWarmup(model, options.warmup_steps)


# ----------------------------------------------------------------------------------------------------------------
# Packing


def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """Pack ternary values (rows × ...) into uint8, four per byte, in transformers' BitNet layout.

    With ``R = rows / 4``, byte ``[r, ...]`` holds rows ``r, R + r, 2R + r, 3R + r`` in bits 0-1, 2-3, 4-5, 6-7,
    each stored as value + 1 (0, 1 or 2). ``rows`` must be a multiple of 4.
    """
    rows = values.shape[0]
    if rows % VALUES_PER_BYTE:
        raise ValueError(f"Cannot pack {rows} rows: the first dimension must be a multiple of {VALUES_PER_BYTE}.")
    ints = values.to(torch.int16)
    if ints.numel() and (ints.min() < -1 or ints.max() > 1 or not torch.equal(ints.to(values.dtype), values)):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}.")
    codes = (ints + 1).to(torch.uint8).reshape(VALUES_PER_BYTE, rows // VALUES_PER_BYTE, *values.shape[1:])
    packed = torch.zeros_like(codes[0])
    for index in range(VALUES_PER_BYTE):
        packed |= codes[index] << (2 * index)
    return packed


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``(rows / 4, ...)`` uint8 -> ``(rows, ...)`` values in {-1, 0, 1}."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"Packed ternary weights are uint8, got {packed.dtype}.")
    shifts = torch.arange(0, 2 * VALUES_PER_BYTE, 2, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(0) >> shifts.view(-1, *([1] * packed.dim()))) & 3
    if codes.numel() and int(codes.max()) == 3:
        raise ValueError("Packed ternary weights hold the unused code 3: this is not a BitNet-packed tensor.")
    return (codes.to(torch.int16) - 1).reshape(-1, *packed.shape[1:]).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def packed_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The export tensors: each BitLinear as ``weight`` (packed uint8) and ``weight_scale`` (shape ``(1,)``,
    γ), every other tensor cast to ``dtype`` (default: the model's). A tied LM head is stored once."""
    dtype = dtype or next(model.parameters()).dtype
    linears = bitlinear_modules(model)
    state = {}
    for name, module in linears.items():
        values, gamma = module.ternary()
        state[f"{name}.weight"] = pack_ternary(values).cpu().contiguous()
        state[f"{name}.weight_scale"] = gamma.reshape(1).to(dtype).cpu()
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in linears or (tied and name == "lm_head.weight"):
            continue
        state[name] = tensor.detach().to(dtype).cpu().contiguous()
    return state


def directory_bytes(path: str | Path) -> int:
    """Bytes on disk of the model files in a folder (weights and config, not tokenizer or logs)."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) + (path / "config.json").stat().st_size


def fp16_bytes(model: nn.Module) -> int:
    """Bytes of the same student stored in float16 (every unique parameter and buffer saved, 2 bytes each)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen and tensor.is_floating_point():
            seen.add(id(tensor))
            total += tensor.numel() * 2
    return total


def save_packed(
    model: nn.Module, path: str | Path, dtype: torch.dtype | None = None, tokenizer=None, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``model`` (a BitNet student) as a ternary-packed Hugging Face folder and return a size report.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(path)`` through transformers' BitNet integration
    (``quantization_config``: ``bitnet``, ``autobitlinear``, ``offline``); in eval mode its logits equal
    ``model``'s (exactly in float32). ``dtype`` is the precision of the non-ternary tensors (embeddings, norms,
    scales). The folder is written atomically; an existing folder is replaced only with ``overwrite``.
    """
    from safetensors.torch import save_file

    from .io import atomic_path, provenance, write_json_atomic

    if not is_bitnet_student(model):
        raise ConfigError("save_packed needs a BitNet student (built with --student_config '{\"bitnet\": true}').")
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{str(path)!r} already exists and is not empty; pass overwrite=True to replace it.")
    dtype = dtype or next(model.parameters()).dtype
    config = copy.deepcopy(model.config)
    options = bitnet_options_of(model) or BitNetOptions()
    set_bitnet_metadata(config, options, packed=True)
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    state = packed_state_dict(model, dtype)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    linears = bitlinear_modules(model)
    report = {
        "format": "bitnet-packed",
        "dtype": str(dtype).removeprefix("torch."),
        "ternary_tensors": len(linears),
        "ternary_parameters": sum(m.weight.numel() for m in linears.values()),
        "bytes_on_disk": directory_bytes(path),
        "fp16_student_bytes": fp16_bytes(model),
    }
    report["size_ratio_vs_fp16"] = round(report["bytes_on_disk"] / report["fp16_student_bytes"], 4)
    write_json_atomic(path / "distily_export.json", {**provenance(), **report})
    logger.info(
        "Packed BitNet student written to %s: %s bytes on disk vs %s for the fp16 student (%.1f%%).",
        path, f"{report['bytes_on_disk']:,}", f"{report['fp16_student_bytes']:,}", 100 * report["size_ratio_vs_fp16"],
    )  # fmt: skip
    return report


def load_bitnet_student(path: str | Path, device: torch.device | str | None = None) -> PreTrainedModel:
    """Load a BitNet student saved by distily in its latent (training) format -- a run folder or a checkpoint --
    as the training-time model (:class:`BitLinear` projections, in eval mode).

    ``AutoModelForCausalLM.from_pretrained(path)`` loads the same folder through transformers' own BitNet
    integration (``AutoBitLinear``, online quantisation); this loader gives back distily's modules, whose logits
    are bitwise those of the model that was saved. Packed exports load with ``AutoModelForCausalLM``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a saved model folder.")
    config = AutoConfig.from_pretrained(path)
    recorded = getattr(config, CONFIG_KEY, None)
    if config.model_type != "bitnet" or not recorded:
        raise ConfigError(f"{str(path)!r} is not a distily BitNet student (no {CONFIG_KEY!r} in its config).")
    if recorded.get("format") == "packed":
        raise ConfigError(
            f"{str(path)!r} is a packed export; load it with transformers.AutoModelForCausalLM.from_pretrained."
        )
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    dtype = next(iter(state.values())).dtype if state else torch.float32
    # A plain BitNetForCausalLM (no quantizer: distily's BitLinear does the quantising), built in the saved dtype.
    model = swap_in_bitlinear(AutoModelForCausalLM.from_config(config, dtype=dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise ConfigError(f"{str(path)!r} does not match a BitNet student: missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    if device is not None:
        model.to(device)
    return model.eval()
