"""GGUF sizes and llama.cpp speed of BitNet students: tq2_0 / tq1_0 against f16 and q8_0.

    python benchmarks/bitnet_gguf.py              # both models below
    python benchmarks/bitnet_gguf.py --only demo

Two students, both untrained (sizes and speed do not depend on the weights' values):

* ``demo`` -- the demo's BitNet student: SmolLM2-135M cut to 4 layers (width 576, feed-forward 1536), converted
  with ``{"bitnet": true}``. Rows of 576 are not a multiple of TQ's 256-value blocks, so only ``ffn_down`` is
  ternary-packed; the other projections fall back to Q8_0.
* ``wide`` -- a random BitNet student with the SmolLM2 vocabulary (49,152, tied), 8 layers, width 1024,
  feed-forward 2816 (11 × 256): every projection ternary-packed.

For each outtype: bytes on disk, against the same student as an f16 GGUF and its weights in fp16, the tensor
types, and llama.cpp's speed (prompt of 128 tokens, then 64 greedy tokens; ``--threads``, default 2), timed
interleaved over ``--repeats`` rounds (default 3), medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

OUTTYPES = ("f16", "q8_0", "tq2_0", "tq1_0")


def demo_student():
    from distily import build_student, load_teacher

    teacher, tokenizer = load_teacher("smollm2-135m-instruct")
    return build_student(teacher, {"num_hidden_layers": 4, "bitnet": True}).eval(), tokenizer


def wide_student():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distily import build_student, load_teacher

    _, tokenizer = load_teacher("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    return build_student(base, {"bitnet": True}, init="random").eval(), tokenizer


def speed(path: Path, prompt: list[int], threads: int, new_tokens: int = 64) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of llama.cpp on the GGUF at ``path``."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, verbose=False)
    try:
        llm.eval(prompt[:8])  # warm-up
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill = len(prompt) / (time.perf_counter() - started)
        started = time.perf_counter()
        for count, _ in enumerate(llm.generate(prompt, temp=0.0, reset=False), start=1):
            if count == new_tokens:
                break
        decode = new_tokens / (time.perf_counter() - started)
        return prefill, decode
    finally:
        llm.close()


def run(name: str, student, tokenizer, threads: int, repeats: int) -> list[dict]:
    """Export every outtype, then time them interleaved (``repeats`` rounds), reporting medians."""
    import statistics

    from distily.export import export

    text = Path(__file__).read_text()
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"][:128]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "student"
        student.save_pretrained(source)
        tokenizer.save_pretrained(source)
        results = {o: export(source, ["gguf"], o, Path(folder) / f"{name}-{o}.gguf") for o in OUTTYPES}
        timings = {o: [] for o in OUTTYPES}
        for _ in range(repeats):
            for outtype, result in results.items():
                timings[outtype].append(speed(result.files["gguf"][0], prompt, threads))
        for outtype, result in results.items():
            prefill = statistics.median(t[0] for t in timings[outtype])
            decode = statistics.median(t[1] for t in timings[outtype])
            row = {"model": name, **result.gguf_sizes, "prompt_tok_s": round(prefill, 1), "gen_tok_s": round(decode, 1)}
            row["gen_tok_s_all"] = [round(t[1], 1) for t in timings[outtype]]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("demo", "wide"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds; medians are reported")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    for name, build in (("demo", demo_student), ("wide", wide_student)):
        if args.only in (None, name):
            student, tokenizer = build()
            run(name, student, tokenizer, args.threads, args.repeats)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
