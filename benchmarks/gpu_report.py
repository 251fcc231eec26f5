"""The report of ``benchmarks/gpu_check.sh``: what ran on the GPU machine, as JSON and Markdown.

    python benchmarks/gpu_report.py env > env.json     # machine and versions, in the interpreter the check uses
    python benchmarks/gpu_report.py build --env env.json --steps steps.tsv --junit junit.xml \\
        --bench bench.md --out DIR                      # DIR/report.json and DIR/report.md

``build`` reads what the check's steps left behind: ``steps.tsv`` (one line per step: name, exit status or
``-`` for a step that did not run, seconds, a note), pytest's JUnit XML (every test's outcome, skip reason,
failure message and the figures a test recorded with ``record_property``), and ``bench_step.py``'s Markdown
output. Any of them may be missing (a step that timed out or never ran); the report says so instead of failing.

Status: ``failed`` when a step exited non-zero, a test failed or errored, pytest was interrupted, or the test
step left no JUnit XML; ``partial`` when nothing failed but some tests were skipped or a step did not run;
``passed`` otherwise. The exit status of ``build`` is 1 for ``failed``, else 0.

Standard library only: the report is built even when the check's virtual environment could not be made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

FORMAT = "distily-gpu-check"
FORMAT_VERSION = 1
# Distributions whose versions the report lists (None when not installed).
PACKAGES = (
    "distily", "torch", "transformers", "accelerate", "datasets", "peft", "trl", "numpy", "triton", "vllm",
    "flashinfer-python", "bitsandbytes", "lm_eval", "deepspeed", "pytest",
)  # fmt: skip
OUTCOMES = ("passed", "failed", "error", "skipped")
DETAIL_CHARS = 240


# ----------------------------------------------------------------------------------------------------------------
# Machine and versions (run in the interpreter under test)


def _run(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def gpus_from_nvidia_smi(text: str | None) -> list[dict[str, Any]]:
    """``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits`` as dicts."""
    gpus = []
    for line in (text or "").splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3:
            memory = int(parts[1]) if parts[1].isdigit() else None
            gpus.append({"name": parts[0], "memory_mib": memory, "driver": parts[2]})
    return gpus


def collect_env() -> dict[str, Any]:
    """The machine (GPUs, CPU, Python, what torch sees), the versions of :data:`PACKAGES`, the source commit."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    machine: dict[str, Any] = {
        "gpus": gpus_from_nvidia_smi(
            _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
        ),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        machine.update(
            torch=torch.__version__,
            torch_cuda=torch.version.cuda,
            cuda_available=torch.cuda.is_available(),
            cuda_devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        )
    except Exception as err:  # a broken environment is what the report must show, not a reason to fail
        machine.update(torch=None, torch_error=f"{type(err).__name__}: {err}", cuda_available=False)
    root = Path(__file__).resolve().parent.parent
    commit = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    status = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    source = {"commit": commit, "dirty": bool(status) if status is not None else None}
    return {"machine": machine, "versions": versions, "source": source}


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def read_steps(path: Path) -> list[dict[str, Any]]:
    """``name<TAB>exit status<TAB>seconds<TAB>note`` per line; ``-`` as the exit status: the step did not run."""
    steps = []
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, rc, seconds, note = [*line.split("\t"), "", "", ""][:4]
        steps.append(
            {
                "name": name,
                "exit_status": None if rc.strip() in ("", "-") else int(rc),
                "seconds": float(seconds) if seconds.strip() else None,
                "note": note.strip() or None,
            }
        )
    return steps


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def read_junit(path: Path) -> dict[str, Any] | None:
    """Every ``testcase`` of pytest's JUnit XML: name, outcome, seconds, message, recorded properties; and
    whether pytest was interrupted (a time limit): then the tests after the last one listed did not run."""
    if not path.is_file():
        return None
    root = ElementTree.parse(path).getroot()
    cases, interrupted = [], False
    for case in root.iter("testcase"):
        if case.get("name") is None:  # what pytest writes for the test running when it was interrupted
            interrupted = True
            continue
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = _one_line(element.get("message") or element.text)
                break
        properties = {item.get("name"): item.get("value") for item in case.iter("property")}
        cases.append(
            {
                "name": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time") or 0.0), 3),
                "message": message,
                "properties": properties,
            }
        )
    counts = {outcome: sum(case["outcome"] == outcome for case in cases) for outcome in OUTCOMES}
    return {"counts": counts, "cases": cases, "interrupted": interrupted}


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """The Markdown tables in ``text``: each a list of rows keyed by the header cells (backticks removed)."""

    def cells(line: str) -> list[str]:
        return [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]

    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            header = cells(block[0])
            tables.append([dict(zip(header, cells(row), strict=False)) for row in block[2:]])
        block = []
    return tables


