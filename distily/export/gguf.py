"""Write a student as a GGUF file that llama.cpp runs, with the ``gguf`` package (no llama.cpp scripts).

A GGUF file holds three things, each with its own seam here:

* **architecture metadata and tensors** -- one :class:`GGUFArchitecture` per transformers ``model_type`` in
  :data:`GGUF_ARCHITECTURES` (``llama``, ``gpt2``, ``bitnet``). It writes the hyper-parameters llama.cpp reads
  and yields every tensor under its GGUF name, in the layout llama.cpp expects (Q/K rows permuted for Llama's
  RoPE, GPT-2's ``Conv1D`` weights transposed, BitNet projections as ternary codes plus a per-tensor scale).
* **tensor types** -- one :class:`OutType` per ``--outtype`` in :data:`GGUF_OUTTYPES` (``f32``, ``f16``,
  ``bf16``, ``q8_0``, and ``tq2_0``/``tq1_0`` for BitNet students). It picks the storage type of each tensor
  (1-D tensors always stay f32, as in llama.cpp) and encodes it.
* **the tokenizer** -- :func:`add_tokenizer` writes ``tokenizer.ggml.*``: model, pre-tokenizer, tokens, token
  types, merges, special token ids, whether BOS/EOS are added, and the chat template.

A new architecture or quantisation registers an entry; nothing else changes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..registry import Registry
from .errors import ExportError

logger = logging.getLogger(__name__)

GGUF_ARCHITECTURES: Registry = Registry("GGUF architecture", "distily.export.gguf.register_gguf_architecture")
GGUF_OUTTYPES: Registry = Registry("GGUF outtype", "distily.export.gguf.register_gguf_outtype")


def register_gguf_architecture(model_type: str, *, override: bool = False):
    """Register a :class:`GGUFArchitecture` subclass for a transformers ``config.model_type``."""
    return GGUF_ARCHITECTURES.register(model_type, override=override)


def register_gguf_outtype(name: str, *, override: bool = False):
    """Register an :class:`OutType` instance under an ``--outtype`` name."""
    return GGUF_OUTTYPES.register(name, override=override)


# ----------------------------------------------------------------------------------------------------------------
# Tensor types


@dataclass(frozen=True)
class OutType:
    """How weights are stored for one ``--outtype``: the GGUF file type and the type of each tensor.

    ``matrix_type`` is used for 2-D weights; 1-D tensors (norms, biases, ternary scales) stay f32 like
    llama.cpp's own converter does. ``ternary_type`` (TQ1_0 / TQ2_0) is used for the ternary projections of a
    BitNet student, and only an architecture with ternary tensors accepts such an outtype. A matrix whose rows do
    not split into whole blocks of its type falls back to ``fallback_type``, and to f16 when those blocks do not
    fit either (llama.cpp does the same).
    """

    name: str
    file_type: int
    matrix_type: int
    fallback_type: int | None = None
    ternary_type: int | None = None

    @property
    def needs_ternary(self) -> bool:
        """True for outtypes that only store ternary weights (TQ1_0, TQ2_0)."""
        return self.ternary_type is not None

    def tensor_type(self, gguf_name: str, shape: tuple[int, ...], ternary: bool = False):
        """The ``GGMLQuantizationType`` for one tensor (``shape`` in PyTorch order: rows, columns).

        ``ternary``: the tensor holds only -1, 0 and 1 (a BitNet projection); it gets ``ternary_type`` if set.
        """
        import gguf

        if len(shape) < 2:
            return gguf.GGMLQuantizationType.F32
        preferred = self.ternary_type if ternary and self.ternary_type is not None else self.matrix_type
        candidates = [preferred, self.fallback_type, gguf.GGMLQuantizationType.F16]
        for candidate in (gguf.GGMLQuantizationType(c) for c in candidates if c is not None):
            block, _ = gguf.GGML_QUANT_SIZES[candidate]
            if shape[-1] % block == 0:
                if candidate != preferred:  # the export log lists these tensors together (write_gguf)
                    logger.debug(
                        "%s: %d columns are not a multiple of the %d-value blocks of %s; stored as %s.",
                        gguf_name, shape[-1], gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(preferred)][0],
                        gguf.GGMLQuantizationType(preferred).name, candidate.name,
                    )  # fmt: skip
                return candidate
        return gguf.GGMLQuantizationType.F32

    def encode(self, array: np.ndarray, qtype) -> np.ndarray:
        """``array`` (float32) stored as ``qtype``: a float array, or raw bytes for block-quantised types."""
        import gguf

        if qtype == gguf.GGMLQuantizationType.F32:
            return np.ascontiguousarray(array, dtype=np.float32)
        if qtype == gguf.GGMLQuantizationType.F16:
            return np.ascontiguousarray(array, dtype=np.float16)
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _builtin_outtypes() -> None:
    import gguf

    quant, file_type = gguf.GGMLQuantizationType, gguf.LlamaFileType
    for outtype in (
        OutType("f32", file_type.ALL_F32, quant.F32),
        OutType("f16", file_type.MOSTLY_F16, quant.F16),
        OutType("bf16", file_type.MOSTLY_BF16, quant.BF16),
        OutType("q8_0", file_type.MOSTLY_Q8_0, quant.Q8_0, fallback_type=quant.F16),
        # BitNet students: ternary projections in 256-value blocks (2.06 / 1.69 bits per weight); the embeddings
        # in f16 as llama.cpp's converter does; ternary rows that are not a multiple of 256 in Q8_0 (exact up to
        # 6e-5 relative: ±1 is stored as ±127 · fp16(1/127)), or f16 when not a multiple of 32 (exact).
        OutType("tq2_0", file_type.MOSTLY_TQ2_0, quant.F16, fallback_type=quant.Q8_0, ternary_type=quant.TQ2_0),
        OutType("tq1_0", file_type.MOSTLY_TQ1_0, quant.F16, fallback_type=quant.Q8_0, ternary_type=quant.TQ1_0),
    ):
        register_gguf_outtype(outtype.name)(outtype)


_builtin_outtypes()


# ----------------------------------------------------------------------------------------------------------------
# Architectures


class GGUFArchitecture:
    """Maps one transformers architecture onto a llama.cpp architecture.

    Subclasses set ``gguf_arch`` (a ``gguf.MODEL_ARCH``), check what llama.cpp cannot run in :meth:`check`,
    write hyper-parameters in :meth:`add_hparams` and may transform tensors in :meth:`transform`.
    """

    gguf_arch = None

    def __init__(self, config):
        self.config = config

    @property
    def arch_name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def block_count(self) -> int:
        from ..modeling import layer_count

        return layer_count(self.config)

    def check(self) -> None:
        """Raise :class:`ExportError` for a configuration llama.cpp would run differently."""

    def add_hparams(self, writer) -> None:
        raise NotImplementedError

    def transform(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor in the layout llama.cpp expects (identity by default)."""
        return tensor

    def is_ternary(self, gguf_name: str) -> bool:
        """Whether the tensor yielded under ``gguf_name`` holds only -1, 0 and 1 (a BitNet projection)."""
        return False

    @property
    def has_ternary(self) -> bool:
        """Whether this architecture writes ternary tensors (what the TQ1_0 / TQ2_0 outtypes need)."""
        return False

    def skip(self, hf_name: str) -> bool:
        """Tensors llama.cpp does not store (buffers, a tied output head)."""
        tied = getattr(self.config, "tie_word_embeddings", False)
        return hf_name == "lm_head.weight" and tied

    def tensors(self, state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(gguf_name, float32 tensor)`` for every tensor llama.cpp loads."""
        import gguf

        names = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)
        for hf_name, tensor in state_dict.items():
            if self.skip(hf_name):
                continue
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(
                    f"Tensor {hf_name!r} of this {type(self.config).__name__} has no GGUF name for llama.cpp's "
                    f"{self.arch_name!r} architecture; the student cannot be exported to GGUF as it is."
                )
            yield gguf_name, self.transform(hf_name, tensor.detach().to(torch.float32).cpu())


def _reject(config, field_name: str, allowed, why: str) -> None:
    value = getattr(config, field_name, None)
    if value not in allowed:
        raise ExportError(
            f"GGUF export: {field_name}={value!r} is not supported ({why}). Export to safetensors instead."
        )


@register_gguf_architecture("llama")
class LlamaArchitecture(GGUFArchitecture):
    """Llama-family students (also SmolLM2). llama.cpp applies RoPE to interleaved pairs of a head's values
    while transformers rotates its two halves, so the rows of ``q_proj`` and ``k_proj`` are permuted:
    within each head, row ``i`` of the first half and row ``i`` of the second half become rows ``2i`` and
    ``2i + 1``."""

    @property
    def gguf_arch(self):
        import gguf

        return gguf.MODEL_ARCH.LLAMA

    def head_dim(self) -> int:
        config = self.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def check(self) -> None:
        config = self.config
        _reject(config, "attention_bias", (False, None), "llama.cpp's llama graph is only verified without biases")
        _reject(config, "mlp_bias", (False, None), "llama.cpp's llama graph is only verified without biases")
        _reject(config, "hidden_act", ("silu",), "llama.cpp's llama architecture uses SiLU")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", "linear", None):
            raise ExportError(
                f"GGUF export: RoPE scaling {rope_type!r} is not supported yet (only default and linear). "
                "Export to safetensors instead."
            )
        if self.head_dim() % 2:
            raise ExportError(f"GGUF export: head_dim={self.head_dim()} must be even for RoPE.")

    def rope(self) -> dict:
        rope = getattr(self.config, "rope_parameters", None) or getattr(self.config, "rope_scaling", None) or {}
        return rope if isinstance(rope, dict) else {}

    def add_hparams(self, writer) -> None:
        config = self.config
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(self.block_count)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        head_dim = self.head_dim()
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        rope = self.rope()
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is not None:
            writer.add_rope_freq_base(float(theta))
        if rope.get("rope_type", rope.get("type")) == "linear":
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))

    @staticmethod
    def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
        """Rows of each head reordered from [first half | second half] to interleaved pairs."""
        rows = weight.shape[0]
        return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)

    def transform(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        config = self.config
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return self.permute(tensor, config.num_attention_heads)
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return self.permute(tensor, config.num_key_value_heads or config.num_attention_heads)
        return tensor

    def skip(self, hf_name: str) -> bool:
        return super().skip(hf_name) or hf_name.endswith("rotary_emb.inv_freq")


@register_gguf_architecture("gpt2")
class GPT2Architecture(GGUFArchitecture):
    """GPT-2 students. transformers stores GPT-2's projections as ``Conv1D`` (``in × out``), llama.cpp wants
    ``out × in`` like a ``Linear``, so those weights are transposed. The output head is the token embedding."""

    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @property
    def gguf_arch(self):
        import gguf

        return gguf.MODEL_ARCH.GPT2

    def check(self) -> None:
        config = self.config
        _reject(config, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "llama.cpp uses tanh-GELU")
        _reject(config, "scale_attn_weights", (True, None), "llama.cpp always scales attention")
        _reject(config, "scale_attn_by_inverse_layer_idx", (False, None), "not implemented in llama.cpp")
        _reject(config, "add_cross_attention", (False, None), "llama.cpp's gpt2 is decoder-only")

    def add_hparams(self, writer) -> None:
        config = self.config
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(self.block_count)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
        writer.add_vocab_size(config.vocab_size)

    def skip(self, hf_name: str) -> bool:
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            return True  # causal-mask buffers of older transformers
        tied = getattr(self.config, "tie_word_embeddings", True)
        return hf_name == "lm_head.weight" and tied

    def transform(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.T.contiguous() if hf_name.endswith(self.CONV1D) else tensor


@register_gguf_architecture("bitnet")
class BitNetArchitecture(LlamaArchitecture):
    """BitNet b1.58 students (``BitNetForCausalLM``, see :mod:`distily.bitnet`) as llama.cpp's ``bitnet`` graph.

    That graph is the Llama block plus the two SubLN norms (``attn_sub_norm`` before ``attn_output``,
    ``ffn_sub_norm`` before ``ffn_down``) and an optional per-tensor ``<name>.scale`` multiplied into each
    projection's output. Each projection is written as its ternary codes ``W_t`` (exactly -1, 0, 1) plus ``γ`` as
    an f32 ``.scale``: the product ``(x · W_t) · γ`` is what :class:`~distily.bitnet.BitLinear` computes, with γ
    kept in float32 (TQ blocks then get scale 1, so the codes are stored exactly). Codes and γ come from the
    latent weights by :func:`~distily.bitnet.absmean_quantize` (a run folder or checkpoint), or from the packed
    ``weight``/``weight_scale`` pair (a ``packed/`` folder loaded with transformers).

    llama.cpp's ``bitnet`` arch uses NEOX RoPE (rotate-half, as transformers), so q/k are *not* permuted; it
    hard-codes SiLU and takes logits from ``token_embd`` (the LM head must be tied).
    """

    PROJECTIONS = tuple(f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")) + tuple(
        f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
    )
    # HF BitNet names -> the names gguf-py's tensor map knows for the same tensors (1bitLLM's).
    SUB_NORM_ALIASES = (
        (".self_attn.attn_sub_norm.", ".self_attn.inner_attn_ln."),
        (".mlp.ffn_sub_norm.", ".mlp.ffn_layernorm."),
    )

    @property
    def gguf_arch(self):
        import gguf

        return gguf.MODEL_ARCH.BITNET

    @property
    def has_ternary(self) -> bool:
        return True

    def check(self) -> None:
        super().check()
        if not getattr(self.config, "tie_word_embeddings", False):
            raise ExportError(
                "GGUF export: llama.cpp's bitnet graph computes the logits with the token embedding (it loads no "
                "output matrix), but this BitNet student has an untied LM head (tie_word_embeddings=false). "
                "Distil from a teacher with tied embeddings (SmolLM2 has them), or export to safetensors."
            )
        head_dim = self.head_dim()
        if head_dim * self.config.num_attention_heads != self.config.hidden_size:
            raise ExportError(
                f"GGUF export: llama.cpp's bitnet graph needs num_attention_heads·head_dim = hidden_size, got "
                f"{self.config.num_attention_heads}·{head_dim} != {self.config.hidden_size}."
            )

    def transform(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # NEOX RoPE: the halves layout of transformers is what llama.cpp's bitnet graph rotates

    def is_ternary(self, gguf_name: str) -> bool:
        return gguf_name.endswith(".weight") and gguf_name.split(".")[-2] in (
            "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
        )  # fmt: skip

    def ternary_projections(self, state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (W_t float32, γ float32 scalar)}`` for every decoder projection in ``state_dict``."""
        from ..bitnet import absmean_quantize, unpack_ternary

        out = {}
        for name, tensor in state_dict.items():
            module = name.removesuffix(".weight")
            if not (name.endswith(".weight") and module.endswith(self.PROJECTIONS)):
                continue
            scale = state_dict.get(f"{module}.weight_scale")
            if scale is None:  # latent weights (a run folder or checkpoint): quantise as BitLinear does
                values, gamma = absmean_quantize(tensor)
            else:  # packed export: codes (unpacked by transformers, or still uint8) and γ
                values = unpack_ternary(tensor) if tensor.dtype == torch.uint8 else tensor
                values, gamma = values.detach().float().cpu(), scale.detach().float().reshape(())
                if values.numel() and not torch.equal(values, values.round().clamp(-1, 1)):
                    raise ExportError(f"{name!r} has a weight_scale but its weights are not ternary.")
            out[module] = (values.cpu(), gamma.cpu())
        return out

    def tensors(self, state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor as in the Llama layout (no permutation), each projection as ``W_t`` plus ``.scale`` [γ]."""
        import gguf

        names = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)
        ternary = self.ternary_projections(state_dict)
        for hf_name, tensor in state_dict.items():
            if self.skip(hf_name) or hf_name.endswith(".weight_scale"):
                continue
            lookup = hf_name
            for hf, alias in self.SUB_NORM_ALIASES:
                lookup = lookup.replace(hf, alias)
            gguf_name = names.get_name(lookup, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(
                    f"Tensor {hf_name!r} has no GGUF name in llama.cpp's bitnet architecture; this BitNet student "
                    "cannot be exported to GGUF as it is."
                )
            module = hf_name.removesuffix(".weight")
            if module in ternary:
                values, gamma = ternary[module]
                yield gguf_name, values
                yield gguf_name.removesuffix(".weight") + ".scale", gamma.reshape(1)
            else:
                yield gguf_name, tensor.detach().to(torch.float32).cpu()


def gguf_architecture(config) -> GGUFArchitecture:
    """The registered :class:`GGUFArchitecture` for ``config.model_type``; unknown types name the known ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"GGUF export does not support model_type {model_type!r} yet; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}. Export to safetensors instead, or register one with "
            "@distily.export.gguf.register_gguf_architecture."
        )
    return GGUF_ARCHITECTURES[model_type](config)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

# Split regexes of well-known byte-level BPE tokenizers (as written in their tokenizer.json) -> llama.cpp's name.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def _flatten_pre_tokenizers(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [item for child in spec.get("pretokenizers", []) for item in _flatten_pre_tokenizers(child)]
    return [spec]


def detect_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level BPE tokenizer, from its pre-tokenizer.

    llama.cpp does not run the tokenizer.json pipeline: it has a fixed list of pre-tokenizer regexes selected
    by name. The structure of the pipeline tells which one reproduces it:

    * ``ByteLevel`` with GPT-2's built-in regex -> ``gpt-2``;
    * ``Digits(individual_digits)`` then ``ByteLevel`` (StarCoder, SmolLM) -> ``smollm`` when the tokenizer
      does not clean up spaces when decoding, else ``starcoder`` (llama.cpp's two names differ only there);
    * a ``Split`` with Llama 3's or Qwen 2's regex then ``ByteLevel`` without regex -> ``llama-bpe`` / ``qwen2``.

    Anything else raises :class:`ExportError` asking for ``--gguf_tokenizer_pre``.
    """
    steps = _flatten_pre_tokenizers(json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer"))
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "starcoder" if getattr(tokenizer, "clean_up_tokenization_spaces", False) else "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {})
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex in SPLIT_PRE_TOKENIZERS:
            return SPLIT_PRE_TOKENIZERS[regex]
    raise ExportError(
        f"Cannot tell which llama.cpp pre-tokenizer matches this tokenizer (pre-tokenizer steps: {kinds}). "
        "Pass its llama.cpp name with --gguf_tokenizer_pre (e.g. gpt-2, llama-bpe, qwen2, smollm)."
    )


def gguf_tokenizer_fields(path: str | os.PathLike) -> dict:
    """``tokenizer.ggml.pre`` and ``tokenizer.ggml.model`` of a GGUF file, and its token count (``n_tokens``).

    A teacher shipped as GGUF (the embedded SmolLM2) already names its pre-tokenizer; the run records that name
    at training time (:func:`distily.run.teacher_gguf_tokenizer_pre`) and its export writes it.
    """
    import gguf

    reader = gguf.GGUFReader(Path(path))
    values = {}
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.model"):
        field = reader.fields.get(key)
        if field is not None:
            values[key] = field.contents()
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    values["n_tokens"] = len(tokens.data) if tokens is not None else None
    return values


def _token_strings(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS in front / EOS at the end (what llama.cpp should do too)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and len(ids) > len(plain) and ids[0] == bos
    adds_eos = eos is not None and len(ids) > len(plain) and ids[-1] == eos
    return adds_bos, adds_eos


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None = None) -> str:
    """Write ``tokenizer.ggml.*`` for a byte-level BPE tokenizer; returns the pre-tokenizer name used.

    ``pre`` (``--gguf_tokenizer_pre``, or the name the run recorded from its GGUF teacher) overrides the
    detection; otherwise :func:`detect_pre_tokenizer` decides.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast tokenizer (tokenizer.json); this one is a slow tokenizer.")
    definition = json.loads(backend.to_str())
    model = definition.get("model", {})
    steps = [step.get("type") for step in _flatten_pre_tokenizers(definition.get("pre_tokenizer"))]
    byte_level = "ByteLevel" in steps or (definition.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level:
        raise ExportError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen style); this one is "
            f"{model.get('type')} with pre-tokenizer {steps}. Export to safetensors instead."
        )
    if len(tokenizer) > vocab_size:
        raise ExportError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}.")
    if pre is None:
        pre = detect_pre_tokenizer(tokenizer)
    tokens, types = _token_strings(tokenizer, vocab_size)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, name, None)
        if value is not None:
            add(int(value))
    adds_bos, adds_eos = _adds_special(tokenizer)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return pre


