"""The error every export step raises for input it cannot export; the message names the fix."""

from __future__ import annotations

from ..errors import ExportError

__all__ = ["ExportError"]
