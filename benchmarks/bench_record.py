"""The recorded teacher on the demo setting: cache size, recording throughput, step time, and students by k.

    python benchmarks/bench_record.py                 # small default (~20 min on 2 busy CPU cores)
    python benchmarks/bench_record.py --train_blocks 2048 --eval_blocks 64 --seq 512 --steps 500 --repeats 7

1. **Recording**: SmolLM2-135M-Instruct over ``--train_blocks`` python-stdlib blocks of ``--seq`` tokens (and
   ``--eval_blocks`` eval blocks), once per k in ``--ks`` (the teacher loaded once): bytes per token on disk and
   recording throughput (tokens/s) of the transformers backend.
2. **Reading memory**: every row of the largest cache is read twice, in random order, as training would; the
   growth of the process's anonymous memory (RssAnon; file-backed pages of the memory map are page cache, not
   heap) is reported.
3. **Step time**, side by side in one process (interleaved, medians; benchmarks/bench_step.py's machinery):
   the student alone (CE), the recorded teacher (k = 64), the live teacher (distily's default path).
4. **Students by k**: the same 4-layer student (initialised from the teacher's layers) trained ``--steps`` steps
   on the same blocks with forward KL from each cache and from the live teacher (full logits); student eval
   perplexity on the eval blocks, relative to the live run.

Markdown on stdout (and ``--output FILE``) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

# This checkout's distily (not another installed copy), and the step benchmark beside this file.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import bench_step  # noqa: E402  (after the path set-up) the Setup, Stepper and interleaved timing of the step benchmark


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def data_arguments(args):
    from distily.config import DataArguments

    return DataArguments(dataset="python-stdlib", max_train_blocks=args.train_blocks, max_eval_blocks=args.eval_blocks)


def record_caches(args, teacher, tokenizer, workdir: Path) -> dict[int, dict]:
    from distily.config import TeacherArguments
    from distily.teacher.recorded import RecordConfig, TeacherCache, record

    results = {}
    for spec in args.ks:
        k, _, samples = spec.partition("+")
        output = workdir / f"cache-k{k}-s{samples or 0}"
        config = RecordConfig(
            output=str(output), top_k=int(k), tail_samples=int(samples or 0), seq_len=args.seq,
            batch_size=args.record_batch, device=args.device,
        )  # fmt: skip
        started = time.perf_counter()
        record(TeacherArguments(teacher=args.teacher), data_arguments(args), config, teacher=teacher,
               tokenizer=tokenizer, progress=False)  # fmt: skip
        seconds = time.perf_counter() - started
        manifest = TeacherCache(output).manifest
        blocks = manifest["splits"]["train"]["blocks"] + manifest["splits"]["eval"]["blocks"]
        results[spec] = {
            "path": output,
            "bytes_per_token": manifest["stored_bytes"] / (blocks * args.seq),
            "formula": manifest["bytes_per_token"],
            "tokens_per_second": manifest["tokens_per_second_this_run"],
            "seconds": seconds,
            "teacher_ppl_eval": manifest["splits"]["eval"]["teacher_ppl"],
        }
        print(f"recorded k={spec}: {results[spec]}", file=sys.stderr, flush=True)
    return results


def synthetic_cache(args, tokenizer, workdir: Path, blocks: int) -> Path:
    """A k = 128 cache of ``blocks`` real python-stdlib blocks with random top-k values (no teacher: only its
    size matters), to measure reading memory on a cache far larger than the demo's."""
    from distily.config import DataArguments, TeacherArguments
    from distily.teacher.recorded import BlockTopK, RecordConfig, record

    k = 128
    generator = torch.Generator().manual_seed(0)

    def random_backend(input_ids):
        rows, positions = input_ids.shape[0], input_ids.shape[1] - 1
        values = -torch.rand(rows, positions, k, generator=generator).mul(20).sort(-1).values.flip(-1)
        ids = torch.randint(0, len(tokenizer), (rows, positions, k), generator=generator)
        return BlockTopK(ids, values, torch.full((rows, positions), -3.0), torch.zeros(rows, dtype=torch.float64))

    output = workdir / "synthetic"
    data = DataArguments(dataset="python-stdlib", max_train_blocks=blocks, max_eval_blocks=1)
    config = RecordConfig(output=str(output), top_k=k, tail_samples=0, seq_len=args.seq, batch_size=64)
    teacher = TeacherArguments(teacher=args.teacher)
    # A stand-in for the teacher: a config to save and no weights to hash.
    config_only = SimpleNamespace(vocab_size=len(tokenizer), save_pretrained=lambda path: Path(path).mkdir())
    stand_in = SimpleNamespace(config=config_only, state_dict=dict)
    record(teacher, data, config, teacher=stand_in, tokenizer=tokenizer, backend=random_backend, progress=False)
    return output


