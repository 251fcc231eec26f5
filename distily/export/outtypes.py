"""Which weight types each export format can store: the export's own knowledge, checked before training starts
(``check_exportable``) and by every export."""

from __future__ import annotations

from ..errors import ConfigError


def check_outtype(outtype: str | None, formats: list[str], flag: str) -> None:
    """An outtype every requested format can store (q8_0 and the ternary types are GGUF-only)."""
    if outtype is None:
        return
    from .gguf import GGUF_OUTTYPES
    from .safetensors import SAFETENSORS_OUTTYPES

    for fmt in formats:
        valid = tuple(SAFETENSORS_OUTTYPES) if fmt == "safetensors" else tuple(GGUF_OUTTYPES)
        if outtype not in valid:
            raise ConfigError(
                f"--{flag} {outtype!r} is not available for {fmt} (choose {', '.join(valid)}). Block-quantised types "
                "such as q8_0 exist only in GGUF: export the formats separately."
            )
