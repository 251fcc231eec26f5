"""Multi-process runs on CPU (gloo): DDP through the unchanged CLI, and FSDP2 sharding of the teacher.

Each test starts 2 processes, so all are marked slow (they still run in `make test`).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distily.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DDP_CPU_CONFIG = ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"


def free_port() -> int:
    """A port for the rendezvous, so that runs started at the same time on one machine do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(argv: list[str], processes: int = 2, timeout: int = 300) -> str:
    """``accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m distily.cli ARGV``; returns its output."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--config_file", str(DDP_CPU_CONFIG), "--num_processes", str(processes),
        "--main_process_port", str(free_port()), "-m", "distily.cli", *argv,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def run_args(teacher, corpus, out, cache, batch_size: int, *extra) -> list[str]:
    return [
        "--teacher", str(teacher),
        "--student_config", '{"num_hidden_layers": 2}',
        "--dataset", str(corpus),
        "--dataset_cache_dir", str(cache),
        "--output_dir", str(out),
        "--seq_len", "32",
        "--max_steps", "4",
        "--per_device_train_batch_size", str(batch_size),
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--report_to", "none",
        "--use_cpu", "true",
        "--seed", "0",
        "--data_seed", "0",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def logged(run: Path, key: str) -> list[float]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry and "eval_student_ppl" not in entry]


def test_ddp_two_processes_match_one_process_with_twice_the_batch_and_resume(tiny_teacher_dir, text_corpus, tmp_path):
    """2 processes × 2 rows against 1 process × 4 rows, 4 steps, same data order; then resume under DDP.

    With data_seed fixed, both runs draw one permutation of the blocks; the 1-process run takes 4 consecutive
    blocks per step and each DDP process takes every other run of 2 (accelerate's BatchSamplerShard), so both
    see the same 4 blocks per step. The loss is normalised by the global token count and DDP averages the
    gradients, so only float32 summation order differs: all-reduce adds per-process partial sums.
    Tolerances: logged loss rtol 1e-4 and weights atol 1e-5 (measured differences: ~1e-5 relative on the loss,
    ~2e-7 on the weights after 4 Adam steps at lr 1e-3). Evaluation must count each eval sequence once.
    """
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(run_args(tiny_teacher_dir, text_corpus, one, cache, 4)) == 0
    output = launch(run_args(tiny_teacher_dir, text_corpus, two, cache, 2))
    assert "eval perplexity" in output  # printed once, by the main process

    manifest = json.loads((two / "distily_run.json").read_text())
    assert manifest["status"] == "finished" and manifest["processes"] == 2 and manifest["global_step"] == 4
    losses_one, losses_two = logged(one, "loss"), logged(two, "loss")
    assert len(losses_one) == len(losses_two) == 4
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    assert logged(two, "tokens_per_second") and all(v > 0 for v in logged(two, "tokens_per_second"))

    for name in ("eval_start_results.json", "eval_results.json"):
        start_one, start_two = (json.loads((run / name).read_text()) for run in (one, two))
        assert start_two["eval_tokens"] == start_one["eval_tokens"], name
        assert start_two["eval_student_ppl"] == pytest.approx(start_one["eval_student_ppl"], rel=1e-5), name
        assert start_two["eval_teacher_ppl"] == pytest.approx(start_one["eval_teacher_ppl"], rel=1e-5), name
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=0, atol=1e-5, msg=name)

    # Resume under DDP: the run "killed" after its step-2 checkpoint ends with the same weights and losses.
    manifest["status"] = "running"
    (two / "distily_run.json").write_text(json.dumps(manifest))
    shutil.rmtree(two / "checkpoint-4")
    launch(run_args(tiny_teacher_dir, text_corpus, two, cache, 2, "--resume_from_checkpoint", "true"))
    manifest = json.loads((two / "distily_run.json").read_text())
    assert manifest["status"] == "finished" and manifest["global_step"] == 4
    assert logged(two, "loss")[-2:] == pytest.approx(losses_two[-2:], rel=1e-6)
    resumed = load_file(two / "model.safetensors")
    for name, value in weights_two.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


FSDP_TEACHER_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaForCausalLM
sys.path.insert(0, {root!r})
from tests.conftest import tiny_llama_config
from distily.distributed import shard_teacher_fsdp2
from distily.losses import distillation_loss, build_loss

dist.init_process_group("gloo")
torch.manual_seed(0)
teacher = LlamaForCausalLM(tiny_llama_config()).eval().requires_grad_(False)
ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
student_logits = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(7))
mask = torch.ones(2, 16, dtype=torch.bool)
with torch.no_grad():
    whole = teacher(input_ids=ids).logits
local_numel = sum(p.numel() for p in teacher.parameters())
shard_teacher_fsdp2(teacher, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
with torch.no_grad():
    sharded = teacher(input_ids=ids).logits
shard_numel = sum(p.to_local().numel() for p in teacher.parameters())
loss = build_loss("forward_kl")
kd = [distillation_loss(student_logits, t, mask, loss, 1.0, mask.sum()).item() for t in (whole, sharded)]
report = {{"rank": dist.get_rank(), "max_diff": (sharded - whole).abs().max().item(), "kd": kd,
          "shard_fraction": shard_numel / local_numel}}
with open(f"{out}/rank{{dist.get_rank()}}.json", "w") as handle:  # one file per rank: stdout lines interleave
    json.dump(report, handle)
dist.destroy_process_group()
"""


def test_fsdp2_sharded_teacher_gives_the_same_logits_with_half_the_weights(tmp_path):
    """The teacher-sharding path of FSDP runs (``--teacher_sharding shard``), on CPU with gloo.

    Each rank feeds different inputs: the sharded forward gathers each block's weights from both ranks and
    must reproduce the whole teacher's logits exactly, while each rank stores half of every weight.
    """
    script = tmp_path / "fsdp_teacher.py"
    script.write_text(FSDP_TEACHER_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(report["rank"] for report in reports) == [0, 1]
    for report in reports:
        assert report["max_diff"] <= 1e-6
        assert report["kd"][1] == pytest.approx(report["kd"][0], rel=1e-6)
        assert report["shard_fraction"] == pytest.approx(0.5, abs=0.01)
