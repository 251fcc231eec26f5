"""Eval perplexity of a run's GGUF exports in llama.cpp against the float32 student in PyTorch.

    ../shared/cpu-lock python benchmarks/gguf_perplexity.py --run RUN_DIR [--outtypes f16,q8_0]

For each outtype, `distily export RUN_DIR --format gguf --outtype T --output TMP/student-T.gguf` (a fresh
process, the command a user types) writes the file and measures it in llama.cpp on the run's own eval blocks
(distily.evaluate_gguf); this script reads the run's distily_eval.json and prints, per file: bytes, the
llama.cpp perplexity, PyTorch's (the run's eval_student_ppl on the same blocks) and their relative difference,
as JSON and as Markdown table rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run folder")
    parser.add_argument("--outtypes", default="f16,q8_0", help="comma-separated GGUF outtypes")
    parser.add_argument("--output_dir", default=None, help="where the GGUF files go (default: a temp folder)")
    args = parser.parse_args()

    run = Path(args.run)
    output = Path(args.output_dir or tempfile.mkdtemp(prefix="distily-gguf-ppl-"))
    rows = []
    for outtype in [t.strip() for t in args.outtypes.split(",") if t.strip()]:
        path = output / f"student-{outtype}.gguf"
        command = [
            sys.executable, "-m", "distily.cli", "export", str(run), "--format", "gguf", "--outtype", outtype,
            "--output", str(path),
        ]  # fmt: skip
        start = time.monotonic()
        subprocess.run(command, check=True)
        seconds = time.monotonic() - start
        entry = json.loads((run / "distily_eval.json").read_text())["gguf"][path.name]
        rows.append(
            {
                "outtype": outtype,
                "bytes": entry["bytes"],
                "llama_cpp_ppl": entry["eval_ppl"],
                "pytorch_ppl": entry["pytorch_ppl"],
                "relative_difference": entry["eval_ppl"] / entry["pytorch_ppl"] - 1,
                "eval_blocks": entry["eval_blocks"],
                "seq_len": entry["seq_len"],
                "export_and_measure_seconds": round(seconds, 1),
            }
        )
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps({"run": str(run.resolve()), "rows": rows, "load_average_end": load}, indent=2))
    for row in rows:
        print(
            f"| {row['outtype']} | {row['bytes']:,} | {row['llama_cpp_ppl']:.4f} | {row['pytorch_ppl']:.4f} | "
            f"{100 * row['relative_difference']:+.3f}% | {row['eval_blocks']} × {row['seq_len']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