def read_bench(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    text = path.read_text()
    return {"text": text, "tables": markdown_tables(text)}


# ----------------------------------------------------------------------------------------------------------------
# The report


def report_status(steps: list[dict], tests: dict | None) -> str:
    ran = {step["name"]: step["exit_status"] for step in steps}
    if any(rc not in (0, None) for rc in ran.values()):
        return "failed"
    if tests is None:
        return "failed" if ran.get("tests") is not None else "partial"
    if tests["counts"]["failed"] or tests["counts"]["error"] or tests.get("interrupted"):
        return "failed"
    if tests["counts"]["skipped"] or None in ran.values() or "tests" not in ran:
        return "partial"
    return "passed"


def build_report(env: dict, steps: list[dict], tests: dict | None, bench: dict | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": report_status(steps, tests),
        "seconds": round(sum(step["seconds"] or 0.0 for step in steps), 1),
        "machine": env.get("machine", {}),
        "versions": env.get("versions", {}),
        "source": env.get("source", {}),
        "steps": steps,
        "tests": tests,
        "bench": bench,
    }


def _cell(text: Any) -> str:
    text = _one_line(str(text))
    if len(text) > DETAIL_CHARS:
        text = text[: DETAIL_CHARS - 1] + "…"
    return text.replace("|", "\\|")


def _exit_cell(rc: int | None) -> str:
    if rc is None:
        return "did not run"
    return {124: "124 (timed out)", 137: "137 (killed after timing out)"}.get(rc, str(rc))


def _machine_lines(report: dict) -> list[str]:
    machine, source = report["machine"], report["source"]
    if not machine:
        return ["- not recorded (the check could not read its environment)"]
    lines = []
    for index, gpu in enumerate(machine.get("gpus") or []):
        lines.append(f"- GPU {index}: {gpu['name']}, {gpu['memory_mib']} MiB, driver {gpu['driver']}")
    if not machine.get("gpus"):
        lines.append("- GPU: none found by nvidia-smi")
    lines.append(
        f"- CPU: {machine.get('cpu')}, {machine.get('cpu_count')} cores; Python {machine.get('python')} on "
        f"{machine.get('platform')}"
    )
    if machine.get("torch"):
        lines.append(
            f"- torch {machine['torch']} (CUDA {machine.get('torch_cuda')}), CUDA available: "
            f"{'yes' if machine.get('cuda_available') else 'no'}"
        )
    else:
        lines.append(f"- torch: not importable ({machine.get('torch_error', 'unknown')})")
    if source.get("commit"):
        lines.append(f"- source: commit {source['commit']}{' with local changes' if source.get('dirty') else ''}")
    return lines


def render_markdown(report: dict) -> str:
    tests = report["tests"]
    lines = [f"# distily GPU check: {report['status']}", ""]
    if tests is None:
        lines.append(f"No test results (no JUnit XML); {report['seconds']:.0f} s in all.")
    else:
        counts = tests["counts"]
        lines.append(
            f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, {counts['skipped']} "
            f"skipped of {len(tests['cases'])} tests; {report['seconds']:.0f} s in all."
        )
    lines += ["", "## Machine", "", *_machine_lines(report), "", "## Steps", ""]
    lines += ["| step | exit status | seconds | note |", "| --- | --- | ---: | --- |"]
    for step in report["steps"]:
        seconds = "" if step["seconds"] is None else f"{step['seconds']:.0f}"
        note = _cell(step.get("note") or "")
        lines.append(f"| {step['name']} | {_exit_cell(step['exit_status'])} | {seconds} | {note} |")
    lines += ["", "## Versions", "", "| package | version |", "| --- | --- |"]
    for name, version in report["versions"].items():
        lines.append(f"| {name} | {version or 'not installed'} |")
    lines += ["", "## Tests", ""]
    if tests is None:
        lines.append("No JUnit XML: the test step did not run or was killed before pytest wrote it.")
    else:
        lines += ["| test | outcome | seconds | details |", "| --- | --- | ---: | --- |"]
        for case in tests["cases"]:
            details = case["message"] or ", ".join(f"{k}={v}" for k, v in case["properties"].items())
            lines.append(f"| `{case['name']}` | {case['outcome']} | {case['seconds']:.1f} | {_cell(details)} |")
        if tests.get("interrupted"):
            lines += ["", "pytest was interrupted (its time limit): the tests after the last one listed did not run."]
    lines += ["", "## bench_step.py", ""]
    bench_rc = next((step["exit_status"] for step in report["steps"] if step["name"] == "bench"), None)
    if report["bench"] is None:
        lines.append(f"No output (exit status: {_exit_cell(bench_rc)}).")
    else:
        lines.append(report["bench"]["text"].rstrip())
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a report is for reading
    os.replace(tmp, path)


def write_report(report: dict, out: Path) -> None:
    _write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(out / "report.md", render_markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="print the machine and versions as JSON")
    build = commands.add_parser("build", help="write report.json and report.md")
    build.add_argument("--env", type=Path, required=True)
    build.add_argument("--steps", type=Path, required=True)
    build.add_argument("--junit", type=Path, required=True)
    build.add_argument("--bench", type=Path, required=True)
    build.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "env":
        print(json.dumps(collect_env(), indent=2))
        return 0
    env = json.loads(args.env.read_text()) if args.env.is_file() and args.env.stat().st_size else {}
    report = build_report(env, read_steps(args.steps), read_junit(args.junit), read_bench(args.bench))
    write_report(report, args.out)
    print(f"GPU check {report['status']}: {args.out / 'report.md'}")
    return 1 if report["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