def reading_memory(cache_path: Path) -> dict[str, float]:
    """Read every train row twice in random order; RssAnon and RssFile growth in MiB."""
    import gc

    from distily.teacher.recorded import TeacherCache

    gc.collect()
    cache = TeacherCache(cache_path, verify="all")
    rows = cache.manifest["splits"]["train"]["blocks"]
    order = np.random.default_rng(0).permutation(rows)
    before_anon, before_file = rss_kib("RssAnon"), rss_kib("RssFile")
    started = time.perf_counter()
    for _ in range(2):
        for start in range(0, rows, 4):
            cache.read_rows("train", order[start : start + 4])
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in cache_path.glob("train/shard-*.safetensors")) / 2**20
    return {
        "cache_mib": size,
        "anon_growth_mib": (rss_kib("RssAnon") - before_anon) / 1024,
        "file_growth_mib": (rss_kib("RssFile") - before_file) / 1024,
        "rows_per_second": 2 * rows / seconds,
    }


def step_times(args, teacher, tokenizer, workdir: Path) -> dict[str, dict]:
    ids = bench_step.stdlib_batch(tokenizer, args.batch, args.seq)
    device = torch.device(args.device)
    setup = bench_step.Setup(teacher, tokenizer, bench_step.make_batch(ids, device), device, 4, False, workdir)
    return bench_step.time_modes(setup, ["student_ce", "distily_recorded", "distily"], args.repeats, 1)


