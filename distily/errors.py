"""Every error distily raises for input it cannot use; a leaf module that imports nothing from distily.

Each message says what is wrong and what to change. The command line catches :class:`DistilyError`, prints its
message on one line and exits with status 2; any other exception is a bug and keeps its traceback.
The classes also derive from the built-in exception their callers caught before this module existed
(``ValueError``, ``OSError``, ...), so ``except ValueError`` around distily calls keeps working.
"""

from __future__ import annotations


class DistilyError(Exception):
    """Base class of distily's errors: bad input, with a message that names the fix."""


class ConfigError(DistilyError, ValueError):
    """A flag, a config file value or a combination of them cannot be used; the message says which to change."""


class DataError(DistilyError, ValueError):
    """The dataset cannot be used as given; the message says why and what to do."""


class CacheError(DistilyError, ValueError):
    """A teacher cache cannot be used as asked; the message says what differs and what to do."""


class ExportError(DistilyError, ValueError):
    """The model, tokenizer or output path cannot be exported as asked; the message says what to do."""


class TeacherLoadError(DistilyError, OSError):
    """The teacher could not be loaded (not found locally, not reachable on the Hub, or not a model)."""


class SynthError(DistilyError, RuntimeError):
    """Generation cannot go on (the API refused the key, an engine is missing); the message says what to do."""


class UnknownNameError(DistilyError, KeyError, ValueError):
    """Raised for a name no registry entry has; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class TaskFileError(DistilyError, ValueError):
    """A code-evaluation task file or completions file cannot be used; the message names the file, line and field."""


class PruneError(DistilyError, ValueError):
    """A model cannot be pruned as asked (architecture, target shape, calibration data); the message says what to do."""
