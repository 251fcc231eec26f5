"""BitNet b1.58 students: ternary-weight ``BitLinear``, conversion, quantisation warm-up, packed export.

The recipe (Ma et al., "The Era of 1-bit LLMs", 2024, and the "BitNet b1.58 2B4T" technical report, 2025), one
module per part:

* :mod:`~distily.bitnet.options` -- ``--student_config '{"bitnet": {...}}'`` parsed into :class:`BitNetOptions`
  (a leaf without torch, so :mod:`distily.config` can validate it);
* :mod:`~distily.bitnet.layers` -- the quantisers (absmean ternary weights, per-token absmax 8-bit activations,
  the straight-through estimator), :class:`BitLinear` and the SubLN :class:`SubLNorm`;
* :mod:`~distily.bitnet.convert` -- a Llama-layout student converted into transformers' ``BitNetForCausalLM``,
  SubLN gains calibrated to the student's own activations;
* :mod:`~distily.bitnet.schedule` -- training: the quantisation warm-up callback and the latent weights' own
  learning rate;
* :mod:`~distily.bitnet.packing` -- four ternary weights per byte, the packed export and the latent reload.

Every name is re-exported here: ``from distily.bitnet import BitLinear, save_packed`` works as it always has.
"""

from __future__ import annotations

from ..modeling import directory_bytes, fp16_bytes
from .convert import (
    ATTENTION_PROJECTIONS,
    CALIBRATION_LENGTH,
    CALIBRATION_SEED,
    CALIBRATION_SEQUENCES,
    CONFIG_KEY,
    MLP_PROJECTIONS,
    SUPPORTED_MODEL_TYPES,
    bitnet_config_from,
    bitnet_options_of,
    calibrate_sub_norms,
    calibration_ids,
    check_convertible,
    convert_to_bitnet,
    set_bitnet_metadata,
    swap_in_bitlinear,
)
from .layers import (
    ACTIVATION_QMAX,
    SCALE_EPS,
    VALUES_PER_BYTE,
    BitLinear,
    SubLNorm,
    absmax_quantize,
    absmean_quantize,
    bitlinear_modules,
    fake_quantize_activations,
    is_bitnet_student,
    set_quant_lambda,
    straight_through,
)
from .options import BitNetOptions, parse_bitnet_option, split_bitnet_overrides
from .packing import load_bitnet_student, pack_ternary, packed_state_dict, save_packed, unpack_ternary
from .schedule import (
    BitNetWarmup,
    latent_learning_rate,
    latent_weights,
    warmup_callback,
    warmup_lambda,
)

__all__ = [
    "ACTIVATION_QMAX",
    "ATTENTION_PROJECTIONS",
    "CALIBRATION_LENGTH",
    "CALIBRATION_SEED",
    "CALIBRATION_SEQUENCES",
    "CONFIG_KEY",
    "MLP_PROJECTIONS",
    "SCALE_EPS",
    "SUPPORTED_MODEL_TYPES",
    "VALUES_PER_BYTE",
    "BitLinear",
    "BitNetOptions",
    "BitNetWarmup",
    "SubLNorm",
    "absmax_quantize",
    "absmean_quantize",
    "bitlinear_modules",
    "bitnet_config_from",
    "bitnet_options_of",
    "calibrate_sub_norms",
    "calibration_ids",
    "check_convertible",
    "convert_to_bitnet",
    "directory_bytes",
    "fake_quantize_activations",
    "fp16_bytes",
    "is_bitnet_student",
    "latent_learning_rate",
    "latent_weights",
    "load_bitnet_student",
    "pack_ternary",
    "packed_state_dict",
    "parse_bitnet_option",
    "save_packed",
    "set_bitnet_metadata",
    "set_quant_lambda",
    "split_bitnet_overrides",
    "straight_through",
    "swap_in_bitlinear",
    "unpack_ternary",
    "warmup_callback",
    "warmup_lambda",
]
