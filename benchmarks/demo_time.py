"""Wall time of `make demo` from a fresh clone, as a new user runs it: venv included, per phase.

    ../shared/cpu-lock python benchmarks/demo_time.py                      # this machine as it is
    ../shared/cpu-lock python benchmarks/demo_time.py --cores 1 --no_pip_cache   # a slower machine, no pip cache

Clones the repository's HEAD into a temporary folder (or --clone_dir), runs `make demo` there with `time`, and
reads the run's manifest: steps made out of max_steps, whether --max_train_seconds ended training, the seconds of
each phase, the student's eval perplexity before and after, and the seconds per training step. `--cores N` pins
the whole demo to N cores with taskset (one core of this 2-core machine steps about twice as slowly: a stand-in
for the slower machines the budget is written for); `--no_pip_cache` sets PIP_NO_CACHE_DIR so every package is
downloaded again, as on a fresh machine. Prints one JSON object and one Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=None, help="pin `make demo` to this many cores (taskset)")
    parser.add_argument("--no_pip_cache", action="store_true", help="download every package again")
    parser.add_argument("--clone_dir", default=None, help="where to clone (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the clone afterwards")
    args = parser.parse_args()

    clone = Path(args.clone_dir or tempfile.mkdtemp(prefix="distily-demo-")) / "distily"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    env = dict(os.environ)
    if args.no_pip_cache:
        env["PIP_NO_CACHE_DIR"] = "1"
    command = ["make", "demo"]
    if args.cores:
        command = ["taskset", "-c", ",".join(str(c) for c in range(args.cores)), *command]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    start = time.monotonic()
    log = clone.parent / "make-demo.log"
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=clone, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - start
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    if result.returncode != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
        print(f"make demo failed with exit code {result.returncode}; log: {log}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(clone))
    from distily.run_folder import RunFolder

    run = RunFolder(clone / "runs" / "demo")
    manifest = run.manifest
    before = run.results("eval_start")["eval_student_ppl"]
    after = run.results("eval")["eval_student_ppl"]
    phases = manifest["phase_seconds"]
    report = {
        "commit": commit.stdout.strip(),
        "cores": args.cores or os.cpu_count(),
        "pip_cache": not args.no_pip_cache,
        "wall_seconds": round(wall, 1),
        "venv_and_startup_seconds": round(wall - manifest["wall_time_seconds"], 1),
        "steps": manifest["global_step"],
        "max_steps": manifest["max_steps"],
        "stopped_by_time_budget": manifest["stopped_by_time_budget"],
        "seconds_per_step": round(phases["train"] / max(manifest["global_step"], 1), 2),
        "phase_seconds": phases,
        "student_ppl_before": round(before, 2),
        "student_ppl_after": round(after, 2),
        "ppl_drop": round(1 - after / before, 4),
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    print(json.dumps(report, indent=2))
    print(
        f"| {report['cores']} | {'yes' if report['pip_cache'] else 'no'} | {wall / 60:.1f} min | "
        f"{report['venv_and_startup_seconds']:.0f} s | {report['steps']} of {report['max_steps']} | "
        f"{report['seconds_per_step']} s | {before:,.0f} → {after:.1f} | {' '.join(load_before)} / "
        f"{' '.join(load_after)} |"
    )
    if not args.keep and not args.clone_dir:
        shutil.rmtree(clone.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
