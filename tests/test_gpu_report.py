"""benchmarks/gpu_report.py and benchmarks/gpu_check.sh on CPU: the report of a GPU check, built from hand-written
inputs and compared whole; the check itself, without CUDA, stops at once and writes nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gpu_report():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENV = {
    "machine": {
        "gpus": [{"name": "NVIDIA H200", "memory_mib": 143771, "driver": "580.159.03"}],
        "cpu": "x86_64",
        "cpu_count": 16,
        "platform": "Linux-6.18-x86_64",
        "python": "3.12.3",
        "torch": "2.13.0+cu130",
        "torch_cuda": "13.0",
        "cuda_available": True,
        "cuda_devices": ["NVIDIA H200"],
    },
    "versions": {"torch": "2.13.0+cu130", "vllm": "0.30.0", "bitsandbytes": None},
    "source": {"commit": "0123abc", "dirty": False},
}

STEPS = "setup\t0\t171\t\ncuda\t0\t3\t\nbench\t0\t96\t\ntests\t1\t250\t\ndeepspeed\t-\t\tnot asked for\n"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4" time="250.0">
<testcase classname="tests.test_gpu" name="test_quantized_teacher[8]" time="12.345">
<properties><property name="teacher_mib" value="155.2" /><property name="bf16_teacher_mib" value="256.6" />
</properties></testcase>
<testcase classname="tests.test_gpu" name="test_ddp" time="0.001">
<skipped type="pytest.skip" message="fewer than 2 GPUs (found 1)">tests/test_gpu.py:433: fewer than 2 GPUs</skipped>
</testcase>
<testcase classname="tests.test_gpu" name="test_vllm_record" time="61.5">
<failure message="AssertionError: overlap 0.97 | below 0.99&#10;assert 0.97 &gt;= 0.99">long traceback</failure>
</testcase>
<testcase classname="tests.test_gpu" name="test_fsdp" time="2.0"><error message="fixture failed">trace</error>
</testcase>
</testsuite></testsuites>
"""

BENCH = """Command: `python benchmarks/bench_step.py --quick`

| mode | median s/step | tokens/s | median CPU s/step | peak memory (MiB) | step memory (MiB) |
| --- | ---: | ---: | ---: | ---: | ---: |
| `floor` | 0.050 | 20,480 | 0.049 | 1,234 | 456 |
| `distily` | 0.055 | 18,618 | 0.054 | 1,100 | 300 |

Memory: cuda allocated; step memory = peak − resident before the step.
"""

EXPECTED_MARKDOWN = (
    """# distily GPU check: failed

1 passed, 1 failed, 1 errors, 1 skipped of 4 tests; 520 s in all.

## Machine

- GPU 0: NVIDIA H200, 143771 MiB, driver 580.159.03
- CPU: x86_64, 16 cores; Python 3.12.3 on Linux-6.18-x86_64
- torch 2.13.0+cu130 (CUDA 13.0), CUDA available: yes
- source: commit 0123abc

## Steps

| step | exit status | seconds | note |
| --- | --- | ---: | --- |
| setup | 0 | 171 |  |
| cuda | 0 | 3 |  |
| bench | 0 | 96 |  |
| tests | 1 | 250 |  |
| deepspeed | did not run |  | not asked for |

## Versions

| package | version |
| --- | --- |
| torch | 2.13.0+cu130 |
| vllm | 0.30.0 |
| bitsandbytes | not installed |

## Tests

| test | outcome | seconds | details |
| --- | --- | ---: | --- |
| `tests.test_gpu::test_quantized_teacher[8]` | passed | 12.3 | teacher_mib=155.2, bf16_teacher_mib=256.6 |
| `tests.test_gpu::test_ddp` | skipped | 0.0 | fewer than 2 GPUs (found 1) |
| `tests.test_gpu::test_vllm_record` | failed | 61.5 | AssertionError: overlap 0.97 \\| below 0.99 assert 0.97 >= 0.99 |
| `tests.test_gpu::test_fsdp` | error | 2.0 | fixture failed |

## bench_step.py

"""
    + BENCH.rstrip()
    + "\n"
)


