"""On-policy distillation: speed and memory against TRL's GKDTrainer, and quality at equal wall time.

    python benchmarks/on_policy.py speed   [--steps 6]                      # ours vs TRL, fresh process per mode
    python benchmarks/on_policy.py quality [--seconds 90] [--settings ...]  # off/on/mixed/seq_kd/replay/warm
    python benchmarks/on_policy.py quality --settings warm_on --previous earlier.err  # add to an earlier table

Demo setting: the embedded SmolLM2-135M-Instruct teacher, a 4-layer student built from it (teacher layers
0, 10, 19, 29), python-stdlib blocks of 256 tokens, batch 4, prompts = the first 128 tokens of each block,
64 new tokens sampled at temperature 1 (top_p 1, top_k off), reverse KL (TRL: ``beta=1``, its reverse KL).

**speed**: each mode trains ``--steps`` optimizer steps in a fresh process with its trainer's own ``train()``;
the step time is the wall time between successive ``on_step_end`` events (generation included: TRL generates
inside ``training_step``, distily before the step), median over steps 2.., and the peak memory is the process's
peak resident set size (VmHWM; CUDA: max allocated) over those steps, reset after step 1. Modes: ``trl``
(``trl.experimental.gkd.GKDTrainer``, ``lmbda=1``), ``distily`` (``--lmbda 1``), ``distily_replay`` (``--lmbda 1
--replay_buffer_size 16 --replay_ratio 0.5``).

**quality**: each setting trains for ``--seconds`` of wall time (``--max_train_seconds``; learning rate 2e-3,
constant after 5 warm-up steps, so runs of different speeds follow the same schedule; ``warm_*`` settings spend
the first half off-policy with forward KL and the second half sampling), then reports the
student's eval perplexity on the eval split (32 blocks) and the teacher-judged reverse KL: the student's greedy
64-token completions of 16 held-out prompts (the first 128 tokens of eval blocks), and the mean over their tokens
of KL(student ‖ teacher) (what on-policy training optimises; lower is better).

The output is markdown on stdout (and ``--output FILE``) for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TEACHER = "smollm2-135m-instruct"
SEQ_LEN, PROMPT_LEN, NEW_TOKENS, BATCH = 256, 128, 64, 4
SPEED_MODES = ("trl", "distily", "distily_replay")
# Quality settings: the on-policy fields of each (besides --prompt_len and --max_new_tokens).
SETTINGS = {
    "off": dict(lmbda=0.0, loss="reverse_kl"),
    "off_fkl": dict(lmbda=0.0, loss="forward_kl"),
    "on": dict(lmbda=1.0, loss="reverse_kl"),
    "on_gjsd": dict(lmbda=1.0, loss="generalized_jsd", loss_kwargs={"beta": 0.5}),
    "mixed": dict(lmbda=0.5, loss="reverse_kl"),
    "seq_kd": dict(lmbda=0.0, seq_kd=True, loss="reverse_kl"),
    "on_replay": dict(lmbda=1.0, loss="reverse_kl", replay_buffer_size=16, replay_ratio=0.5),
    "on_fkl": dict(lmbda=1.0, loss="forward_kl"),
    "mixed_fkl": dict(lmbda=0.5, loss="forward_kl"),
}
# Two phases of half the wall time each on the same student (a fresh trainer and optimizer for the second, and
# another data seed so its prompts are not the first phase's blocks again): off-policy first, then sampling, as
# GKD trains a student that already imitates the teacher.
TWO_PHASE = {"warm_on_fkl": ("off_fkl", "on_fkl"), "warm_on": ("off_fkl", "on")}
OFF_POLICY = ("off", "off_fkl")
MIB = 2**20
JUDGED_PROMPTS = 16


# ----------------------------------------------------------------------------------------------------------------
# Shared setup


def setup(workdir: Path):
    """Teacher, tokenizer, 4-layer student and the python-stdlib train/eval blocks (the demo's)."""
    from distily import build_student, load_teacher
    from distily.config import DataArguments
    from distily.data import prepare_datasets

    teacher, tokenizer = load_teacher(TEACHER)
    torch.manual_seed(42)
    student = build_student(teacher, {"num_hidden_layers": 4})
    data_args = DataArguments(dataset="python-stdlib", max_eval_blocks=32)
    data = prepare_datasets(data_args, tokenizer, SEQ_LEN, seed=42)
    return teacher, tokenizer, student, data


class StepClock:
    """Wall time between successive ``on_step_end`` events (the first from ``on_train_begin``); resets the peak
    memory after the first step."""

    def __init__(self, device: torch.device):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                clock.durations.append(now - clock.last)
                clock.last = now
                if len(clock.durations) == 1:
                    clock.before = reset_peak(device)

        self.callback = Callback()
        self.durations: list[float] = []
        self.last = 0.0
        self.before = 0.0


def reset_peak(device: torch.device) -> float:
    """Reset the peak-memory counter; the memory in use now, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / MIB
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_kib("VmRSS") / 1024


def peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MIB
    return status_kib("VmHWM") / 1024


def status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def common_args(workdir: Path, **extra) -> dict:
    values = dict(
        output_dir=str(workdir / "out"),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=8,
        learning_rate=2e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=5,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
        data_seed=42,
        use_cpu=not torch.cuda.is_available(),
    )
    values.update(extra)
    return values


@contextlib.contextmanager
def warnings_silenced():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------------------------
# speed: one mode per process


class PromptCollator:
    """TRL's GKD batches: the block as input_ids/labels plus its first PROMPT_LEN tokens as ``prompts``."""

    def __call__(self, features):
        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        prompts = ids[:, :PROMPT_LEN]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.clone(),
            "prompts": prompts,
            "prompt_attention_mask": torch.ones_like(prompts),
        }


