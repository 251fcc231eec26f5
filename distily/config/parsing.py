"""Small parsers shared by the config dataclasses: JSON-object flags and auto/true/false switches."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError


def parse_json_dict(value: Any, flag: str, example: str) -> dict | None:
    """Accept a dict, a JSON object string or None; anything else is a :class:`ConfigError`."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"--{flag} is not valid JSON ({err.msg} at character {err.pos}): {value!r}. "
                f"Pass a JSON object, for example --{flag} '{example}'."
            ) from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"--{flag} must be a JSON object like '{example}', got {type(parsed).__name__}.")
        return parsed
    raise ConfigError(f"--{flag} must be a dict or a JSON object string, got {type(value).__name__}.")


def normalise_switch(value: Any, flag: str, choices: tuple[str, ...]) -> str:
    """``auto``/``true``/``false`` from a string or a bool (YAML turns ``false`` into a bool)."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    text = str(value).strip().lower()
    text = {"on": "true", "yes": "true", "1": "true", "off": "false", "no": "false", "0": "false"}.get(text, text)
    if text not in choices:
        raise ConfigError(f"--{flag} must be one of {', '.join(choices)}, got {value!r}.")
    return text