def write_inputs(folder: Path) -> dict[str, Path]:
    paths = {name: folder / name for name in ("env.json", "steps.tsv", "junit.xml", "bench.md")}
    paths["env.json"].write_text(json.dumps(ENV))
    paths["steps.tsv"].write_text(STEPS)
    paths["junit.xml"].write_text(JUNIT)
    paths["bench.md"].write_text(BENCH)
    return paths


def test_the_report_of_a_check_with_every_outcome(gpu_report, tmp_path):
    paths = write_inputs(tmp_path)
    argv = ["build", "--env", paths["env.json"], "--steps", paths["steps.tsv"], "--junit", paths["junit.xml"]]
    argv += ["--bench", paths["bench.md"], "--out", tmp_path / "out"]
    assert gpu_report.main([str(arg) for arg in argv]) == 1  # a failed test: the check failed
    assert (tmp_path / "out" / "report.md").read_text() == EXPECTED_MARKDOWN
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == {
        "format": "distily-gpu-check",
        "format_version": 1,
        "status": "failed",
        "seconds": 520.0,
        "machine": ENV["machine"],
        "versions": ENV["versions"],
        "source": ENV["source"],
        "steps": [
            {"name": "setup", "exit_status": 0, "seconds": 171.0, "note": None},
            {"name": "cuda", "exit_status": 0, "seconds": 3.0, "note": None},
            {"name": "bench", "exit_status": 0, "seconds": 96.0, "note": None},
            {"name": "tests", "exit_status": 1, "seconds": 250.0, "note": None},
            {"name": "deepspeed", "exit_status": None, "seconds": None, "note": "not asked for"},
        ],
        "tests": {
            "counts": {"passed": 1, "failed": 1, "error": 1, "skipped": 1},
            "interrupted": False,
            "cases": [
                {
                    "name": "tests.test_gpu::test_quantized_teacher[8]",
                    "outcome": "passed",
                    "seconds": 12.345,
                    "message": None,
                    "properties": {"teacher_mib": "155.2", "bf16_teacher_mib": "256.6"},
                },
                {
                    "name": "tests.test_gpu::test_ddp",
                    "outcome": "skipped",
                    "seconds": 0.001,
                    "message": "fewer than 2 GPUs (found 1)",
                    "properties": {},
                },
                {
                    "name": "tests.test_gpu::test_vllm_record",
                    "outcome": "failed",
                    "seconds": 61.5,
                    "message": "AssertionError: overlap 0.97 | below 0.99 assert 0.97 >= 0.99",
                    "properties": {},
                },
                {
                    "name": "tests.test_gpu::test_fsdp",
                    "outcome": "error",
                    "seconds": 2.0,
                    "message": "fixture failed",
                    "properties": {},
                },
            ],
        },
        "bench": {
            "text": BENCH,
            "tables": [
                [
                    {
                        "mode": "floor",
                        "median s/step": "0.050",
                        "tokens/s": "20,480",
                        "median CPU s/step": "0.049",
                        "peak memory (MiB)": "1,234",
                        "step memory (MiB)": "456",
                    },
                    {
                        "mode": "distily",
                        "median s/step": "0.055",
                        "tokens/s": "18,618",
                        "median CPU s/step": "0.054",
                        "peak memory (MiB)": "1,100",
                        "step memory (MiB)": "300",
                    },
                ]
            ],
        },
    }


def test_status_passed_partial_failed(gpu_report):
    def tests(**counts):
        return {"counts": {"passed": 3, "failed": 0, "error": 0, "skipped": 0, **counts}, "interrupted": False}

    ran = [{"name": name, "exit_status": 0} for name in ("setup", "cuda", "bench", "tests")]
    assert gpu_report.report_status(ran, tests()) == "passed"
    assert gpu_report.report_status(ran, tests(skipped=2)) == "partial"  # e.g. vllm not installed
    assert gpu_report.report_status(ran, tests(failed=1)) == "failed"
    assert gpu_report.report_status(ran, {**tests(), "interrupted": True}) == "failed"
    assert gpu_report.report_status(ran, None) == "failed"  # the tests ran but left no JUnit XML
    timed_out = [*ran[:2], {"name": "bench", "exit_status": 124}, ran[3]]
    assert gpu_report.report_status(timed_out, tests()) == "failed"
    not_run = [*ran[:3], {"name": "tests", "exit_status": None}]
    assert gpu_report.report_status(not_run, None) == "partial"


