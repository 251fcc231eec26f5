"""How far llama.cpp's logits for a BitNet GGUF are from PyTorch's, and why: per trained student.

    ../shared/cpu-lock python benchmarks/bitnet_gguf_kernels.py --seeds 0 1 2 3 4 5 6

For each seed and each of the two widths of tests/test_bitnet_gguf.py (every projection ternary; hidden 320 with
Q8_0 fallbacks), trains the test's tiny BitNet student (40 steps at lr 1e-2, the seed changed), exports it as
tq2_0 and compares llama.cpp's logits with (a) the student's own BitLinear forward (per-token int8 activations)
and (b) the same student under llama.cpp's activation arithmetic emulated in PyTorch
(tests/llama_cpp_arithmetic.py). Prints one Markdown row per student: max, p99, p95 and mean |Δlogit|, relative
perplexity difference and top-1 agreement, with σ (the logits' standard deviation). Seed 0 is the test's own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distily.bitnet import load_bitnet_student
from distily.export import export
from tests.conftest import llama_cpp_build, make_byte_bpe_tokenizer
from tests.llama_cpp_arithmetic import llama_cpp_arithmetic
from tests.test_bitnet_gguf import ALL_TERNARY, FALLBACK, bitnet_student, gguf_types, perplexity
from tests.test_export import llama_cpp_logits, token_ids, torch_logits


def compare(reference: np.ndarray, logits: np.ndarray, ids: list[int]) -> dict[str, float]:
    difference = np.abs(logits - reference)
    return {
        "max": float(difference.max()),
        "p99": float(np.percentile(difference, 99)),
        "p95": float(np.percentile(difference, 95)),
        "mean": float(difference.mean()),
        "ppl_rel": perplexity(logits, ids) / perplexity(reference, ids) - 1,
        "top1": float((reference.argmax(-1) == logits.argmax(-1)).mean()),
        "sigma": float(reference.std()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6])
    parser.add_argument("--outtype", default="tq2_0", choices=["tq2_0", "tq1_0"])
    args = parser.parse_args()
    tokenizer = make_byte_bpe_tokenizer()
    ids = token_ids(tokenizer)
    print(f"llama.cpp: {llama_cpp_build()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    print("| seed | width | vs BitLinear: max / p99 / p95 / mean | ppl | top-1 | vs llama.cpp arithmetic: max / p99 "
          "/ mean | ppl | σ |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    real_seed = torch.manual_seed
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label, widths in (("all_ternary", ALL_TERNARY), ("fallback", FALLBACK)):
                with mock.patch.object(torch, "manual_seed", lambda _, seed=seed: real_seed(seed)):
                    student = bitnet_student(widths)
                folder = Path(tmp) / f"s{seed}-{label}"
                student.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
                path = Path(tmp) / f"s{seed}-{label}.gguf"
                export(folder, ["gguf"], args.outtype, path)
                student = load_bitnet_student(folder)
                logits = llama_cpp_logits(path, ids)
                quality = compare(torch_logits(student, ids), logits, ids)
                with llama_cpp_arithmetic(student, gguf_types(path)):
                    kernels = compare(torch_logits(student, ids), logits, ids)
                print(
                    f"| {seed} | {label} | {quality['max']:.2f} / {quality['p99']:.3f} / {quality['p95']:.3f} / "
                    f"{quality['mean']:.4f} | {100 * quality['ppl_rel']:+.2f}% | {100 * quality['top1']:.1f}% | "
                    f"{kernels['max']:.3f} / {kernels['p99']:.4f} / {kernels['mean']:.5f} | "
                    f"{100 * kernels['ppl_rel']:+.3f}% | {quality['sigma']:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
