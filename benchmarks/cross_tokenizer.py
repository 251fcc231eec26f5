"""Cross-tokenizer distillation: a student with its own 16k BPE tokenizer vs the same-size student with the
teacher's tokenizer, at equal steps, compared in bits per byte on the same eval bytes.

Teacher: the embedded SmolLM2-135M-Instruct. Students: 4 layers of its width (teacher layers 0, 10, 19, 29).

1. The tokenizer: ``distily.train_tokenizer`` on the whole train split of python-stdlib, 16,384 tokens, the
   teacher's special tokens, chat template and pipeline carried over (what ``distily tokenizer train --teacher
   smollm2-135m-instruct`` does).
2. The training documents: a seeded sample of ``--train_documents`` documents of python-stdlib's train split,
   the same for every variant (packing the whole split with both tokenizers would take most of the budget);
   the eval split is python-stdlib's own.
3. Variants, each one ``distily.run.train`` run (the path of the ``distily`` command), ``--max_steps`` steps,
   batch 4 × 256 student tokens, configs/demo.yaml otherwise: ``same`` (the teacher's tokenizer, the demo's
   forward KL at alpha 1), ``hybrid`` and ``uld`` (the own tokenizer, --cross_tokenizer_loss, alpha
   ``--cross_alpha``: ULD alone carries no token identity, so the cross-entropy term is needed), and ``ce``
   (the own tokenizer on cross-entropy alone, alpha 0: what the distillation term adds).
4. Bits per byte (``distily.bits_per_byte``) of every student on the first ``--eval_bytes`` bytes of the eval
   split's documents (whole documents, the same bytes for every variant), and tokens per byte of both
   tokenizers on the whole eval split.

    python benchmarks/cross_tokenizer.py --out runs/bench-xtok --max_steps 30
    python benchmarks/cross_tokenizer.py --out runs/bench-xtok --report_only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distily.config import (  # noqa: E402
    DataArguments,
    DistillationConfig,
    TeacherArguments,
    configs_from_dict,
    train_kwargs,
)
from distily.config.tokenizer import TokenizerTrainArguments  # noqa: E402
from distily.data import load_documents  # noqa: E402
from distily.run import load_run_teacher, train  # noqa: E402
from distily.tokenizer import bits_per_byte, tokens_per_byte, train_tokenizer  # noqa: E402

TEACHER = "smollm2-135m-instruct"


def variants(args, tokenizer_dir: Path) -> dict[str, dict]:
    own = {"student_tokenizer": str(tokenizer_dir), "alpha": args.cross_alpha}
    return {
        "same": {},
        "hybrid": {**own, "cross_tokenizer_loss": "hybrid"},
        "uld": {**own, "cross_tokenizer_loss": "uld"},
        # A control: the own-tokenizer student on cross-entropy alone (the teacher is not run), same steps.
        "ce": {**own, "cross_tokenizer_loss": "hybrid", "alpha": 0.0},
    }


def prepare(args) -> tuple[Path, Path, list[str], dict]:
    """The tokenizer (trained once), the training documents' folder, the bits-per-byte texts, tokens per byte."""
    out = Path(args.out)
    tokenizer_dir, data_dir = out / "tokenizer", out / "data"
    timings = {}
    started = time.time()
    documents = load_documents(DataArguments(dataset="python-stdlib"))
    if not tokenizer_dir.exists():
        train_tokenizer(
            TokenizerTrainArguments(vocab_size=args.vocab_size, output_dir=str(tokenizer_dir), teacher=TEACHER),
            DataArguments(dataset="python-stdlib"),
        )
        timings["tokenizer_train_seconds"] = round(time.time() - started, 1)
    if not data_dir.exists():
        from datasets import DatasetDict

        train_docs = documents["train"].shuffle(seed=0).select(range(args.train_documents))
        DatasetDict({"train": train_docs, "eval": documents["eval"]}).save_to_disk(str(data_dir))
    texts, size = [], 0
    for text in documents["eval"]["text"]:
        if size >= args.eval_bytes:
            break
        texts.append(text)
        size += len(text.encode("utf-8"))
    from transformers import AutoTokenizer

    from distily.teacher.loading import load_tokenizer

    eval_texts = documents["eval"]["text"]
    density = {
        "own": tokens_per_byte(AutoTokenizer.from_pretrained(tokenizer_dir), eval_texts),
        "teacher": tokens_per_byte(load_tokenizer(TEACHER), eval_texts),
        "eval_split_bytes": sum(len(t.encode("utf-8")) for t in eval_texts),
        **timings,
    }
    return tokenizer_dir, data_dir, texts, density