def train_student(args, teacher, tokenizer, workdir: Path, cache: Path | None) -> dict[str, float]:
    from distily import DistillationConfig, DistillationTrainer, build_student
    from distily.data import prepare_datasets

    data = prepare_datasets(data_arguments(args), tokenizer, args.seq, block_index=True)
    torch.manual_seed(0)
    student = build_student(teacher, {"num_hidden_layers": 4})
    config = DistillationConfig(
        output_dir=str(workdir / f"run-{cache.name if cache else 'live'}"),
        report_to="none",
        use_cpu=args.device == "cpu",
        seq_len=args.seq,
        loss="forward_kl",
        alpha=args.alpha,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        teacher_cache=str(cache) if cache else None,
        remove_unused_columns=False,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=None if cache else teacher,
        args=config,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    metrics = trainer.evaluate()
    return {"student_ppl": metrics["eval_student_ppl"], "teacher_ppl": metrics.get("eval_teacher_ppl"), "s": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--train_blocks", type=int, default=24)
    parser.add_argument("--eval_blocks", type=int, default=8)
    parser.add_argument(
        "--ks",
        default="8,32,64,128,56+8,64+8",
        help="caches to record and train from: k (top k only) or k+S (top k and S tail samples)",
    )
    parser.add_argument("--record_batch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--steps", type=int, default=12, help="training steps per student (k sweep)")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--alpha", type=float, default=1.0, help="KD weight of every student (1 - alpha: label CE)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory_blocks", type=int, default=2000, help="blocks of the synthetic cache read back")
    parser.add_argument("--skip_steps", action="store_true")
    parser.add_argument("--skip_sweep", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    args.ks = args.ks.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_record.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    from distily import load_teacher

    started = time.time()
    teacher, tokenizer = load_teacher(args.teacher, dtype="float32", device=args.device)
    out = [f"Command: `{command}`", ""]
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        caches = record_caches(args, teacher, tokenizer, workdir)
        tokens = (args.train_blocks + args.eval_blocks) * args.seq
        out += [
            f"Recording ({args.teacher}, float32, transformers backend on {args.device}, {tokens:,} tokens = "
            f"{args.train_blocks} train + {args.eval_blocks} eval blocks of {args.seq}, batches of "
            f"{args.record_batch}, teacher loaded once):",
            "",
            "| k (+ tail samples) | bytes/token on disk | formula | recording tokens/s | seconds |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for k, row in caches.items():
            out.append(
                f"| {k} | {row['bytes_per_token']:.1f} | {row['formula']:.1f} | {row['tokens_per_second']:,.0f} | "
                f"{row['seconds']:.0f} |"
            )
        from distily.teacher.recorded import bytes_per_token

        at_512 = {
            spec: bytes_per_token({"top_k": k, "tail_samples": s, "seq_len": 512, "id_dtype": "uint16"})
            for spec, k, s in (("64", 64, 0), ("56+8", 56, 8), ("64+8", 64, 8))
        }
        out += [
            "",
            "At seq_len 512 (the issue's setting), by the same formula: "
            + ", ".join(f"k = {spec}: {value:.1f}" for spec, value in at_512.items())
            + " bytes/token.",
        ]
        synthetic = synthetic_cache(args, tokenizer, workdir, args.memory_blocks)
        memory = reading_memory(synthetic)
        out += [
            "",
            f"Reading: every train row of a k = 128 cache of {args.memory_blocks} blocks ({memory['cache_mib']:.1f} "
            "MiB; random values, real blocks) twice in random "
            f"order ({memory['rows_per_second']:,.0f} rows/s): RssAnon grew {memory['anon_growth_mib']:.1f} MiB, "
            f"RssFile (mapped page cache) {memory['file_growth_mib']:.1f} MiB.",
        ]
        if not args.skip_steps:
            import statistics

            times = step_times(args, teacher, tokenizer, workdir / "steps")
            med = {name: statistics.median(times[name]["wall"]) for name in times}
            cpu = {name: statistics.median(times[name]["cpu"]) for name in times}
            out += [
                "",
                f"Step time ({args.batch} × {args.seq} tokens, 4-layer student, forward KL, one AdamW step; "
                f"{args.repeats} interleaved repeats, medians):",
                "",
                "| mode | s/step | CPU s/step |",
                "| --- | ---: | ---: |",
                *(f"| `{name}` | {med[name]:.3f} | {cpu[name]:.3f} |" for name in med),
                "",
                f"recorded / student alone: {med['distily_recorded'] / med['student_ce']:.2f} (wall), "
                f"{cpu['distily_recorded'] / cpu['student_ce']:.2f} (CPU); goal ≤ 1.10. "
                f"live / recorded: {med['distily'] / med['distily_recorded']:.2f} (wall), "
                f"{cpu['distily'] / cpu['distily_recorded']:.2f} (CPU); goal ≥ 1.8.",
            ]
        if not args.skip_sweep:
            live = train_student(args, teacher, tokenizer, workdir, None)
            print(f"live: {live}", file=sys.stderr, flush=True)
            out += [
                "",
                f"Students by k ({args.steps} steps of {args.batch} × {args.seq} tokens, lr {args.learning_rate} "
                f"constant, forward KL, alpha {args.alpha}, same seed and blocks; {args.train_blocks} train blocks, "
                f"eval on {args.eval_blocks} blocks):",
                "",
                "| teacher signal | student eval ppl | vs live | train seconds |",
                "| --- | ---: | ---: | ---: |",
                f"| live, full logits | {live['student_ppl']:.3f} | | {live['s']:.0f} |",
            ]
            for k, row in caches.items():
                result = train_student(args, teacher, tokenizer, workdir, row["path"])
                print(f"k={k}: {result}", file=sys.stderr, flush=True)
                k = k.replace("+", " + ") + " samples" if "+" in k else k
                change = 100 * (result["student_ppl"] - live["student_ppl"]) / live["student_ppl"]
                out.append(f"| cache, k = {k} | {result['student_ppl']:.3f} | {change:+.2f}% | {result['s']:.0f} |")
            out += ["", f"Teacher eval ppl (recorded from full logits): {live['teacher_ppl']:.3f}."]
    out += ["", f"{time.time() - started:.0f} s in all; {bench_step.environment_line(torch.device(args.device))}."]
    text = "\n".join(out) + "\n"
    print(text)
    if args.output:
        from distily.io import write_text_atomic

        write_text_atomic(args.output, text)
    return 0 if all(math.isfinite(r["bytes_per_token"]) for r in caches.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
