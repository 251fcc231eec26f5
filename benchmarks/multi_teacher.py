"""Several teachers: the mixture of two teachers vs each teacher alone, eval perplexity at equal steps.

Teacher A: the embedded SmolLM2-135M-Instruct. Teacher B is made here: teacher A adapted to the corpus, its top
``--adapt_layers`` decoder layers and final norm fine-tuned (next-token cross-entropy, AdamW) for ``--adapt_steps``
steps on the python-stdlib train split, then saved as a local folder (weights float32, with A's tokenizer). The
embeddings (tied to the head) and the other layers stay A's.

Students: one 4-layer student of A's width initialised from A's layers 0, 10, 19, 29, saved once and used as the
pretrained ``--student`` of every run, so all runs start from the same weights. Three runs, each one
``distily.run.train`` (the code path of the ``distily`` command) on the demo setting (configs/demo.yaml: seq_len
256, batch 4, forward KL at T = 1, lr 2e-3 cosine) for ``--max_steps`` steps: A alone, B alone, and the equal-weight
mixture of A and B (``--teacher A --teacher B``). Reported: each run's student eval perplexity after training, the
teachers' eval perplexities, seconds per step.

    python benchmarks/multi_teacher.py --out runs/bench-multi-teacher              # the benchmark
    python benchmarks/multi_teacher.py --out /tmp/mt --quick                       # a smoke run (2 + 2 steps)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distily.config import DataArguments, configs_from_dict, train_kwargs  # noqa: E402
from distily.data import BlockCollator, prepare_datasets  # noqa: E402
from distily.io import write_json_atomic  # noqa: E402
from distily.run import train  # noqa: E402
from distily.students import build_student  # noqa: E402
from distily.teacher.loading import load_teacher  # noqa: E402

TEACHER_A = "smollm2-135m-instruct"


def eval_ppl(model, blocks, collator, batch_size=8) -> float:
    """exp(mean next-token cross-entropy) over ``blocks``."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = collator([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            total, count = total + float(loss), count + int((labels != -100).sum())
    return math.exp(total / count)


def make_teacher_b(args, teacher, tokenizer, folder: Path) -> dict:
    """Teacher A adapted to the train split (see the module docstring); saved to ``folder``."""
    from tqdm import tqdm

    manifest_path = folder / "made_by.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data = prepare_datasets(
        DataArguments(dataset=demo["dataset"], max_eval_blocks=args.eval_blocks), tokenizer, demo["seq_len"], seed=7
    )
    collator = BlockCollator(tokenizer.pad_token_id)
    model = teacher
    ppl_before = eval_ppl(model, data.eval, collator)
    model.requires_grad_(False)
    layers = model.model.layers[-args.adapt_layers :]
    trained = [*layers.parameters(), *model.model.norm.parameters()]
    for param in trained:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=args.adapt_lr, weight_decay=0.0)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(7)).tolist()
    model.train()
    started = time.time()
    losses = []
    for step in tqdm(range(args.adapt_steps), desc="Adapting teacher B"):
        rows = [order[(step * 4 + i) % len(order)] for i in range(4)]
        batch = collator([data.train[r] for r in rows])
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.time() - started
    model.requires_grad_(False)
    ppl_after = eval_ppl(model, data.eval, collator)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    made = {
        "from": TEACHER_A,
        "how": f"top {args.adapt_layers} decoder layers and the final norm fine-tuned (cross-entropy, AdamW lr "
        f"{args.adapt_lr:g}, batch 4 x {demo['seq_len']} tokens) for {args.adapt_steps} steps on the python-stdlib "
        "train split; embeddings/head and the other layers unchanged",
        "train_loss_first_last": [losses[0], losses[-1]],
        "eval_ppl_before": ppl_before,
        "eval_ppl_after": ppl_after,
        "eval_blocks": len(data.eval),
        "seconds": round(seconds, 1),
    }
    write_json_atomic(tmp / "made_by.json", made)
    tmp.rename(folder)
    return made


def run(name: str, teacher: dict, student: Path, args, loaded=None) -> dict:
    values = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    values.update(
        output_dir=str(Path(args.out) / name),
        student=str(student),
        student_config=None,
        max_steps=args.max_steps,
        max_train_seconds=None,
        max_eval_blocks=args.eval_blocks,
        warmup_steps=min(values["warmup_steps"], args.max_steps // 3),
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(1, args.max_steps // 5),
        export=None,
        teacher_dtype="float32",
        **teacher,
    )
    run_args = train_kwargs(configs_from_dict(values, source=f"run {name}"))
    started = time.time()
    result = train(**run_args, command=["benchmarks/multi_teacher.py", name], loaded_teacher=loaded)
    wall = time.time() - started
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    step_times = [entry["step_time"] for entry in state["log_history"] if "step_time" in entry]
    return {
        "teacher": teacher,
        "eval_student_ppl_before": result.metrics_before.get("eval_student_ppl"),
        "eval_student_ppl": result.metrics_after["eval_student_ppl"],
        "eval_teacher_ppl": result.metrics_after.get("eval_teacher_ppl"),
        "steps": result.trainer.state.global_step,
        "seconds_per_step": round(sum(step_times) / len(step_times), 2) if step_times else None,
        "wall_seconds": round(wall, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-multi-teacher")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--eval_blocks", type=int, default=16)
    parser.add_argument("--adapt_steps", type=int, default=12)
    parser.add_argument("--adapt_layers", type=int, default=4)
    parser.add_argument("--adapt_lr", type=float, default=5e-4)
    parser.add_argument("--quick", action="store_true", help="2 adaptation steps, 2 training steps, 4 eval blocks")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps, args.eval_blocks, args.adapt_steps = 2, 4, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    teacher_a, tokenizer = load_teacher(TEACHER_A, dtype="float32")
    student_dir = out / "student-init"
    if not student_dir.is_dir():
        torch.manual_seed(42)
        student = build_student(teacher_a, {"num_hidden_layers": 4})
        student.save_pretrained(student_dir)
        tokenizer.save_pretrained(student_dir)
    teacher_b_dir = out / "teacher-b"
    # A plain copy of A (all 30 layers, every weight copied; no GGUF quantisation attributes, so it can be saved).
    copy_of_a = build_student(teacher_a, {}, init="teacher")
    assert all(torch.equal(t, copy_of_a.state_dict()[k]) for k, t in teacher_a.state_dict().items())
    made = make_teacher_b(args, copy_of_a, tokenizer, teacher_b_dir)
    print("Teacher B:", json.dumps(made), flush=True)
    results = {"teacher_b": made, "settings": vars(args), "runs": {}}
    results["runs"]["A alone"] = run("a-alone", {"teacher": TEACHER_A}, student_dir, args, (teacher_a, tokenizer))
    del teacher_a
    results["runs"]["B alone"] = run("b-alone", {"teacher": str(teacher_b_dir)}, student_dir, args)
    results["runs"]["A+B mixture"] = run("mixture", {"teachers": [TEACHER_A, str(teacher_b_dir)]}, student_dir, args)
    write_json_atomic(out / "results.json", results)
    print(f"\n{'run':<14}{'student ppl before':>20}{'after':>12}{'teacher ppl':>13}{'s/step':>8}")
    for name, row in results["runs"].items():
        print(
            f"{name:<14}{row['eval_student_ppl_before']:>20.5g}{row['eval_student_ppl']:>12.5g}"
            f"{row['eval_teacher_ppl'] or float('nan'):>13.4f}{row['seconds_per_step'] or float('nan'):>8}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