def build_speed_trainer(mode: str, workdir: Path, steps: int, clock: StepClock):
    teacher, tokenizer, student, data = setup(workdir)
    train = data.train.select(range(BATCH * (steps + 1)))
    if mode == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(
            **common_args(workdir, max_steps=steps),
            lmbda=1.0,
            beta=1.0,  # TRL's generalized JSD with beta=1 is KL(student ‖ teacher), the reverse KL
            temperature=1.0,
            max_new_tokens=NEW_TOKENS,
            max_length=SEQ_LEN,
            seq_kd=False,
            disable_dropout=True,
        )
        with warnings_silenced():
            return GKDTrainer(
                model=student,
                teacher_model=teacher,
                args=config,
                train_dataset=train,
                data_collator=PromptCollator(),
                processing_class=tokenizer,
                callbacks=[clock.callback],
            )
    from distily import DistillationConfig, DistillationTrainer

    extra = dict(replay_buffer_size=16, replay_ratio=0.5) if mode == "distily_replay" else {}
    config = DistillationConfig(
        **common_args(workdir, max_steps=steps),
        loss="reverse_kl",
        seq_len=SEQ_LEN,
        lmbda=1.0,
        prompt_len=PROMPT_LEN,
        max_new_tokens=NEW_TOKENS,
        generation_temperature=1.0,
        eval_teacher=False,
        **extra,
    )
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[clock.callback],
    )


