"""Scaling features in one process: config checks, the quantised-teacher seams, teacher placement, LoRA/DoRA
students (train, merge, save), pretrained students, activation checkpointing and the shipped launch configs.

The multi-process runs (DDP with gloo, FSDP2 teacher sharding) are in test_distributed.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from distily import ConfigError, DistillationTrainer, build_student
from distily.cli import main
from distily.config import PeftArguments, StudentArguments, TeacherArguments
from distily.distributed import check_world_size, place_teacher, resolve_teacher_sharding
from distily.lora import ADAPTER_DIR, apply_lora, is_peft_model, merge_peft, merge_saved_adapter
from distily.teacher import quantization
from distily.teacher.quantization import bitsandbytes_config

from .conftest import tiny_llama_config
from .test_trainer import make_config, make_pair, random_blocks

ROOT = Path(__file__).resolve().parent.parent

# LoRA on every linear layer of one tiny-Llama block (hidden 32, 4 heads of 8, 2 KV heads, MLP 64) costs
# r·(in + out) per module: q 32→32, k 32→16, v 32→16, o 32→32, gate 32→64, up 32→64, down 64→32.
LORA_PARAMS_PER_BLOCK_PER_RANK = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) * 2 + (64 + 32)
# DoRA adds one magnitude per output feature of each module.
DORA_MAGNITUDES_PER_BLOCK = 32 + 16 + 16 + 32 + 64 + 64 + 32


def ids_batch(rows: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.tensor(random_blocks(rows, seed=seed)["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def test_peft_arguments_defaults_and_errors():
    assert not PeftArguments().enabled
    lora = PeftArguments(lora_r=8)
    assert lora.enabled and lora.alpha == 16.0 and lora.target_modules == "all-linear"
    named = PeftArguments(lora_r=4, lora_alpha=4, lora_target_modules="q_proj, v_proj")
    assert named.alpha == 4.0 and named.target_modules == ["q_proj", "v_proj"]
    assert PeftArguments(lora_r=4, lora_target_modules=["q_proj", "o_proj"]).lora_target_modules == "q_proj,o_proj"
    cases = [
        (dict(use_dora=True), r"--use_dora only apply to a LoRA student\. Set its rank too, e\.g\. --lora_r 16"),
        (dict(lora_alpha=32.0), "--lora_alpha only apply"),
        (dict(lora_r=0), "--lora_r must be a whole number ≥ 1"),
        (dict(lora_r=8, lora_alpha=-1.0), "--lora_alpha must be a number > 0"),
        (dict(lora_r=8, lora_dropout=1.0), r"--lora_dropout must be in \[0, 1\)"),
        (dict(lora_r=8, lora_target_modules=" , "), "--lora_target_modules is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            PeftArguments(**kwargs)


def test_teacher_student_and_placement_arguments_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="exclude each other"):
        TeacherArguments(teacher="t", teacher_load_in_8bit=True, teacher_load_in_4bit=True)
    assert TeacherArguments(teacher="t", teacher_load_in_4bit=True).teacher_quantization_bits == 4
    assert TeacherArguments(teacher="t").teacher_quantization_bits is None
    with pytest.raises(ConfigError, match="--student_config and --student_init only apply"):
        StudentArguments(student="some/student", student_config='{"num_hidden_layers": 2}')
    with pytest.raises(ConfigError, match="--student_config and --student_init only apply"):
        StudentArguments(student="some/student", student_init="random")
    assert StudentArguments(student="  ").student is None
    with pytest.raises(ConfigError, match="--teacher_device 'gpu0' is not a device"):
        make_config(tmp_path, teacher_device="gpu0")
    with pytest.raises(ConfigError, match="--teacher_sharding 'half' is not one of auto, replicate, shard"):
        make_config(tmp_path, teacher_sharding="half")
    with pytest.raises(ConfigError, match="Drop one of them"):
        make_config(tmp_path, teacher_device="cpu", teacher_sharding="shard")


def fake_accelerator(kind: str = "NO", processes: int = 1, stage: int | None = None):
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}}) if stage is not None else None
    return SimpleNamespace(
        distributed_type=kind, num_processes=processes, state=SimpleNamespace(deepspeed_plugin=plugin)
    )


def test_teacher_sharding_is_resolved_per_launch_mode():
    ddp, fsdp = fake_accelerator("MULTI_GPU", 2), fake_accelerator("FSDP", 2)
    zero2, zero3 = fake_accelerator("DEEPSPEED", 2, stage=2), fake_accelerator("DEEPSPEED", 2, stage=3)
    assert resolve_teacher_sharding("auto", ddp) == "replicate"
    assert resolve_teacher_sharding("auto", fsdp) == "replicate"
    assert resolve_teacher_sharding("auto", zero2) == "replicate"
    assert resolve_teacher_sharding("auto", zero3) == "shard"
    assert resolve_teacher_sharding("auto", zero3, quantized=True) == "replicate"  # bnb skips zero.Init
    assert resolve_teacher_sharding("shard", fsdp) == "shard"
    with pytest.raises(ConfigError, match=r"needs FSDP or DeepSpeed ZeRO-3.*under MULTI_GPU each process"):
        resolve_teacher_sharding("shard", ddp)
    with pytest.raises(ConfigError, match="cannot be replicated"):
        resolve_teacher_sharding("replicate", zero3)
    with pytest.raises(ConfigError, match="cannot be sharded"):
        resolve_teacher_sharding("shard", fsdp, quantized=True)

    teacher, _ = make_pair()
    fsdp.state.fsdp_plugin = SimpleNamespace(fsdp_version=1)
    args = SimpleNamespace(teacher_sharding="shard", teacher_device=None, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="needs FSDP2: set fsdp_version: 2"):
        place_teacher(teacher, fsdp, args)
    args.teacher_sharding, args.teacher_device = "auto", "cpu"
    placed, device = place_teacher(teacher, fsdp, args)  # replicated: a whole teacher on --teacher_device
    assert placed is teacher and device == torch.device("cpu")


def test_a_launch_that_would_train_n_independent_copies_is_refused():
    check_world_size(None, 1)
    check_world_size("2", 2)
    with pytest.raises(ConfigError, match=r"one of 2 launched together.*pass --use_cpu true"):
        check_world_size("2", 1)


# ----------------------------------------------------------------------------------------------------------------
# 8-bit / 4-bit teachers: everything up to the GPU


def test_quantized_teacher_is_refused_with_the_reason_and_the_alternative(monkeypatch):
    with pytest.raises(ConfigError, match=r"does not apply to the GGUF teacher .smollm2.*--teacher_dtype bfloat16"):
        bitsandbytes_config(4, None, "smollm2-135m-instruct", gguf=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--teacher_load_in_8bit needs a CUDA GPU"):
        bitsandbytes_config(8, None, "org/model")
    # With a GPU but without the extra: the error names the extra to install.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(quantization, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*pip install 'distily\[gpu\]'"):
        bitsandbytes_config(4, torch.bfloat16, "org/model")
    # With both: the config transformers gets.
    monkeypatch.setattr(quantization, "find_spec", lambda name: object())
    four = bitsandbytes_config(4, torch.bfloat16, "org/model")
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = bitsandbytes_config(8, None, "org/model")
    assert eight.load_in_8bit and not eight.load_in_4bit


def test_quantized_teacher_flags_fail_cleanly_through_the_cli(tiny_teacher_dir, text_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--dataset", str(text_corpus), "--output_dir", str(out), "--seq_len", "32", "--use_cpu", "true"]
    assert main(["--teacher", str(tiny_teacher_dir), "--teacher_load_in_8bit", "true", *common]) == 2
    assert "--teacher_load_in_8bit needs a CUDA GPU" in capsys.readouterr().err
    assert main(["--teacher", "smollm2-135m-instruct", "--teacher_load_in_4bit", "true", *common]) == 2
    assert "does not apply to the GGUF teacher" in capsys.readouterr().err
    assert not out.exists()


def test_a_student_cannot_copy_a_quantized_teacher():
    teacher, _ = make_pair()
    teacher.hf_quantizer = object()  # what from_pretrained(quantization_config=...) leaves on the model
    with pytest.raises(ConfigError, match=r"loaded quantised.*--student PATH"):
        build_student(teacher, {"num_hidden_layers": 2})
    random = build_student(teacher, {"num_hidden_layers": 2}, init="random")
    assert random.config.distily_init == {"from": "random"}


# ----------------------------------------------------------------------------------------------------------------
# Teacher placement


def test_teacher_device_places_the_teacher_and_gives_the_same_loss(tmp_path):
    teacher, student = make_pair()
    batch = None
    losses = []
    for index, device in enumerate((None, "cpu")):
        config = make_config(tmp_path / str(index), teacher_device=device)
        trainer = DistillationTrainer(
            model=student, teacher_model=copy.deepcopy(teacher), args=config, train_dataset=random_blocks(8)
        )
        assert trainer.teacher_input_device == torch.device("cpu")
        assert all(p.device.type == "cpu" and not p.requires_grad for p in trainer.teacher.parameters())
        batch = batch or trainer.data_collator([random_blocks(4)[i] for i in range(4)])
        losses.append(trainer.compute_loss(student, batch).item())
    assert losses[0] == losses[1] > 0


# ----------------------------------------------------------------------------------------------------------------
# LoRA / DoRA students


def _base_key(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_student_trains_only_its_adapters_and_merges_to_the_same_logits(tmp_path, use_dora):
    teacher, student = make_pair()
    base = {name: value.clone() for name, value in student.state_dict().items()}
    ids = ids_batch()
    with torch.no_grad():
        base_logits = student(input_ids=ids).logits
    peft = apply_lora(student, PeftArguments(lora_r=4, use_dora=use_dora))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    expected = 2 * (4 * LORA_PARAMS_PER_BLOCK_PER_RANK + (DORA_MAGNITUDES_PER_BLOCK if use_dora else 0))
    assert trainable == expected
    peft.eval()
    with torch.no_grad():  # B starts at zero: the adapters change nothing yet
        torch.testing.assert_close(peft(input_ids=ids).logits, base_logits, rtol=0, atol=1e-6)

    config = make_config(tmp_path, max_steps=3, learning_rate=1e-2)
    trainer = DistillationTrainer(model=peft, teacher_model=teacher, args=config, train_dataset=random_blocks(16))
    trainer.train()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, parameter in peft.named_parameters():
        if "lora_" in name:
            assert id(parameter) in optimised, name
        else:  # the student's own weights are frozen and unchanged
            assert not parameter.requires_grad and id(parameter) not in optimised, name
            assert torch.equal(parameter.detach(), base[_base_key(name)]), name

    merged = merge_peft(peft)
    assert not is_peft_model(merged) and is_peft_model(peft)  # merging works on a copy
    assert isinstance(merged, LlamaForCausalLM) and not any("lora" in key for key in merged.state_dict())
    peft.eval()
    merged.eval()
    with torch.no_grad():
        peft_logits, merged_logits = peft(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # training moved the student
    assert merge_peft(merged) is merged


def test_lora_target_modules_are_checked():
    _, student = make_pair()
    with pytest.raises(ConfigError, match="--lora_target_modules 'qq_proj'"):
        apply_lora(student, PeftArguments(lora_r=2, lora_target_modules="qq_proj"))
    peft = apply_lora(copy.deepcopy(student), PeftArguments(lora_r=2, lora_target_modules="q_proj,v_proj"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert trainable == 2 * 2 * ((32 + 32) + (32 + 16))


def test_lora_on_a_pretrained_student_through_the_cli(tiny_teacher_dir, text_corpus, tmp_path):
    student_dir = tmp_path / "pretrained-student"
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2)).save_pretrained(student_dir)
    out = tmp_path / "run"
    argv = [
        "--teacher", str(tiny_teacher_dir), "--student", str(student_dir),
        "--lora_r", "4", "--lora_alpha", "8", "--use_dora", "true",
        "--dataset", str(text_corpus), "--dataset_cache_dir", str(tmp_path / "cache"), "--output_dir", str(out),
        "--seq_len", "32", "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    assert main(argv) == 0

    manifest = json.loads((out / "distily_run.json").read_text())
    assert manifest["status"] == "finished" and manifest["student"] == str(student_dir)
    assert manifest["student_trainable_parameters"] == 2 * (4 * LORA_PARAMS_PER_BLOCK_PER_RANK + 256)
    saved = yaml.safe_load((out / "distily_config.yaml").read_text())
    assert saved["lora_r"] == 4 and saved["use_dora"] is True and saved["student"] == str(student_dir)

    # The run folder is a plain model; adapter/ holds the adapters alone; both give the same logits.
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (out / ADAPTER_DIR / "adapter_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(student_dir)
    peft = PeftModel.from_pretrained(base, out / ADAPTER_DIR).eval()
    reloaded = merge_saved_adapter(student_dir, out / ADAPTER_DIR).eval()
    ids = ids_batch()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        torch.testing.assert_close(merged_logits, peft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged_logits, reloaded(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        untrained = AutoModelForCausalLM.from_pretrained(student_dir).eval()(input_ids=ids).logits
    assert (merged_logits - untrained).abs().max() > 1e-3


def test_a_pretrained_student_with_another_vocabulary_is_refused(tiny_teacher_dir, text_corpus, tmp_path, capsys):
    student_dir = tmp_path / "other-vocab"
    LlamaForCausalLM(tiny_llama_config(vocab_size=200)).save_pretrained(student_dir)
    out = tmp_path / "run"
    argv = ["--teacher", str(tiny_teacher_dir), "--student", str(student_dir), "--dataset", str(text_corpus)]
    assert main([*argv, "--output_dir", str(out), "--seq_len", "32", "--use_cpu", "true"]) == 2
    assert "The student's vocabulary (200 tokens) differs from the teacher's (128)" in capsys.readouterr().err
    assert main([*argv[:2], "--student", str(tmp_path / "missing"), *argv[4:], "--output_dir", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*argv[:2], "--student", str(tmp_path / "empty"), *argv[4:], "--output_dir", str(out)]) == 2
    assert "Could not load --student" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Activation (gradient) checkpointing composes


def _trained_trainable_weights(tmp_path, name: str, lora: bool, **overrides) -> dict[str, torch.Tensor]:
    teacher, student = make_pair()
    model = apply_lora(student, PeftArguments(lora_r=4)) if lora else student
    config = make_config(tmp_path / name, max_steps=2, learning_rate=1e-2, **overrides)
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=config, train_dataset=random_blocks(16))
    trainer.train()
    assert model.is_activation_checkpointing == bool(overrides.get("activation_checkpointing"))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_and_accumulation_give_the_same_training(tmp_path, lora):
    """4 rows per step, against 2 rows × 2 accumulation steps with the student's activations recomputed."""
    plain = _trained_trainable_weights(tmp_path, "plain", lora)
    combined = _trained_trainable_weights(
        tmp_path, "combined", lora, activation_checkpointing=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )  # fmt: skip
    assert plain.keys() == combined.keys()
    for name, value in plain.items():
        torch.testing.assert_close(combined[name], value, rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Shipped launch configs


def test_accelerate_configs_load_and_say_what_they_launch():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {
        "ddp.yaml": ("MULTI_GPU", None),
        "ddp_cpu.yaml": ("MULTI_GPU", None),
        "fsdp.yaml": ("FSDP", None),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
        "deepspeed_zero3.yaml": ("DEEPSPEED", 3),
    }
    folder = ROOT / "configs" / "accelerate"
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(expected)
    for name, (kind, stage) in expected.items():
        config = load_config_from_file(str(folder / name))
        assert str(config.distributed_type.value) == kind, name
        assert config.num_processes >= 2, name
        if kind == "FSDP":
            assert config.fsdp_config["fsdp_version"] == 2
            assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # run folders stay loadable
        if stage is not None:
            ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
            assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == stage


def test_fsdp_config_gives_accelerate_an_fsdp2_plugin(monkeypatch):
    """What `accelerate launch --config_file configs/accelerate/fsdp.yaml` hands each process, read back by the
    FSDP plugin that Trainer's Accelerator builds from the environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "-m", "distily.cli"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_leave_batch_and_precision_to_the_trainer(stage):
    config = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key  # filled from TrainingArguments, so flags keep working
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config  # Trainer's own, from the flags
    if stage == 3:  # a loadable model.safetensors in every checkpoint and in the run folder
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# ----------------------------------------------------------------------------------------------------------------
# FSDP/DeepSpeed runs take their "before" evaluation inside train() (eval_on_start)


def test_evaluating_at_step_zero_inside_training_gives_the_same_run(
    tiny_teacher_dir, text_corpus, tmp_path, monkeypatch
):
    """The path FSDP and DeepSpeed runs take (they cannot evaluate an unprepared student), forced on CPU."""
    from distily import distributed

    from .test_cli import base_args

    before = tmp_path / "before"
    assert main(base_args(tiny_teacher_dir, text_corpus, before)) == 0
    monkeypatch.setattr(distributed, "evaluates_inside_training", lambda accelerator: True)
    inside = tmp_path / "inside"
    assert main(base_args(tiny_teacher_dir, text_corpus, inside)) == 0
    for name in ("eval_start_results.json", "eval_results.json"):
        expected, got = (json.loads((run / name).read_text()) for run in (before, inside))
        assert got["eval_student_ppl"] == pytest.approx(expected["eval_student_ppl"], rel=1e-6), name
        assert got["eval_teacher_ppl"] == pytest.approx(expected["eval_teacher_ppl"], rel=1e-6), name
        assert got["eval_tokens"] == expected["eval_tokens"]
    from safetensors.torch import load_file

    expected, got = load_file(before / "model.safetensors"), load_file(inside / "model.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_embedded_gguf_teacher_is_not_a_quantized_teacher(smollm2):
    """GGUF loads through a transformers quantizer but dequantises to floats: students may copy its layers."""
    from distily.teacher.quantization import is_quantized

    teacher, _ = smollm2
    assert teacher.hf_quantizer is not None and not is_quantized(teacher)
    student = build_student(teacher, {"num_hidden_layers": 2})
    assert student.config.distily_init["teacher_layers"] == [0, 29]
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[29].mlp.up_proj.weight)


def test_lora_student_resumes_from_an_adapter_checkpoint(tmp_path):
    """Checkpoints of a LoRA student hold the adapters only; resuming from one ends where an uninterrupted run does."""
    from .test_trainer import StopAt

    common = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2, learning_rate=1e-2)
    data = random_blocks(24)

    def lora_trainer(folder: str) -> DistillationTrainer:
        teacher, student = make_pair()
        peft = apply_lora(student, PeftArguments(lora_r=4))
        config = make_config(tmp_path / folder, **common)
        return DistillationTrainer(model=peft, teacher_model=teacher, args=config, train_dataset=data)

    full = lora_trainer("full")
    full.train()
    expected = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}

    first = lora_trainer("parts")
    first.add_callback(StopAt(2))
    first.train()
    checkpoint = tmp_path / "parts" / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    second = lora_trainer("parts")
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 4
    resumed = {n: p.detach() for n, p in second.model.named_parameters() if p.requires_grad}
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
