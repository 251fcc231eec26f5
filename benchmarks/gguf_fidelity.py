"""How faithfully does llama.cpp run a distily GGUF export? Sizes, logit differences and perplexity per outtype.

    python benchmarks/gguf_fidelity.py runs/demo --blocks 8
    python benchmarks/gguf_fidelity.py --teacher smollm2-135m-instruct --blocks 8   # a full-size model


For each outtype the student of RUN_DIR is written to GGUF, loaded in llama.cpp (llama-cpp-python, float32 KV
cache) and run on the first ``--blocks`` eval blocks of the run's own eval split; the same blocks go through
PyTorch float32. Printed side by side: file size (and ratio to f32), max |logit difference|, top-1 agreement,
perplexity and its change against PyTorch.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def nll_sum(logits: np.ndarray, ids: list[int]) -> float:
    log_probs = torch.tensor(logits[:-1]).log_softmax(-1)
    return -log_probs.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()


def main() -> None:
    import llama_cpp

    from distily.config import DataArguments
    from distily.data import prepare_datasets
    from distily.export import load_student
    from distily.export.gguf import write_gguf
    from distily.run_folder import RunFolder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", help="a finished distily run (its student and eval split)")
    parser.add_argument("--teacher", help="benchmark this teacher instead (python-stdlib eval split, seq_len 256)")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--outtypes", default="f32,f16,bf16,q8_0")
    args = parser.parse_args()

    if args.teacher:
        from distily.teacher.loading import load_teacher

        run = {"dataset": "python-stdlib", "seq_len": 256, "max_eval_blocks": 32, "teacher": args.teacher}
        model, tokenizer = load_teacher(args.teacher)
    else:
        run = RunFolder(args.run_dir).saved_config()
        model, tokenizer = load_student(args.run_dir)
    data = prepare_datasets(
        DataArguments(
            dataset=run["dataset"],
            max_eval_blocks=run.get("max_eval_blocks"),
            dataset_cache_dir=run.get("dataset_cache_dir"),
        ),
        tokenizer,
        run["seq_len"],
    )
    blocks = [list(map(int, row)) for row in data.eval[: args.blocks]["input_ids"]]
    tokens = sum(len(b) - 1 for b in blocks)
    started = time.perf_counter()
    with torch.no_grad():
        reference = [model(torch.tensor([ids])).logits[0].float().numpy() for ids in blocks]
    torch_seconds = time.perf_counter() - started
    torch_nll = sum(nll_sum(logits, ids) for logits, ids in zip(reference, blocks, strict=True))
    torch_ppl = math.exp(torch_nll / tokens)
    source = args.run_dir or args.teacher
    print(f"{source}: {len(blocks)} eval blocks × {len(blocks[0])} tokens ({tokens} predicted tokens)")
    print(f"PyTorch float32: perplexity {torch_ppl:.4f} ({torch_seconds:.1f} s)")
    header = f"{'outtype':<8}{'size MB':>10}{'vs f32':>8}{'max|Δlogit|':>13}{'top-1 agree':>13}"
    print(f"{header}{'ppl':>10}{'Δppl':>9}{'s':>7}")
    f32_size = None
    with tempfile.TemporaryDirectory() as folder:
        for outtype in args.outtypes.split(","):
            report = write_gguf(model, tokenizer, Path(folder) / f"{outtype}.gguf", outtype, teacher=run.get("teacher"))
            size = report.size_bytes
            f32_size = f32_size or (size if outtype == "f32" else None)
            llm = llama_cpp.Llama(
                model_path=str(report.path), logits_all=True, n_ctx=len(blocks[0]), n_batch=len(blocks[0]),
                verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
            )  # fmt: skip
            diff, agree, nll = 0.0, 0, 0.0
            started = time.perf_counter()
            for ids, expected in zip(blocks, reference, strict=True):
                llm.reset()
                llm.eval(ids)
                logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
                diff = max(diff, float(np.abs(logits - expected).max()))
                agree += int((logits.argmax(-1) == expected.argmax(-1)).sum())
                nll += nll_sum(logits, ids)
            seconds = time.perf_counter() - started
            llm.close()
            ppl = math.exp(nll / tokens)
            ratio = f"{size / f32_size:.2f}" if f32_size else "-"
            print(
                f"{outtype:<8}{size / 1e6:>10.1f}{ratio:>8}{diff:>13.4f}{agree / sum(map(len, blocks)):>13.4f}"
                f"{ppl:>10.4f}{100 * (ppl / torch_ppl - 1):>+8.2f}%{seconds:>7.1f}"
            )


if __name__ == "__main__":
    main()
