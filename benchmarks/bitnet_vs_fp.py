"""BitNet b1.58 student vs full-precision student at equal distillation steps, on the demo setting.

Teacher: the embedded SmolLM2-135M-Instruct; students: 4 layers of the same width initialised from teacher layers
0, 10, 19, 29; corpus: python-stdlib; objective, batch and schedule: configs/demo.yaml. Learning rates are swept
per kind of student (``--fp_lrs``, ``--bitnet_lrs``, ``--latent_lrs``) with BitNet warm-ups (``--warmups``), so
each kind is compared at its best. Each variant is one ``distily.run.train`` run (the code path of the
``distily`` command). Reported per variant:

* eval perplexity after the same number of steps (``eval_student_ppl``), and its ratio to the best fp student's;
* seconds per training step: student forward + backward on the same batch, the variants interleaved, repeated,
  median (the teacher's forward is the same for every variant and left out);
* size on disk: the fp student's safetensors in float32 and float16, the packed BitNet folder in float32 and
  bfloat16 (non-ternary tensors).

    python benchmarks/bitnet_vs_fp.py --max_steps 200 --fp_lrs 5e-4 2e-3 4e-3 --bitnet_lrs 2e-3 4e-3 \
        --warmups 0 50 --out runs/bench-bitnet             # a sweep; finished variants are resumed
    python benchmarks/bitnet_vs_fp.py --report_only --out runs/bench-bitnet   # the table of every finished variant
    python benchmarks/bitnet_vs_fp.py --quick             # a 6-step smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distily.bitnet import fp16_bytes, load_bitnet_student, save_packed  # noqa: E402
from distily.config import configs_from_dict, train_kwargs  # noqa: E402
from distily.export import EXPORT_MANIFEST  # noqa: E402
from distily.run import train  # noqa: E402
from distily.run_folder import RunFolder  # noqa: E402


def variants(args) -> dict[str, dict]:
    """Student config and learning rate of each variant; the best "fp-*" variant is the baseline."""
    found = {f"fp-lr{lr:g}": {"student_config": {"num_hidden_layers": 4}, "learning_rate": lr} for lr in args.fp_lrs}
    for warmup in args.warmups:
        for lr in args.bitnet_lrs:
            for latent_lr in args.latent_lrs:
                name = f"bitnet-w{warmup}-lr{lr:g}" + (f"-latent{latent_lr:g}" if latent_lr else "")
                bitnet = {"warmup_steps": warmup, "learning_rate": latent_lr}
                found[name] = {
                    "student_config": {"num_hidden_layers": 4, "bitnet": bitnet},
                    "learning_rate": lr,
                }
    return found


def run_variant(name: str, overrides: dict, args) -> dict:
    values = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    values.update(
        output_dir=str(Path(args.out) / name),
        max_steps=args.max_steps,
        max_eval_blocks=args.eval_blocks,
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(1, args.max_steps // 10),
        warmup_steps=min(values["warmup_steps"], args.max_steps // 2),
        **overrides,
    )
    values["export"] = None  # sizes are measured below, from the saved students
    run_args = train_kwargs(configs_from_dict(values, source=f"variant {name}"))
    config, student_args = run_args["config"], run_args["student_args"]
    started = time.time()
    result = train(**run_args, command=["benchmarks/bitnet_vs_fp.py", name])
    return {
        "learning_rate": config.learning_rate,
        "student_config": student_args.student_config,
        "eval_ppl_before": result.metrics_before.get("eval_student_ppl"),
        "eval_ppl": result.metrics_after["eval_student_ppl"],
        "teacher_ppl": result.metrics_after.get("eval_teacher_ppl"),
        "train_loss": result.train_metrics.get("train_loss"),
        "wall_seconds": round(time.time() - started, 1),
        "log_step_time_median": statistics.median(
            e["step_time"] for e in result.trainer.state.log_history if "step_time" in e
        ),
    }


def run_variants(args) -> dict[str, dict]:
    """Train every variant of ``args`` not yet finished in ``--out`` (a long benchmark resumes), and their summaries."""
    results = {}
    for name, overrides in variants(args).items():
        summary = Path(args.out) / name / "bench_summary.json"
        if summary.is_file():
            results[name] = json.loads(summary.read_text())
            continue
        results[name] = run_variant(name, overrides, args)
        summary.write_text(json.dumps(results[name], indent=2))
    return results


def finished_variants(out: str) -> dict[str, dict]:
    """The summaries of every variant finished in ``out``, fp students first (``--report_only``)."""
    summaries = sorted(Path(out).glob("*/bench_summary.json"), key=lambda path: (not is_fp(path.parent.name), path))
    return {summary.parent.name: json.loads(summary.read_text()) for summary in summaries}


def is_fp(name: str) -> bool:
    return name.startswith("fp-")


def load_student(name: str, args):
    from transformers import AutoModelForCausalLM

    folder = Path(args.out) / name
    return AutoModelForCausalLM.from_pretrained(folder) if is_fp(name) else load_bitnet_student(folder)


def interleaved_step_times(names: list[str], args) -> dict[str, float]:
    """Median seconds of student forward + backward on one fixed batch, variants interleaved."""
    models = {name: load_student(name, args).train() for name in names}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (4, 256), generator=generator)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats + 1):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def sizes(name: str, args) -> dict[str, int]:
    folder = Path(args.out) / name
    if is_fp(name):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        model.to(torch.float16).save_pretrained(folder / "fp16")
        return {
            "safetensors_fp32": (folder / "model.safetensors").stat().st_size,
            "safetensors_fp16": (folder / "fp16" / "model.safetensors").stat().st_size,
            "fp16": fp16_bytes(model),
        }
    report = json.loads((RunFolder(folder).packed_dir / EXPORT_MANIFEST).read_text())
    bf16 = save_packed(load_bitnet_student(folder), folder / "packed-bf16", dtype=torch.bfloat16, overwrite=True)
    return {
        "packed_fp32": report["bytes_on_disk"],
        "packed_bf16": bf16["bytes_on_disk"],
        "fp16": report["fp16_student_bytes"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--warmups", type=int, nargs="+", default=[100], help="BitNet warm-up steps to try")
    parser.add_argument("--fp_lrs", type=float, nargs="+", default=[2e-3], help="fp student learning rates to try")
    parser.add_argument("--bitnet_lrs", type=float, nargs="+", default=[4e-3], help="BitNet learning rates to try")
    parser.add_argument(
        "--latent_lrs",
        type=lambda text: None if text == "none" else float(text),
        nargs="+",
        default=[None],
        help="bitnet.learning_rate values to try (the ternary latent weights' own rate; 'none': --learning_rate)",
    )
    parser.add_argument("--eval_blocks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-bitnet")
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="train nothing: time, size and tabulate every finished variant in --out",
    )
    parser.add_argument("--quick", action="store_true", help="6 steps, 4 eval blocks, 2 repeats: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps, args.eval_blocks, args.repeats, args.warmups = 6, 4, 2, [0, 3]
    torch.manual_seed(0)

    results = finished_variants(args.out) if args.report_only else run_variants(args)
    if not any(is_fp(name) for name in results):
        parser.error(f"No finished fp-* variant in {args.out}: run the benchmark with --fp_lrs first.")
    step_times = interleaved_step_times(list(results), args)
    for name in results:
        state = json.loads((Path(args.out) / name / "trainer_state.json").read_text())
        results[name]["steps"] = state["global_step"]
        results[name]["step_seconds"] = round(step_times[name], 4)
        results[name]["sizes"] = sizes(name, args)

    best_fp_name = min((name for name in results if is_fp(name)), key=lambda name: results[name]["eval_ppl"])
    fp = results[best_fp_name]
    print(f"\nCommand: {shlex.join(['python', *sys.argv])}")
    steps = sorted({r["steps"] for r in results.values()})
    print(f"Steps: {steps}; teacher eval ppl {fp['teacher_ppl']:.2f}; baseline: {best_fp_name}\n")
    print("| variant | lr | eval ppl | vs best fp | step s (fwd+bwd) | vs fp | on disk | vs fp16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        disk = r["sizes"].get("packed_bf16", r["sizes"].get("safetensors_fp16"))
        label = "fp16 safetensors" if is_fp(name) else "packed, bf16 rest"
        print(
            f"| {name} | {r['learning_rate']:g} | {r['eval_ppl']:.2f} | {r['eval_ppl'] / fp['eval_ppl']:.3f} | "
            f"{r['step_seconds']:.3f} | {r['step_seconds'] / fp['step_seconds']:.2f} | "
            f"{disk / 2**20:.1f} MiB ({label}) | {disk / fp['sizes']['safetensors_fp16']:.3f} |"
        )
    (Path(args.out) / "bench_results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
