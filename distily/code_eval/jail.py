"""Run as a script inside fresh user, mount, network and PID namespaces: make every mount read-only except the
work folder, then exec the program.

``python -I jail.py WORKDIR PROGRAM [ARGS...]`` is started by :mod:`distily.code_eval.sandbox` through
``unshare --user --map-root-user --mount --net --pid --fork --kill-child``. It imports nothing from distily (it
runs under ``python -I`` with the sandbox's stripped environment) and nothing outside the standard library.

The mount namespace is private to this process tree, so the read-only remounts change nothing outside it. A
mount that cannot be made read-only stops the program (exit status 125) rather than run it with a writable
filesystem the caller believes read-only.
"""

from __future__ import annotations

import ctypes
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME = 32, 1024, 2048, 4096, 1 << 21
# statvfs flags -> mount flags: a remount inside a user namespace must keep the flags it inherited ("locked").
KEEP = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}
JAIL_FAILED = 125


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    out, index = [], 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1 : index + 4].isdigit():
            out.append(chr(int(field[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return list(dict.fromkeys(_unescape(line.split()[4]) for line in handle if line.strip()))


def _mount(libc, source, target: str, flags: int) -> None:
    if libc.mount(source, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def read_only_except(workdir: str) -> None:
    """Bind ``workdir`` onto itself (its own, writable mount), then remount every other mount read-only."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    _mount(libc, workdir.encode(), workdir, MS_BIND)
    for point in mount_points():
        if point == workdir:
            continue
        try:
            present = os.statvfs(point).f_flag
        except OSError:
            continue  # hidden under another mount: nothing can reach it by that path
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for st_flag, ms_flag in KEEP.items():
            if present & st_flag:
                flags |= ms_flag
        _mount(libc, None, point, flags)


def main(argv: list[str]) -> int:
    workdir, program = os.path.realpath(argv[0]), argv[1:]
    try:
        read_only_except(workdir)
    except OSError as err:
        print(f"sandbox: could not make the filesystem read-only ({err})", file=sys.stderr, flush=True)
        return JAIL_FAILED
    os.chdir(workdir)
    os.execvpe(program[0], program, os.environ)
    return JAIL_FAILED  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
