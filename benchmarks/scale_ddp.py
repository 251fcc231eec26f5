"""Throughput and peak memory of one process against DDP across processes, on CPU, through the `distily` CLI.

All modes train the same global batch (1 process × B rows against N processes × B/N rows) on the embedded
SmolLM2-135M-Instruct teacher and its 4-layer student: 1 process with N threads (the N cores to itself), 1 process
with 1 thread (what one core does), N processes with 1 thread each (DDP, gloo). Runs are interleaved and
repeated; the table gives medians of the logged tokens/s (first step left out as warm-up) and of the
per-process peak RSS.

    .venv/bin/python benchmarks/scale_ddp.py --repeats 2 --steps 8

Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_once(processes: int, global_batch: int, steps: int, seq_len: int, threads: int, out: Path) -> dict:
    argv = [
        "--config", str(ROOT / "configs" / "demo.yaml"),
        "--output_dir", str(out), "--overwrite_output_dir", "true",
        "--seq_len", str(seq_len), "--max_steps", str(steps), "--max_eval_blocks", "4",
        "--per_device_train_batch_size", str(global_batch // processes), "--per_device_eval_batch_size", "2",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--warmup_steps", "0", "--disable_tqdm", "true", "--eval_teacher", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        command = [sys.executable, "-m", "distily.cli", *argv]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), "--nproc_per_node", str(processes), "--master_port", str(free_port())]
        command += ["-m", "distily.cli", *argv]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps_logged = [entry for entry in history if "tokens_per_second" in entry]
    return {
        "tokens_per_second": statistics.median(e["tokens_per_second"] for e in steps_logged[1:]),
        "step_time": statistics.median(e["step_time"] for e in steps_logged[1:]),
        "peak_rss_mb": max(e["peak_memory_mb"] for e in steps_logged),
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--global_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = args.processes  # the cores split between the processes of each mode
    modes = {
        "1 process": (1, cores),
        "1 process, 1 thread": (1, 1),
        f"DDP {args.processes} processes (gloo)": (args.processes, 1),
    }
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="distily-bench-") as tmp:
        for repeat in range(args.repeats):
            for mode, (processes, threads) in modes.items():  # interleaved: ABCABC
                out = Path(tmp) / f"{processes}-{threads}-{repeat}"
                results[mode].append(run_once(processes, args.global_batch, args.steps, args.seq_len, threads, out))
                print(f"# {mode}, repeat {repeat + 1}: {results[mode][-1]}", file=sys.stderr, flush=True)
    base = statistics.median(r["tokens_per_second"] for r in results["1 process"])
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("| mode | threads/process | tokens/s (median) | vs 1 process | s/step | peak RSS per process (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, (_, threads) in modes.items():
        rows = results[mode]
        tps = statistics.median(r["tokens_per_second"] for r in rows)
        step = statistics.median(r["step_time"] for r in rows)
        rss = statistics.median(r["peak_rss_mb"] for r in rows)
        print(f"| {mode} | {threads} | {tps:,.0f} | {tps / base:.2f}× | {step:.2f} | {rss:,.0f} |")


if __name__ == "__main__":
    main()
