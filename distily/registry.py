"""A small named registry shared by losses, layer mappers and projectors.

Entries are registered with a decorator and looked up by name; an unknown name raises an error that lists
every known name and says how to register a new one. Parameters belong in config fields, never in names.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping of name -> entry, filled through :meth:`register`.

    ``kind`` names the entries in messages ("loss", "layer mapper", ...), ``plural`` its plural (by default
    English's regular one: "losses", "layer mappers"), and ``decorator`` is the public decorator users call, so
    errors can point at it.
    """

    def __init__(self, kind: str, decorator: str, plural: str | None = None):
        self.kind = kind
        self.plural = plural or (f"{kind}es" if kind.endswith(("s", "x", "ch", "sh")) else f"{kind}s")
        self.decorator = decorator
        self._entries: dict[str, T] = {}

    def register(self, name: str, *, override: bool = False) -> Callable[[T], T]:
        """Decorator that adds a function or class under ``name``.

        Registering a taken name is an error unless ``override=True`` (so a typo cannot silently replace a
        built-in).
        """
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"A {self.kind} name must be a non-empty string without surrounding spaces, got {name!r}.")

        def decorate(entry: T) -> T:
            if name in self._entries and not override:
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered. Pick another name, or pass "
                    f"override=True to {self.decorator}({name!r}, override=True) to replace it."
                )
            self._entries[name] = entry
            return entry

        return decorate

    def unregister(self, name: str) -> None:
        """Remove an entry (mainly for tests that register temporary entries)."""
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        known = ", ".join(sorted(self._entries))
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (
            f"Unknown {self.kind} {name!r}.{hint} Known {self.plural}: {known}. "
            f"Register your own with @{self.decorator}('name')."
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(sorted(self._entries))})"


def check_kwargs(what: str, flag: str, params: list[inspect.Parameter], kwargs: dict | None) -> None:
    """Reject ``kwargs`` that a registry entry's ``params`` do not name, listing those it takes.

    ``what`` names the entry in the message (``"Projector 'mlp'"``), ``flag`` the config field that carried
    the keyword arguments. An entry with ``**kwargs`` takes anything.
    """
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    takes = [p.name for p in params]
    unknown = sorted(set(kwargs or {}) - set(takes))
    if unknown:
        raise ValueError(
            f"{what} got unknown {flag} {unknown}; it takes: {', '.join(takes) if takes else 'no parameters'}."
        )
