"""One distillation training step, side by side: the floor, distily, TRL, a recorded teacher, the student alone.

    python benchmarks/bench_step.py            # the full benchmark (CPU: ~15 min), markdown on stdout
    python benchmarks/bench_step.py --quick    # a smoke run: fewer repeats, a smaller scaling table

Modes, each one optimizer step on the same student, teacher and batch (forward KL, T = 1, alpha = 1):

* ``floor``            the teacher's forward pass + the student's plain cross-entropy training step: what any
                       distillation step costs at least (it needs both forward passes and a backward pass);
* ``distily``          distily's live-teacher KD step with its defaults (the chunked loss path);
* ``distily_plain``    the same with ``--chunked_loss false`` (full logits for the whole batch);
* ``trl``              TRL's off-policy KD on a fixed batch: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0``
                       (never generates) and ``beta=0`` (its generalised JSD is then forward KL);
* ``distily_recorded`` distily with a recorded teacher (``--teacher_cache``, top-k 64 + tail): the batch's
                       blocks are recorded first (python-stdlib blocks as training packs them; a batch of the
                       same shape as the other modes', other tokens), then each step reads them from the cache;
* ``student_ce``       the student alone, plain cross-entropy (``alpha=0``, no teacher): what a recorded
                       teacher's step is compared with.

Step time is measured in one process, the modes interleaved and repeated, medians reported (wall and CPU
seconds: on a shared machine the CPU time is the steadier of the two). Peak memory is measured per mode in a
fresh subprocess, after a warm-up step: on CPU the peak resident set size (VmHWM, reset after loading), on
CUDA ``torch.cuda.max_memory_allocated``; "step" memory is that peak minus what was resident before the step
(the weights, optimizer state and runtime that every mode holds alike). The scaling table repeats the memory
measurement on random tiny models with a 32k/64k/128k vocabulary and 512/2048-token sequences.

The output is markdown for ``benchmarks/RESULTS.md``; ``--output FILE`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MODES = ("floor", "distily", "distily_plain", "trl", "distily_recorded", "student_ce")
SCALING_MODES = ("distily", "distily_plain", "trl")
NOT_BUILT = "n/a (not built)"
RECORDED_TOP_K = 64
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------------
# Models and data


@dataclass
class Setup:
    teacher: torch.nn.Module
    tokenizer: object
    batch: dict[str, torch.Tensor]
    device: torch.device
    student_layers: int
    bf16: bool
    workdir: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stdlib_batch(tokenizer, batch: int, seq: int) -> torch.Tensor:
    """``batch`` blocks of ``seq`` tokens from the Python standard library's source (files in sorted order)."""
    from distily.data import list_text_files, python_stdlib_root

    needed = batch * seq
    stream: list[int] = []
    for path in list_text_files(python_stdlib_root(), (".py",)):
        stream.extend(tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"])
        if len(stream) >= needed:
            break
    return torch.tensor(stream[:needed]).reshape(batch, seq)


def make_batch(ids: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def load_setup(args, workdir: Path) -> Setup:
    from distily import load_teacher

    device = resolve_device(args.device)
    teacher, tokenizer = load_teacher(args.teacher, dtype=args.teacher_dtype, device=device)
    ids = stdlib_batch(tokenizer, args.batch, args.seq)
    return Setup(teacher, tokenizer, make_batch(ids, device), device, args.student_layers, args.bf16, workdir)


def random_setup(vocab: int, seq: int, args, workdir: Path) -> Setup:
    """Random tiny Llama teacher (4 layers, width 256) with a ``vocab``-token vocabulary, a batch of one sequence."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distily.teacher.loading import freeze

    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    teacher = freeze(LlamaForCausalLM(config).to(device))
    ids = torch.randint(1, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    return Setup(teacher, _pad_only_tokenizer(), make_batch(ids, device), device, 2, args.bf16, workdir)


def _pad_only_tokenizer():
    """A two-token tokenizer: the trainers only read its pad token, the data is already token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


def new_student(setup: Setup):
    from distily import build_student

    torch.manual_seed(0)
    return build_student(setup.teacher, {"num_hidden_layers": setup.student_layers}).to(setup.device)


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step per mode


class Stepper:
    """One training step of one mode: ``compute_loss`` (the trainer's public hook), backward, optimizer step."""

    def __init__(self, trainer, model, batch, bf16: bool):
        self.trainer, self.model, self.batch, self.bf16 = trainer, model, batch, bf16
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        self.tokens = int((batch["labels"][:, 1:] != -100).sum())

    def __call__(self) -> float:
        self.model.train()
        autocast = (
            torch.autocast(self.batch["input_ids"].device.type, dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        with autocast:
            loss = self.trainer.compute_loss(self.model, self.batch, num_items_in_batch=self.tokens)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _training_args(cls, setup: Setup, **extra):
    values = dict(
        output_dir=str(setup.workdir / "out"),
        report_to="none",
        use_cpu=setup.device.type == "cpu",
        per_device_train_batch_size=setup.batch["input_ids"].shape[0],
        bf16=False,  # mixed precision is applied by the Stepper, the same way for every mode
        fp16=False,
        disable_tqdm=True,
        save_strategy="no",
    )
    values.update(extra)
    return cls(**values)


def floor_mode(setup: Setup, student) -> Stepper:
    from transformers import Trainer, TrainingArguments

    teacher = setup.teacher

    class FloorTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.inference_mode():
                teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            return model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                labels=inputs["labels"],
                use_cache=False,
                num_items_in_batch=num_items_in_batch,
            ).loss

    trainer = FloorTrainer(model=student, args=_training_args(TrainingArguments, setup))
    return Stepper(trainer, student, setup.batch, setup.bf16)


def distily_mode(setup: Setup, student, chunked: str = "auto") -> Stepper:
    from distily import DistillationConfig, DistillationTrainer

    seq = setup.batch["input_ids"].shape[1]
    config = _training_args(DistillationConfig, setup, seq_len=seq, loss="forward_kl", chunked_loss=chunked)
    trainer = DistillationTrainer(
        model=student, teacher_model=setup.teacher, args=config, processing_class=setup.tokenizer
    )
    if chunked == "auto" and not trainer.chunked:
        raise RuntimeError("distily fell back to full logits on this pair; the benchmark expects the chunked path.")
    return Stepper(trainer, student, setup.batch, setup.bf16)


def student_ce_mode(setup: Setup, student) -> Stepper:
    from distily import DistillationConfig, DistillationTrainer

    seq = setup.batch["input_ids"].shape[1]
    config = _training_args(DistillationConfig, setup, seq_len=seq, alpha=0.0)
    trainer = DistillationTrainer(model=student, args=config, processing_class=setup.tokenizer)
    return Stepper(trainer, student, setup.batch, setup.bf16)


def recorded_mode(setup: Setup, student, top_k: int = RECORDED_TOP_K) -> Stepper:
    """distily on a recorded teacher: records ``batch`` python-stdlib blocks (once per work folder), then trains."""
    from distily import DistillationConfig, DistillationTrainer
    from distily.config import DataArguments, TeacherArguments
    from distily.data import BlockCollator, prepare_datasets
    from distily.teacher.recorded import RecordConfig, record

    rows, seq = setup.batch["input_ids"].shape
    cache = setup.workdir / f"cache-k{top_k}"
    data_args = DataArguments(dataset="python-stdlib", max_train_blocks=rows, max_eval_blocks=1)
    config = RecordConfig(
        output=str(cache), top_k=top_k, seq_len=seq, batch_size=rows, device=str(setup.device), rows_per_shard=rows
    )
    teacher_args = TeacherArguments(teacher=setup.teacher.name_or_path)
    record(teacher_args, data_args, config, teacher=setup.teacher, tokenizer=setup.tokenizer, progress=False)
    blocks = prepare_datasets(data_args, setup.tokenizer, seq, block_index=True).train
    batch = BlockCollator(setup.tokenizer.pad_token_id)([blocks[i] for i in range(rows)])
    batch = {name: value.to(setup.device) for name, value in batch.items()}
    args = _training_args(DistillationConfig, setup, seq_len=seq, loss="forward_kl", teacher_cache=str(cache))
    trainer = DistillationTrainer(model=student, args=args, processing_class=setup.tokenizer)
    return Stepper(trainer, student, batch, setup.bf16)


def trl_mode(setup: Setup, student) -> Stepper:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distily.data import BlockCollator

    seq = setup.batch["input_ids"].shape[1]
    config = _training_args(
        GKDConfig, setup, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, max_length=seq, disable_dropout=True
    )
    with warnings_silenced():
        trainer = GKDTrainer(
            model=student,
            teacher_model=setup.teacher,
            args=config,
            train_dataset=Dataset.from_dict({"input_ids": setup.batch["input_ids"].cpu().tolist()}),
            data_collator=BlockCollator(0),
            processing_class=setup.tokenizer,
        )
    return Stepper(trainer, student, setup.batch, setup.bf16)


@contextlib.contextmanager
def warnings_silenced():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def build_mode(name: str, setup: Setup) -> Stepper | None:
    """The stepper of mode ``name``, or None for a mode that does not exist yet."""
    student = new_student(setup)
    if name == "distily_recorded":
        return recorded_mode(setup, student)
    if name == "student_ce":
        return student_ce_mode(setup, student)
    if name == "floor":
        return floor_mode(setup, student)
    if name == "distily":
        return distily_mode(setup, student)
    if name == "distily_plain":
        return distily_mode(setup, student, chunked="false")
    if name == "trl":
        return trl_mode(setup, student)
    raise ValueError(f"Unknown mode {name!r}; known: {', '.join(MODES)}.")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# Step time: one process, interleaved


def time_modes(setup: Setup, modes: list[str], repeats: int, warmup: int) -> dict[str, dict]:
    steppers = {name: build_mode(name, setup) for name in modes}
    results: dict[str, dict] = {name: {"wall": [], "cpu": [], "loss": None} for name in modes}
    live = [name for name in modes if steppers[name] is not None]
    for _ in range(warmup):
        for name in live:
            steppers[name]()
    for repeat in range(repeats):
        # Rotate the order each round, so no mode always runs right after the same neighbour.
        order = live[repeat % len(live) :] + live[: repeat % len(live)] if live else []
        for name in order:
            gc.collect()
            synchronize(setup.device)
            wall, cpu = time.perf_counter(), time.process_time()
            results[name]["loss"] = steppers[name]()
            synchronize(setup.device)
            results[name]["wall"].append(time.perf_counter() - wall)
            results[name]["cpu"].append(time.process_time() - cpu)
    for name in modes:
        results[name]["built"] = steppers[name] is not None
    return results


def time_eval(setup: Setup, repeats: int) -> dict[str, list[float]]:
    """Seconds per eval batch (twice the training batch, as the demo evaluates), distily chunked vs plain."""
    from distily import DistillationConfig, DistillationTrainer

    ids = torch.cat([setup.batch["input_ids"], setup.batch["input_ids"].flip(0)])
    batch = make_batch(ids, setup.device)
    student = new_student(setup).eval()
    trainers = {}
    for name, chunked in (("distily", "auto"), ("distily_plain", "false")):
        config = _training_args(DistillationConfig, setup, seq_len=ids.shape[1], chunked_loss=chunked)
        trainers[name] = DistillationTrainer(model=student, teacher_model=setup.teacher, args=config)
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for repeat in range(repeats + 1):
        for name, trainer in trainers.items():
            gc.collect()
            synchronize(setup.device)
            start = time.perf_counter()
            with torch.no_grad():
                trainer.compute_loss(student, batch)
            synchronize(setup.device)
            if repeat:  # the first round is a warm-up
                seconds[name].append(time.perf_counter() - start)
    return seconds


# ----------------------------------------------------------------------------------------------------------------
# Peak memory: a fresh process per mode


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_of_one_step(setup: Setup, mode: str) -> dict:
    """Peak memory of one step of ``mode`` (after one warm-up step that allocates the optimizer state)."""
    stepper = build_mode(mode, setup)
    if stepper is None:
        return {"built": False}
    stepper()
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        before = torch.cuda.memory_allocated(setup.device)
        stepper()
        torch.cuda.synchronize(setup.device)
        peak = torch.cuda.max_memory_allocated(setup.device)
        return {"built": True, "peak_mib": peak / MIB, "step_mib": (peak - before) / MIB, "kind": "cuda allocated"}
    if not _reset_peak_rss():
        raise RuntimeError("Cannot reset the peak RSS (/proc/self/clear_refs): peak memory needs Linux.")
    before = _read_status_kib("VmRSS")
    stepper()
    peak = _read_status_kib("VmHWM")
    return {"built": True, "peak_mib": peak / 1024, "step_mib": (peak - before) / 1024, "kind": "peak RSS"}


def run_child(argv: list[str], timeout: float = 1800) -> dict:
    """Run this script with ``argv`` in a fresh process; its last stdout line is a JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"built": True, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(args) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        if args.child_vocab:
            setup = random_setup(args.child_vocab, args.child_seq, args, Path(workdir))
        else:
            setup = load_setup(args, Path(workdir))
        print(json.dumps(memory_of_one_step(setup, args.child_mode)), flush=True)


def child_flags(args) -> list[str]:
    flags = ["--teacher", args.teacher, "--teacher_dtype", args.teacher_dtype, "--device", args.device]
    flags += ["--batch", str(args.batch), "--seq", str(args.seq), "--student_layers", str(args.student_layers)]
    flags += ["--threads", str(args.threads)] if args.threads else []
    return [*flags, "--bf16"] if args.bf16 else flags


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


def environment_line(device: torch.device) -> str:
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
        )
    import transformers
    import trl

    return (
        f"{hardware}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )


def step_table(args, times: dict[str, dict], memory: dict[str, dict]) -> list[str]:
    tokens = args.batch * args.seq
    lines = [
        "| mode | median s/step | tokens/s | median CPU s/step | peak memory (MiB) | step memory (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in args.modes:
        if not times[name]["built"]:
            lines.append(f"| `{name}` | {NOT_BUILT} | | | | |")
            continue
        wall = statistics.median(times[name]["wall"])
        cpu = statistics.median(times[name]["cpu"])
        mem = memory.get(name, {})
        lines.append(
            f"| `{name}` | {wall:.3f} | {tokens / wall:,.0f} | {cpu:.3f} | {_fmt(mem.get('peak_mib'), 0)} | "
            f"{_fmt(mem.get('step_mib'), 0)} |"
        )
    return lines


def ratio_lines(args, times: dict[str, dict], memory: dict[str, dict]) -> list[str]:
    def med(name, key="wall"):
        return statistics.median(times[name][key]) if name in times and times[name]["built"] else None

    def mem(name, key):
        return memory.get(name, {}).get(key)

    lines = [
        "| ratio | wall time | CPU time | goal |",
        "| --- | ---: | ---: | --- |",
        f"| distily / floor | {_ratio(med('distily'), med('floor'))} | "
        f"{_ratio(med('distily', 'cpu'), med('floor', 'cpu'))} | ≤ 1.05 |",
        f"| distily / TRL | {_ratio(med('distily'), med('trl'))} | "
        f"{_ratio(med('distily', 'cpu'), med('trl', 'cpu'))} | ≤ 0.9 |",
        f"| distily plain / floor | {_ratio(med('distily_plain'), med('floor'))} | "
        f"{_ratio(med('distily_plain', 'cpu'), med('floor', 'cpu'))} | (for reference) |",
        f"| recorded / student alone | {_ratio(med('distily_recorded'), med('student_ce'))} | "
        f"{_ratio(med('distily_recorded', 'cpu'), med('student_ce', 'cpu'))} | ≤ 1.10 |",
        f"| live (distily) / recorded | {_ratio(med('distily'), med('distily_recorded'))} | "
        f"{_ratio(med('distily', 'cpu'), med('distily_recorded', 'cpu'))} | ≥ 1.8 on CPU |",
        "",
        "| ratio | peak memory | step memory | goal |",
        "| --- | ---: | ---: | --- |",
        f"| distily / TRL | {_ratio(mem('distily', 'peak_mib'), mem('trl', 'peak_mib'))} | "
        f"{_ratio(mem('distily', 'step_mib'), mem('trl', 'step_mib'))} | ≤ 0.6 |",
        f"| distily / distily plain | {_ratio(mem('distily', 'peak_mib'), mem('distily_plain', 'peak_mib'))} | "
        f"{_ratio(mem('distily', 'step_mib'), mem('distily_plain', 'step_mib'))} | (for reference) |",
    ]
    return lines


def scaling_table(rows: dict[tuple[int, int], dict[str, dict]], seqs: list[int], vocabs: list[int]) -> list[str]:
    header = "| vocab | seq | " + " | ".join(f"`{m}` step MiB" for m in SCALING_MODES) + " | distily / TRL |"
    lines = [header, "| ---: | ---: | " + " | ".join("---:" for _ in SCALING_MODES) + " | ---: |"]
    for vocab in vocabs:
        for seq in seqs:
            result = rows[(vocab, seq)]
            cells = []
            for mode in SCALING_MODES:
                entry = result.get(mode, {})
                cells.append(f"error: {entry['error']}" if "error" in entry else _fmt(entry.get("step_mib"), 0))
            ratio = _ratio(result.get("distily", {}).get("step_mib"), result.get("trl", {}).get("step_mib"))
            lines.append(f"| {vocab:,} | {seq:,} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, one scaling row")
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--teacher_dtype", default="auto")
    parser.add_argument("--student_layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    parser.add_argument("--bf16", action="store_true", help="student forward under bf16 autocast (all modes)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per mode (default 7; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--vocabs", default=None, help="scaling table vocabularies (default 32768,65536,131072)")
    parser.add_argument("--seqs", default=None, help="scaling table sequence lengths (default 512,2048)")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--skip_scaling", action="store_true")
    parser.add_argument("--output", default=None, help="also write the markdown to this file")
    parser.add_argument("--child_mode", help=argparse.SUPPRESS)
    parser.add_argument("--child_vocab", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child_seq", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.vocabs = [int(v) for v in (args.vocabs or ("32768" if args.quick else "32768,65536,131072")).split(",")]
    args.seqs = [int(s) for s in (args.seqs or ("512" if args.quick else "512,2048")).split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_mode:
        child_main(args)
        return 0
    command = "python benchmarks/bench_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        setup = load_setup(args, Path(workdir))
        device = setup.device
        print(f"timing {', '.join(args.modes)}: {args.repeats} interleaved repeats ...", file=sys.stderr, flush=True)
        times = time_modes(setup, args.modes, args.repeats, args.warmup)
        print("timing eval batches ...", file=sys.stderr, flush=True)
        eval_seconds = time_eval(setup, args.repeats)
        del setup
        gc.collect()
    memory: dict[str, dict] = {}
    if not args.skip_memory:
        for mode in args.modes:
            if times[mode]["built"]:
                print(f"peak memory of {mode} (fresh process) ...", file=sys.stderr, flush=True)
                memory[mode] = run_child([*child_flags(args), "--child_mode", mode])
    scaling: dict[tuple[int, int], dict[str, dict]] = {}
    if not args.skip_scaling:
        for vocab in args.vocabs:
            for seq in args.seqs:
                for mode in SCALING_MODES:
                    print(f"scaling: vocab {vocab}, seq {seq}, {mode} ...", file=sys.stderr, flush=True)
                    flags = ["--device", args.device, "--child_vocab", str(vocab), "--child_seq", str(seq)]
                    flags += ["--bf16"] if args.bf16 else []
                    flags += ["--threads", str(args.threads)] if args.threads else []
                    scaling.setdefault((vocab, seq), {})[mode] = run_child([*flags, "--child_mode", mode])

    out = [
        f"Command: `{command}`",
        "",
        f"Setup: teacher `{args.teacher}` ({args.teacher_dtype}), {args.student_layers}-layer student built from it, "
        f"batch {args.batch} × {args.seq} tokens of python-stdlib, forward KL, one AdamW step per timed step"
        f"{', student under bf16 autocast' if args.bf16 else ''}; {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up step(s); medians.",
        f"Machine: {environment_line(device)}; {time.time() - started:.0f} s in all.",
        "",
        *step_table(args, times, memory),
        "",
        *ratio_lines(args, times, memory),
    ]
    eval_plain, eval_chunked = (statistics.median(eval_seconds[n]) for n in ("distily_plain", "distily"))
    out += [
        "",
        f"Eval batch ({2 * args.batch} × {args.seq}, no gradients, KD + both perplexity sums): chunked "
        f"{eval_chunked:.3f} s, plain {eval_plain:.3f} s (chunked / plain {eval_chunked / eval_plain:.2f}).",
    ]
    kinds = {m.get("kind") for m in memory.values() if m.get("kind")}
    if kinds:
        out += ["", f"Memory: {', '.join(sorted(kinds))}; step memory = peak − resident before the step."]
    errors = {mode: m["error"] for mode, m in memory.items() if "error" in m}
    out += [f"- memory of `{mode}` failed: {error}" for mode, error in errors.items()]
    if scaling:
        out += [
            "",
            "Scaling (random 4-layer width-256 teacher, 2-layer student, batch 1, step memory in MiB):",
            "",
            *scaling_table(scaling, args.seqs, args.vocabs),
        ]
    text = "\n".join(out) + "\n"
    print(text)
    if args.output:
        from distily.io import write_text_atomic

        write_text_atomic(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
