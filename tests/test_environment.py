"""The environment the suite runs in is the one the lock and the Makefile describe."""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_lock)


def test_installed_versions_are_the_locked_ones():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_lock.py")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_check_names_every_difference_and_the_fix(tmp_path, capsys):
    lock = tmp_path / "constraints.txt"
    lock.write_text("# a comment\npytest==0.0.1\nno-such-package-xyz==1.0\nTorch==2.13.0  # release only\n")
    pins = check_lock.read_lock(lock)
    assert pins == {"pytest": "0.0.1", "no-such-package-xyz": "1.0", "torch": "2.13.0"}
    installed = {"pytest": "9.2.0", "torch": "2.13.0+cpu"}
    assert check_lock.differences(pins, installed) == [
        "no-such-package-xyz: locked 1.0, not installed",
        "pytest: locked 0.0.1, installed 9.2.0",
    ]  # torch 2.13.0+cpu is the locked release: local labels name the build, not the version
    assert check_lock.main([str(lock)]) == 1
    err = capsys.readouterr().err
    assert "pytest: locked 0.0.1" in err and "make clean && make test" in err


def test_a_malformed_lock_line_is_named(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("pytest>=8\n")
    with pytest.raises(ValueError, match=r"constraints.txt:1: expected 'name==version', got 'pytest>=8'"):
        check_lock.read_lock(lock)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the x86-64 build flags only")
def test_llama_cpp_is_the_portable_avx2_build():
    """The Makefile builds llama.cpp with GGML_NATIVE=OFF: AVX2/FMA/F16C, never AVX-512, whatever this CPU has.
    A wheel built natively on an AVX-512 machine (pip's cache once served one) reports AVX512 here."""
    llama_cpp = pytest.importorskip("llama_cpp")
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    assert "AVX2 = 1" in info and "FMA = 1" in info and "F16C = 1" in info, info
    assert "AVX512" not in info, info
