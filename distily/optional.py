"""Optional packages imported lazily, each with one error that names what installs it (a leaf: imports only
:mod:`distily.errors`)."""

from __future__ import annotations

from .errors import ConfigError


def import_llama_cpp(purpose: str):
    """``llama_cpp``, or a :class:`~distily.errors.ConfigError` saying that ``purpose`` (for example "Evaluating a
    .gguf file") needs llama-cpp-python and how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ConfigError(
            f"{purpose} needs llama-cpp-python: pip install llama-cpp-python (distily's dev extra pins it; PyPI "
            "ships source, so it compiles llama.cpp)."
        ) from err
    return llama_cpp