def run_variant(name: str, overrides: dict, args, data_dir: Path, texts: list[str], loaded_teacher) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    values = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    values.update(
        dataset=str(data_dir),
        output_dir=str(Path(args.out) / name),
        max_steps=args.max_steps,
        max_eval_blocks=args.eval_blocks,
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(1, args.max_steps // 5),
        warmup_steps=min(values["warmup_steps"], args.max_steps // 4),
        max_train_seconds=None,
        export=None,
        **overrides,
    )
    run_args = train_kwargs(configs_from_dict(values, source=f"variant {name}"))
    started = time.time()
    result = train(**run_args, command=["benchmarks/cross_tokenizer.py", name], loaded_teacher=loaded_teacher)
    wall = time.time() - started
    folder = Path(args.out) / name
    student, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    bpb = bits_per_byte(student, tokenizer, texts, seq_len=256, batch_size=8, progress=False)
    history = result.trainer.state.log_history
    steps = [entry for entry in history if "step_time" in entry]
    return {
        **{key: value for key, value in overrides.items()},
        "alpha": run_args["config"].alpha,
        "steps": result.trainer.state.global_step,
        "bits_per_byte": bpb["bits_per_byte"],
        "eval_tokens": bpb["tokens"],
        "eval_bytes": bpb["bytes"],
        "train_loss": result.train_metrics.get("train_loss"),
        "seconds_per_step": sum(e["step_time"] for e in steps) / max(len(steps), 1),
        "aligned_fraction": [e["aligned_fraction"] for e in history if "aligned_fraction" in e][-1:] or None,
        "exact_fraction": [e["exact_fraction"] for e in history if "exact_fraction" in e][-1:] or None,
        "unaligned_blocks": sum(e.get("unaligned_blocks", 0) for e in history),
        "wall_seconds": round(wall, 1),
        "shared_token_rows": student.config.to_dict().get("distily_init", {}).get("shared_token_rows"),
        "vocab_size": student.config.vocab_size,
    }


def report(results: dict, density: dict) -> str:
    base = results.get("same", {}).get("bits_per_byte")
    lines = [
        "| variant | loss | alpha | steps | bits/byte | vs same | s/step | aligned | exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = f"{100 * (r['bits_per_byte'] / base - 1):+.1f}%" if base else ""
        aligned = f"{r['aligned_fraction'][0]:.3f}" if r.get("aligned_fraction") else ""
        exact = f"{r['exact_fraction'][0]:.3f}" if r.get("exact_fraction") else ""
        loss = r.get("cross_tokenizer_loss", "forward_kl")
        lines.append(
            f"| {name} | {loss} | {r['alpha']} | {r['steps']} | {r['bits_per_byte']:.4f} | {ratio} | "
            f"{r['seconds_per_step']:.2f} | {aligned} | {exact} |"
        )
    lines.append(
        f"\ntokens per byte on the eval split ({density['eval_split_bytes']:,} bytes): own 16k tokenizer "
        f"{density['own']:.4f}, teacher's {density['teacher']:.4f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-xtok")
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--vocab_size", type=int, default=16384)
    parser.add_argument("--train_documents", type=int, default=240)
    parser.add_argument("--eval_bytes", type=int, default=150_000)
    parser.add_argument("--eval_blocks", type=int, default=4)
    parser.add_argument("--cross_alpha", type=float, default=0.5)
    parser.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tokenizer_dir, data_dir, texts, density = prepare(args)
    (out / "density.json").write_text(json.dumps(density, indent=2))
    results = {}
    loaded_teacher = None
    for name, overrides in variants(args, tokenizer_dir).items():
        summary = out / name / "bench_summary.json"
        if summary.is_file():
            results[name] = json.loads(summary.read_text())
            continue
        if args.report_only or (args.only is not None and name not in args.only):
            continue
        if loaded_teacher is None:
            config = DistillationConfig(output_dir=str(out / "teacher"), use_cpu=True, report_to="none")
            loaded_teacher = load_run_teacher(TeacherArguments(teacher=TEACHER), config)
        results[name] = run_variant(name, overrides, args, data_dir, texts, loaded_teacher)
        summary.write_text(json.dumps(results[name], indent=2))
        print(f"{name}: {results[name]}", flush=True)
    print(report(results, density))
    print(f"\nwall time {time.time() - started:.0f} s, {len(texts)} eval documents", flush=True)


if __name__ == "__main__":
    main()
