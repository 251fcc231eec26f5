"""Check that this Python environment holds exactly the versions in the lock (constraints.txt).

    python scripts/check_lock.py [constraints.txt]

Exits 1, listing every package whose installed version differs from the lock (or that the lock names and is
not installed), with the command that fixes it. ``make test`` runs it before the suite, so a stale virtual
environment says so instead of failing strangely. Local version labels (``2.13.0+cpu``) are ignored: the lock
names the release, and the Makefile picks the CPU or CUDA build of it.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "constraints.txt"
FIX = "Run `make clean && make test` (a fresh .venv from the lock), or `make lock` to move the lock itself."


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``name -> version`` for each ``name==version`` line of a lock file (comments and blanks skipped)."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[canonical(name.strip())] = version.strip()
    return pins


def installed_versions() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version
    return found


def differences(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per locked package that is missing or installed at another release."""
    problems = []
    for name, version in sorted(pins.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}: locked {version}, not installed")
        elif have.split("+", 1)[0] != version.split("+", 1)[0]:
            problems.append(f"{name}: locked {version}, installed {have}")
    return problems


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else LOCK
    problems = differences(read_lock(path), installed_versions())
    if problems:
        print(f"This environment ({sys.prefix}) differs from the lock {path}:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print(FIX, file=sys.stderr)
        return 1
    print(f"check_lock: {sys.prefix} matches {path.name} ({len(read_lock(path))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