def speed_child(mode: str, steps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = StepClock(device)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = build_speed_trainer(mode, Path(workdir), steps, clock)
        trainer.train()
    timed = clock.durations[1:]
    generation = [e.get("generation_seconds") for e in trainer.state.log_history if "generation_seconds" in e]
    return {
        "mode": mode,
        "steps": len(clock.durations),
        "median_step_s": statistics.median(timed),
        "step_s": [round(d, 3) for d in clock.durations],
        "peak_mib": peak(device),
        "before_mib": clock.before,
        "median_generation_s": statistics.median(generation[1:]) if len(generation) > 1 else None,
    }


def run_child(argv: list[str], timeout: float = 1800) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def speed_report(args) -> list[str]:
    results = {mode: run_child(["_speed", mode, "--steps", str(args.steps)]) for mode in SPEED_MODES}
    lines = [
        f"Median step time over steps 2..{args.steps} (generation included) and peak memory "
        f"({'CUDA max allocated' if torch.cuda.is_available() else 'peak RSS'}), fresh process per mode:",
        "",
        "| mode | median step (s) | generation (s/step) | peak memory (MiB) | step memory (MiB) | all steps (s) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, result in results.items():
        if "error" in result:
            lines.append(f"| {mode} | error: {result['error']} | | | | |")
            continue
        generation = result["median_generation_s"]
        lines.append(
            f"| {mode} | {result['median_step_s']:.2f} | {'' if generation is None else f'{generation:.2f}'} | "
            f"{result['peak_mib']:.0f} | {result['peak_mib'] - result['before_mib']:.0f} | {result['step_s']} |"
        )
    trl, ours = results.get("trl", {}), results.get("distily", {})
    if "median_step_s" in trl and "median_step_s" in ours:
        time_ratio = ours["median_step_s"] / trl["median_step_s"]
        memory_ratio = ours["peak_mib"] / trl["peak_mib"]
        met = time_ratio <= 0.7 and memory_ratio <= 0.6
        step_ratio = (ours["peak_mib"] - ours["before_mib"]) / max(trl["peak_mib"] - trl["before_mib"], 1e-9)
        lines += [
            "",
            f"distily / TRL: step time {time_ratio:.2f}×, peak memory {memory_ratio:.2f}× "
            f"(goal ≤ 0.7× and ≤ 0.6×: {'met' if met else 'missed'}). Step memory (peak minus what was resident "
            f"after step 1: weights, optimizer state, runtime): {step_ratio:.2f}×.",
        ]
        replay = results.get("distily_replay", {})
        if "median_step_s" in replay:
            lines.append(
                f"With replay (ratio 0.5): step time {replay['median_step_s'] / trl['median_step_s']:.2f}× TRL's."
            )
    return lines


# ----------------------------------------------------------------------------------------------------------------
# quality: one setting per process


@torch.no_grad()
def teacher_reverse_kl(student, teacher, prompts: list[list[int]], pad: int, eos: tuple[int, ...]) -> dict:
    """The student's greedy completions of ``prompts``, and the mean over their tokens of KL(student ‖ teacher)."""
    from distily.on_policy import SamplingSettings, TransformersEngine, completion_batch

    settings = SamplingSettings(NEW_TOKENS, 0.0, 1.0, eos, pad)
    engine = TransformersEngine(lambda: student, settings)
    total, tokens, lengths = 0.0, 0, []
    for start in range(0, len(prompts), 8):  # batches of 8 prompts
        part = prompts[start : start + 8]
        completions = engine.generate(part, seed=0)
        lengths += [len(c) for c in completions]
        device = next(student.parameters()).device
        batch = completion_batch(part, completions, pad, device)
        mask = batch["labels"][:, 1:] != -100
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        log_q, log_p = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float().to(s.device), -1)
        total += float((log_q.exp() * (log_q - log_p)).sum())
        tokens += int(mask.sum())
    return {"teacher_rkl": total / max(tokens, 1), "completion_length": sum(lengths) / len(lengths)}


def quality_child(setting: str, seconds: float) -> dict:
    from distily import DistillationConfig, DistillationTrainer
    from distily.on_policy import eos_token_ids

    phases = TWO_PHASE.get(setting, (setting,))
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        teacher, tokenizer, student, data = setup(workdir)
        started, steps, history = time.perf_counter(), 0, []
        for index, phase in enumerate(phases):
            config = DistillationConfig(
                **common_args(
                    workdir,
                    max_steps=10_000,
                    max_train_seconds=seconds / len(phases),
                    logging_steps=5,
                    seed=42 + index,
                    data_seed=42 + index,
                ),
                seq_len=SEQ_LEN,
                prompt_len=PROMPT_LEN,
                max_new_tokens=NEW_TOKENS,
                generation_temperature=1.0,
                eval_teacher=False,
                **SETTINGS[phase],
            )
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=config,
                train_dataset=data.train,
                eval_dataset=data.eval,
                processing_class=tokenizer,
            )
            trainer.train()
            steps += trainer.state.global_step
            history += trainer.state.log_history
        train_seconds = time.perf_counter() - started
        metrics = trainer.evaluate()
        prompts = [row[:PROMPT_LEN] for row in data.eval["input_ids"]][:JUDGED_PROMPTS]
        student.eval()
        judged = teacher_reverse_kl(
            student, teacher, prompts, tokenizer.pad_token_id or 0, eos_token_ids(student, tokenizer)
        )
    fractions = [e["on_policy_fraction"] for e in history if "on_policy_fraction" in e]
    return {
        "setting": setting,
        "steps": steps,
        "train_seconds": train_seconds,
        "eval_ppl": metrics["eval_student_ppl"],
        "on_policy_fraction": statistics.mean(fractions) if fractions else 0.0,
        **judged,
    }


