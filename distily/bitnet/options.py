"""``--student_config '{"bitnet": ...}'``: the options of a BitNet b1.58 student, parsed and validated.

A leaf: it imports neither torch nor anything from distily except :mod:`distily.errors`, so that
:mod:`distily.config` can validate the option before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


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
