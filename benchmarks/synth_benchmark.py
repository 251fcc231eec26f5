"""Does synthetic data from the teacher help the student? Equal steps, same student init, same eval sets.

Conditions (each trains the same 4-layer student, initialised from teacher layers 0, 10, 19, 29, for the same
number of steps with the same optimiser settings and seed):

* ``stdlib-kd``  logit KD (forward KL, alpha 1) on python-stdlib train blocks -- the demo's recipe;
* ``synth-ce``   sequence-level KD: plain cross-entropy (alpha 0) on the teacher's samples, prompts masked;
* ``synth-kd``   logit KD (alpha 1) on the same samples (completion positions only);
* ``mix-kd``     logit KD on an even mix of python-stdlib blocks and synthetic blocks.

Every condition is evaluated on the python-stdlib eval split (the demo's fixed 32 blocks) and on the eval split
of the synthetic folder (10% of the prompts, completion tokens only), all with the same blocks. Train each
condition, then evaluate every saved student (and the untrained start) and print the table:

    python benchmarks/synth_benchmark.py --synth runs/synth-demo --condition stdlib-kd   # ... each condition
    python benchmarks/synth_benchmark.py --synth runs/synth-demo --evaluate --report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONDITIONS = ("stdlib-kd", "synth-ce", "synth-kd", "mix-kd")
# A tenth of the synthetic prompts (by prompt-id hash) are held out: about 50 samples for a 500-sample folder.
SYNTH_EVAL_FRACTION = 0.1


def with_labels(blocks):
    """Plain blocks get ``labels = input_ids`` so they can be concatenated with masked synthetic blocks."""
    return blocks.map(lambda row: {"labels": row["input_ids"]}, desc="Adding labels")


def run(args) -> dict:
    import torch
    from datasets import concatenate_datasets

    import distily
    from distily.data import prepare_datasets

    teacher, tokenizer = distily.load_teacher("smollm2-135m-instruct")
    cache = args.cache_dir
    stdlib = prepare_datasets(
        distily.DataArguments(dataset="python-stdlib", max_eval_blocks=32, dataset_cache_dir=cache),
        tokenizer,
        args.seq_len,
    )
    synth = prepare_datasets(
        distily.DataArguments(dataset=args.synth, eval_fraction=SYNTH_EVAL_FRACTION, dataset_cache_dir=cache),
        tokenizer,
        args.seq_len,
    )
    need = args.steps * args.batch_size
    if args.condition == "stdlib-kd":
        train, alpha = stdlib.train, 1.0
    elif args.condition == "synth-ce":
        train, alpha = synth.train, 0.0
    elif args.condition == "synth-kd":
        train, alpha = synth.train, 1.0
    else:
        half = min(len(synth.train), need // 2)
        code = with_labels(stdlib.train.shuffle(seed=0).select(range(max(half, need - half)))).cast(
            synth.train.features
        )
        train, alpha = concatenate_datasets([code, synth.train.select(range(half))]).shuffle(seed=0), 1.0
    torch.manual_seed(args.seed)
    student = distily.build_student(teacher, {"num_hidden_layers": 4})
    config = distily.DistillationConfig(
        output_dir=str(Path(args.output) / args.condition),
        loss="forward_kl",
        alpha=alpha,
        temperature=1.0,
        seq_len=args.seq_len,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        learning_rate=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
    )
    trainer = distily.DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=train, processing_class=tokenizer
    )
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    trainer.save_model()
    result = {
        "condition": args.condition,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "alpha": alpha,
        "train_blocks_available": len(train),
        "train_seconds": round(seconds, 1),
    }
    path = Path(args.output) / f"{args.condition}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def evaluate(args) -> None:
    """Every trained student (and the untrained start) on both eval sets, with the same blocks for all."""
    import torch
    from transformers import AutoModelForCausalLM

    import distily
    from distily.data import prepare_datasets

    teacher, tokenizer = distily.load_teacher("smollm2-135m-instruct")
    data = {
        "stdlib": distily.DataArguments(dataset="python-stdlib", max_eval_blocks=32, dataset_cache_dir=args.cache_dir),
        "synth": distily.DataArguments(
            dataset=args.synth, eval_fraction=SYNTH_EVAL_FRACTION, dataset_cache_dir=args.cache_dir
        ),
    }
    sets = {name: prepare_datasets(data_args, tokenizer, args.seq_len).eval for name, data_args in data.items()}
    torch.manual_seed(args.seed)
    models = {"(start)": distily.build_student(teacher, {"num_hidden_layers": 4})}
    for condition in CONDITIONS:
        folder = Path(args.output) / condition
        if (folder / "model.safetensors").is_file():
            models[condition] = AutoModelForCausalLM.from_pretrained(folder)
    table = {}
    for name, model in models.items():
        config = distily.DistillationConfig(
            output_dir=str(Path(args.output) / "eval"), alpha=0.0, seq_len=args.seq_len, per_device_eval_batch_size=8,
            report_to="none", use_cpu=True, disable_tqdm=True, eval_teacher=name == "(start)",
        )  # fmt: skip
        trainer = distily.DistillationTrainer(
            model=model, teacher_model=teacher, args=config, processing_class=tokenizer
        )
        row = {}
        for key, blocks in sets.items():
            metrics = trainer.evaluate(eval_dataset=blocks, metric_key_prefix=key)
            row[key] = metrics[f"{key}_student_ppl"]
            row[f"{key}_tokens"] = metrics[f"{key}_tokens"]
            if name == "(start)":
                table.setdefault("(teacher)", {})[key] = metrics[f"{key}_teacher_ppl"]
        table[name] = row
    (Path(args.output) / "eval.json").write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(table, indent=2))


def report(args) -> None:
    manifest = json.loads((Path(args.synth) / "synth_manifest.json").read_text())
    sessions = manifest["sessions"]
    samples = sum(s["samples"] + s["rejected"] for s in sessions)
    seconds = sum(s["seconds"] for s in sessions)
    print(
        f"synthetic data: {manifest['counts']['samples']} samples ({manifest['counts']['rejected']} rejected), "
        f"{manifest['usage']['completion_tokens']} completion tokens, {samples / seconds:.3f} samples/s "
        f"({manifest['usage']['completion_tokens'] / seconds:.1f} completion tokens/s) over {len(sessions)} session(s)"
    )
    table = json.loads((Path(args.output) / "eval.json").read_text())
    print(f"{'condition':<12}{'stdlib ppl':>12}{'synth ppl':>12}{'train s':>10}")
    for name, row in table.items():
        path = Path(args.output) / f"{name}.json"
        seconds = json.loads(path.read_text())["train_seconds"] if path.is_file() else float("nan")
        print(f"{name:<12}{row['stdlib']:>12.2f}{row['synth']:>12.2f}{seconds:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synth", default="runs/synth-demo", help="a distily synth folder")
    parser.add_argument("--condition", choices=CONDITIONS)
    parser.add_argument("--evaluate", action="store_true", help="evaluate every trained student on both sets")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default="runs/synth-bench")
    parser.add_argument("--cache_dir", default=None)
    args = parser.parse_args()
    if args.condition:
        run(args)
    if args.evaluate:
        evaluate(args)
    if args.report:
        report(args)
    if not (args.condition or args.evaluate or args.report):
        parser.error("pass --condition NAME, --evaluate or --report")


if __name__ == "__main__":
    main()