def quality_report(args) -> list[str]:
    settings = args.settings.split(",")
    results = {}
    for path in args.previous or []:  # settings measured by an earlier run with the same --seconds
        for line in Path(path).read_text().splitlines():
            result = json.loads(line) if line.startswith("{") else {}
            if "setting" in result:
                results[result["setting"]] = result
    for setting in settings:  # one line per finished setting on stderr, so a cut-short run still reports
        results[setting] = run_child(
            ["_quality", setting, "--seconds", str(args.seconds)], timeout=args.seconds * 10 + 600
        )
        print(json.dumps({"setting": setting, **results[setting]}), file=sys.stderr, flush=True)
    lines = [
        f"Each setting trained for {args.seconds:.0f} s of wall time, then evaluated (eval perplexity on 32 eval "
        f"blocks; teacher-judged reverse KL on the student's greedy {NEW_TOKENS}-token completions of {JUDGED_PROMPTS} "
        f"held-out "
        f"{PROMPT_LEN}-token prompts):",
        "",
        "| setting | flags | steps | eval ppl | teacher reverse KL (nats/token) | completion length "
        "| on-policy share |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, result in results.items():
        flags = " then ".join(
            " ".join(f"--{k} {json.dumps(v) if isinstance(v, dict) else v}" for k, v in SETTINGS[phase].items())
            for phase in TWO_PHASE.get(setting, (setting,))
        )
        if "error" in result:
            lines.append(f"| {setting} | {flags} | error: {result['error']} | | | | |")
            continue
        lines.append(
            f"| {setting} | `{flags}` | {result['steps']} | {result['eval_ppl']:.4g} | {result['teacher_rkl']:.4f} | "
            f"{result['completion_length']:.1f} | {result['on_policy_fraction']:.2f} |"
        )
    candidates = {s: r for s, r in results.items() if s not in OFF_POLICY and "teacher_rkl" in r}
    for baseline in OFF_POLICY:
        off = results.get(baseline, {})
        if "teacher_rkl" not in off or not candidates:
            continue
        # The goal: ≥ 10 % lower teacher-judged reverse KL with eval perplexity ≤ 2 % worse than this baseline.
        passing = {
            s: r for s, r in candidates.items()
            if 1 - r["teacher_rkl"] / off["teacher_rkl"] >= 0.10 and r["eval_ppl"] / off["eval_ppl"] - 1 <= 0.02
        }  # fmt: skip
        best = min(passing or candidates, key=lambda s: candidates[s]["teacher_rkl"])
        rkl_gain = 1 - candidates[best]["teacher_rkl"] / off["teacher_rkl"]
        ppl_loss = candidates[best]["eval_ppl"] / off["eval_ppl"] - 1
        lines += [
            "",
            f"Against {baseline} ({' '.join(f'--{k} {v}' for k, v in SETTINGS[baseline].items())}): "
            f"{'best setting meeting both parts' if passing else 'no setting meets both parts; lowest reverse KL'}: "
            f"{best}, reverse KL {rkl_gain:+.1%} lower, eval perplexity {ppl_loss:+.1%} "
            f"(goal ≥ 10% lower and ≤ 2% worse: {'met' if passing else 'missed'}).",
        ]
    return lines


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["speed", "quality", "_speed", "_quality"])
    parser.add_argument("mode", nargs="?")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--settings", default="off,on,mixed,seq_kd,on_replay,on_gjsd")
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--previous", nargs="*", type=Path, help="quality: JSON lines (stderr) of settings measured by an earlier run"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.part == "_speed":
        print(json.dumps(speed_child(args.mode, args.steps)), flush=True)
        return
    if args.part == "_quality":
        print(json.dumps(quality_child(args.mode, args.seconds)), flush=True)
        return
    started = time.time()
    lines = speed_report(args) if args.part == "speed" else quality_report(args)
    lines += ["", f"({args.part}: {time.time() - started:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPUs)"]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
