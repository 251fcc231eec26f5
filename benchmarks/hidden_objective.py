"""Logits-only vs logits + hidden states vs hidden states only, on the demo setting, at equal steps.

    python benchmarks/hidden_objective.py                      # small default (~10-15 min on a shared 2-core CPU)
    python benchmarks/hidden_objective.py --steps 300 --seq_len 256 --eval_blocks 64   # closer to the demo

Each variant is one ``distily.run.train`` run from the same 4-layer student (built from the embedded
SmolLM2-135M-Instruct teacher, layer subset), on python-stdlib, with the same seed, data order, steps and
learning rate; only ``--objective`` differs:

* ``logits``        the default objective: forward KL on the logits;
* ``logits_hidden`` forward KL + ``hidden_weight`` × the hidden-state term (``--mapper``, ``--projector``,
                    ``--feature_loss``, ``--norm``);
* ``hidden``        the hidden-state term alone (logits weight 0).

Reported per variant: the student's eval perplexity before and after training (the teacher's for
reference), the median logged training step time, and the forward + backward time of one step measured
side by side afterwards (the variants interleaved, ``--timing_repeats`` rounds, medians of wall and CPU
seconds: on a shared machine CPU time is the steadier). The output is markdown for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's distily, not another installed copy

import torch  # noqa: E402

VARIANTS = ("logits", "logits_hidden", "hidden")


def objective_of(variant: str, args) -> dict:
    hidden = {
        "weight": args.hidden_weight,
        "layer_mapper": args.mapper,
        "projector": args.projector,
        "loss": args.feature_loss,
        "norm": args.norm,
    }
    if variant == "logits":
        return {"logits": {"weight": 1.0}}
    if variant == "logits_hidden":
        return {"logits": {"weight": 1.0}, "hidden_states": hidden}
    if variant == "hidden":
        return {"logits": {"weight": 0.0}, "hidden_states": {**hidden, "weight": 1.0}}
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def run_variant(variant: str, args, loaded_teacher, workdir: Path):
    from distily.config import DataArguments, DistillationConfig, StudentArguments, TeacherArguments
    from distily.run import train

    config = DistillationConfig(
        output_dir=str(workdir / variant),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch * 2,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        seq_len=args.seq_len,
        logging_steps=max(1, args.steps // 10),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
        seed=42,
        objective=objective_of(variant, args),
    )
    started = time.perf_counter()
    result = train(
        TeacherArguments(teacher=args.teacher),
        StudentArguments(student_config={"num_hidden_layers": args.student_layers}),
        DataArguments(dataset="python-stdlib", max_eval_blocks=args.eval_blocks),
        config,
        loaded_teacher=loaded_teacher,
    )
    step_times = [entry["step_time"] for entry in result.trainer.state.log_history if "step_time" in entry]
    return result, {
        "ppl_before": result.metrics_before.get("eval_student_ppl"),
        "ppl_after": result.metrics_after.get("eval_student_ppl"),
        "teacher_ppl": result.metrics_after.get("eval_teacher_ppl"),
        "step_time": statistics.median(step_times[1:] or step_times) if step_times else None,
        "run_seconds": time.perf_counter() - started,
    }


def time_side_by_side(trainers: dict, batch: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Forward + backward of one batch per variant, interleaved (order rotated each round), medians."""
    walls: dict[str, list[float]] = {name: [] for name in trainers}
    cpus: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    for round_index in range(repeats + 1):  # round 0 warms up
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            trainer = trainers[name]
            trainer.model.train()
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=tokens)
            loss.backward()
            elapsed_wall, elapsed_cpu = time.perf_counter() - wall, time.process_time() - cpu
            trainer.model.zero_grad(set_to_none=True)
            if trainer.intermediate is not None:
                trainer.intermediate.zero_grad(set_to_none=True)
            if round_index:
                walls[name].append(elapsed_wall)
                cpus[name].append(elapsed_cpu)
    return {name: {"wall": statistics.median(walls[name]), "cpu": statistics.median(cpus[name])} for name in names}


def fmt(value, digits=2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--student_layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval_blocks", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--hidden_weight", type=float, default=1.0)
    parser.add_argument("--mapper", default="uniform_last")
    parser.add_argument("--projector", default="linear")
    parser.add_argument("--feature_loss", default="mse")
    parser.add_argument("--norm", default="layer_norm")
    parser.add_argument("--timing_repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="Also write the markdown to this file.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distily.config import DistillationConfig, TeacherArguments
    from distily.run import load_run_teacher

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in variants:
        objective_of(variant, args)  # unknown names fail before anything runs
    teacher_args = TeacherArguments(teacher=args.teacher)
    loaded = load_run_teacher(
        teacher_args, DistillationConfig(output_dir="unused", use_cpu=args.device == "cpu", report_to="none")
    )
    rows, trainers = {}, {}
    with tempfile.TemporaryDirectory(prefix="distily-hidden-bench-") as tmp:
        for variant in variants:
            print(f"== {variant}: {objective_of(variant, args)}", file=sys.stderr, flush=True)
            result, rows[variant] = run_variant(variant, args, loaded, Path(tmp))
            trainers[variant] = result.trainer
        from bench_step import make_batch, stdlib_batch

        batch = make_batch(stdlib_batch(loaded[1], args.batch, args.seq_len), torch.device(args.device))
        timing = time_side_by_side(trainers, batch, args.timing_repeats)

    command = shlex.join(["python", "benchmarks/hidden_objective.py", *(argv if argv is not None else sys.argv[1:])])
    hidden = f"{args.mapper}, {args.projector}, {args.feature_loss}, norm {args.norm}"
    lines = [
        f"Command: `{command}`",
        "",
        f"Setting: {args.teacher} teacher, {args.student_layers}-layer student (layer subset), python-stdlib, "
        f"{args.steps} steps of {args.batch}×{args.seq_len} tokens, lr {args.lr} (cosine), seed 42, eval on "
        f"{args.eval_blocks} blocks. Hidden-state term: {hidden}; weight {args.hidden_weight} beside the logits.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; load average "
        f"{os.getloadavg()[0]:.1f} at the end.",
        "",
        "| variant | eval ppl before | eval ppl after | train step (median, s) | fwd+bwd side by side wall / CPU (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant in variants:
        row, t = rows[variant], timing[variant]
        lines.append(
            f"| {variant} | {fmt(row['ppl_before'])} | {fmt(row['ppl_after'])} | {fmt(row['step_time'], 3)} | "
            f"{fmt(t['wall'], 3)} / {fmt(t['cpu'], 3)} |"
        )
    teacher_ppl = next((row["teacher_ppl"] for row in rows.values() if row["teacher_ppl"]), None)
    lines += ["", f"Teacher eval perplexity: {fmt(teacher_ppl)}."]
    base = timing.get("logits")
    if base:
        ratios = ", ".join(f"{v} {timing[v]['cpu'] / base['cpu']:.2f}×" for v in variants if v != "logits")
        lines.append(f"Step CPU time relative to logits-only (side by side): {ratios}.")
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