# ----------------------------------------------------------------------------------------------------------------
# Writing


def check_outtype_fits(architecture: GGUFArchitecture, outtype: str) -> None:
    """TQ1_0 / TQ2_0 store ternary weights: refuse them for a student that has none."""
    entry: OutType = GGUF_OUTTYPES[outtype]
    if entry.needs_ternary and not architecture.has_ternary:
        raise ExportError(
            f"--outtype {outtype} stores ternary weights (-1, 0, 1), but this {type(architecture.config).__name__} "
            f"student has full-precision weights. Use f16, bf16 or q8_0, or distil a BitNet student "
            "(--student_config '{\"bitnet\": true}', docs/bitnet.md)."
        )


GGUF_ALIGNMENT = 32  # bytes; gguf-py's default, every tensor's data is padded to it


def _padded(size: int) -> int:
    return -(-size // GGUF_ALIGNMENT) * GGUF_ALIGNMENT


@dataclass
class GGUFReport:
    """What :func:`write_gguf` wrote: the file, its architecture, pre-tokenizer and the type of every tensor.

    ``f16_size_bytes`` is the exact size the same file would have with ``--outtype f16`` (same metadata, every
    matrix in f16), for the size comparison in the export log and manifest.
    """

    path: Path
    architecture: str
    outtype: str
    tokenizer_pre: str
    tensor_types: dict[str, str]
    f16_size_bytes: int | None = None

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def type_summary(self) -> dict[str, int]:
        """``{GGML type: number of tensors}``."""
        counts: dict[str, int] = {}
        for qtype in self.tensor_types.values():
            counts[qtype] = counts.get(qtype, 0) + 1
        return dict(sorted(counts.items()))


def write_gguf(
    model,
    tokenizer,
    path: str | os.PathLike,
    outtype: str = "f16",
    *,
    name: str | None = None,
    tokenizer_pre: str | None = None,
    metadata: dict[str, str] | None = None,
) -> GGUFReport:
    """Write ``model`` and ``tokenizer`` to the GGUF file ``path`` (the caller makes it atomic).

    ``tokenizer_pre`` names llama.cpp's pre-tokenizer (default: detected from the tokenizer, see
    :func:`add_tokenizer`).
    ``metadata`` adds ``general.*`` string keys (``license``, ``description``, ...). The log states the type of
    every tensor that is not f32 or the outtype's main type, and the file size against an f16 export.
    """
    import gguf

    outtype_entry: OutType = GGUF_OUTTYPES[outtype]
    architecture = gguf_architecture(model.config)
    architecture.check()
    check_outtype_fits(architecture, outtype)
    writer = gguf.GGUFWriter(path=None, arch=architecture.arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(name)
    for key, value in (metadata or {}).items():
        if value:
            writer.add_string(f"general.{key}", str(value))
    architecture.add_hparams(writer)
    writer.add_file_type(int(outtype_entry.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = add_tokenizer(writer, tokenizer, model.config.vocab_size, pre=tokenizer_pre)

    types: dict[str, str] = {}
    data_bytes = f16_data_bytes = 0
    for gguf_name, tensor in architecture.tensors(model.state_dict()):
        array = tensor.numpy()
        qtype = outtype_entry.tensor_type(gguf_name, array.shape, ternary=architecture.is_ternary(gguf_name))
        encoded = outtype_entry.encode(array, qtype)
        writer.add_tensor(gguf_name, encoded, raw_dtype=qtype)  # byte shapes are converted by the writer
        types[gguf_name] = qtype.name
        data_bytes += _padded(encoded.nbytes)
        f16_data_bytes += _padded(array.size * (4 if array.ndim < 2 else 2))
    path = Path(path)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = GGUFReport(path, architecture.arch_name, outtype, pre, types)
    report.f16_size_bytes = report.size_bytes - data_bytes + f16_data_bytes
    main = {gguf.GGMLQuantizationType(t).name for t in (outtype_entry.matrix_type, outtype_entry.ternary_type) if t}
    others = {n: t for n, t in types.items() if t not in main and t != "F32"}
    if others:
        logger.info("%s: tensors not stored as %s: %s", path.name, "/".join(sorted(main)), others)
    logger.info(
        "%s (%s, %s): %s bytes on disk vs %s for an f16 GGUF (%.1f%%); tensors by type: %s.",
        path.name, architecture.arch_name, outtype, f"{report.size_bytes:,}", f"{report.f16_size_bytes:,}",
        100 * report.size_bytes / report.f16_size_bytes, report.type_summary(),
    )  # fmt: skip
    return report
