"""The error every export step raises for input it cannot export; the message names the fix."""

from __future__ import annotations


class ExportError(ValueError):
    """The model, tokenizer or output path cannot be exported as asked; the message says what to do."""