def test_a_report_without_test_results_or_bench_output(gpu_report, tmp_path):
    """What an interrupted check leaves: JUnit XML holding the unnamed case of the test that was running, no
    bench output, no environment file."""
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest" tests="1"><testcase classname="tests.test_gpu" name="test_a" '
        'time="1.5" /><testcase time="0.001" /></testsuite></testsuites>'
    )
    (tmp_path / "steps.tsv").write_text("setup\t0\t200\t\ncuda\t0\t2\t\nbench\t124\t120\t\ntests\t124\t240\t\n")
    argv = ["build", "--env", tmp_path / "none.json", "--steps", tmp_path / "steps.tsv", "--junit", junit]
    argv += ["--bench", tmp_path / "none.md", "--out", tmp_path / "out"]
    assert gpu_report.main([str(arg) for arg in argv]) == 1
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| bench | 124 (timed out) | 120 |  |" in text
    assert "| `tests.test_gpu::test_a` | passed | 1.5 |  |" in text
    assert "pytest was interrupted (its time limit): the tests after the last one listed did not run." in text
    assert text.endswith("## bench_step.py\n\nNo output (exit status: 124 (timed out)).\n")
    assert "## Machine\n\n- not recorded (the check could not read its environment)\n" in text


def test_env_describes_this_machine(gpu_report):
    env = gpu_report.collect_env()
    import torch

    assert env["machine"]["torch"] == torch.__version__
    assert env["machine"]["cuda_available"] == torch.cuda.is_available()
    assert env["versions"]["torch"] and set(env["versions"]) == set(gpu_report.PACKAGES)
    assert gpu_report.gpus_from_nvidia_smi("NVIDIA H200, 143771, 580.159.03\n") == [
        {"name": "NVIDIA H200", "memory_mib": 143771, "driver": "580.159.03"}
    ]


# ----------------------------------------------------------------------------------------------------------------
# The check without CUDA


def run_check(repo: Path, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "OUT": str(repo / "out"), "HOME": str(repo / "home")}
    env.pop("GPU_CHECK_PYTHON", None)
    return subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_check.sh")], cwd=repo, env=env, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip


@pytest.fixture
def lone_script(tmp_path) -> Path:
    """The script alone in an otherwise empty folder, so anything it wrote would show."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks" / "gpu_check.sh")
    return tmp_path


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_without_nvidia_smi_the_check_stops_at_once_and_writes_nothing(lone_script):
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is installed here: the failing-driver case below covers this machine")
    done = run_check(lone_script, os.environ["PATH"])
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu_check: no CUDA GPU here: nvidia-smi is not on PATH" in done.stderr
    assert "Nothing was written." in done.stderr and done.stdout == ""
    assert files_under(lone_script) == ["benchmarks", "benchmarks/gpu_check.sh"]


def test_with_a_failing_nvidia_smi_the_check_stops_at_once_and_writes_nothing(lone_script, tmp_path_factory):
    """nvidia-smi present but without a driver to talk to (a CUDA image on a machine without a GPU)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    fake = bin_dir / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.' >&2\nexit 9\n"
    )
    fake.chmod(0o755)
    done = run_check(lone_script, f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (
        "gpu_check: no CUDA GPU here: nvidia-smi -L lists none (NVIDIA-SMI has failed because it could not "
        "communicate with the NVIDIA driver.). Nothing was written.\n"
    )
    assert done.stdout == ""
    assert files_under(lone_script) == ["benchmarks", "benchmarks/gpu_check.sh"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_the_script_passes_shellcheck():
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
