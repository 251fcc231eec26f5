"""The optimizer's parameter groups, declared once in ``DistillationTrainer.create_optimizer``: the student's
decay / no-decay groups, a BitNet student's latent ternary weights at ``bitnet.learning_rate``, the projectors at
``projector_learning_rate``; and a run using all of them resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from distily import ConfigError, DistillationConfig, DistillationTrainer, build_student
from distily.bitnet import bitlinear_modules

from .conftest import tiny_llama_config
from .test_trainer import SEQ, StopAt, random_blocks  # the same random blocks and stop callback

LATENT_RATE, PROJECTOR_RATE, RATE, WEIGHT_DECAY = 4e-3, 5e-3, 1e-3, 0.1
OBJECTIVE = {"hidden_states": {"weight": 1.0, "projector": "mlp", "layer_mapper": "all"}}


def make_config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=RATE,
        weight_decay=WEIGHT_DECAY,
        projector_learning_rate=PROJECTOR_RATE,
        warmup_steps=2,
        lr_scheduler_type="linear",
        objective=OBJECTIVE,
        report_to="none",
        use_cpu=True,
        seq_len=SEQ,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        seed=3,
        data_seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillationConfig(**values)


def bitnet_pair(**bitnet):
    """A tiny Llama teacher and a 2-layer BitNet student built from it (same seed, same weights every call)."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    student = build_student(teacher, {"num_hidden_layers": 2, "bitnet": {"learning_rate": LATENT_RATE, **bitnet}})
    return teacher, student


def test_groups_are_declared_once_with_their_rates_and_weight_decay(tmp_path):
    teacher, student = bitnet_pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path))
    optimizer = trainer.create_optimizer()
    assert trainer.create_optimizer() is optimizer  # a second call changes nothing
    latent = {id(m.weight) for m in bitlinear_modules(student).values()}
    projectors = {id(p) for p in trainer.intermediate.parameters()}
    names = {id(p): name for name, p in student.named_parameters()}
    groups = [
        (g["lr"], g["weight_decay"], g.get("bitnet_latent"), {id(p) for p in g["params"]})
        for g in optimizer.param_groups
    ]
    # Decay and no-decay groups of the student (Trainer's rule: no decay for biases and norms), then the latent
    # weights (every ternary projection's weight decays), then the projectors with the student's weight decay.
    assert [group[:3] for group in groups] == [
        (RATE, WEIGHT_DECAY, None),
        (RATE, 0.0, None),
        (LATENT_RATE, WEIGHT_DECAY, True),
        (PROJECTOR_RATE, WEIGHT_DECAY, None),
    ]
    decay, no_decay, latent_group, projector_group = (group[3] for group in groups)
    assert latent_group == latent and projector_group == projectors
    assert all("norm" in names[i] for i in no_decay) and not any("norm" in names[i] for i in decay)
    assert decay | no_decay | latent_group == set(names) and not (decay & no_decay)
    assert {id(p) for p in teacher.parameters()}.isdisjoint(decay | no_decay | latent_group | projector_group)


def test_an_optimizer_from_outside_cannot_hold_the_trainers_groups(tmp_path):
    teacher, student = bitnet_pair()
    optimizer = torch.optim.AdamW(student.parameters(), lr=RATE)
    with pytest.raises(ConfigError, match="optimizer_cls_and_kwargs"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=make_config(tmp_path), optimizers=(optimizer, None)
        )
    # With optimizer_cls_and_kwargs the trainer builds its groups with that optimizer.
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_config(tmp_path),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": RATE, "momentum": 0.5}),
    )
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.SGD)
    assert [(g["lr"], g["momentum"]) for g in optimizer.param_groups] == [
        (RATE, 0.5),
        (RATE, 0.5),
        (LATENT_RATE, 0.5),
        (PROJECTOR_RATE, 0.5),
    ]


def test_resume_with_latent_rate_and_projectors_gives_exactly_the_uninterrupted_weights(tmp_path):
    """Stopped after the step-2 checkpoint (mid BitNet warm-up, mid learning-rate warm-up) and resumed by a fresh
    trainer with a fresh student and fresh projectors: every student and projector tensor equals, bit for bit,
    those of a run that was never interrupted."""
    data = random_blocks(40)
    teacher, student = bitnet_pair(warmup_steps=4)
    full = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path / "full"), train_dataset=data
    )
    full.train()
    expected_student = {k: v.detach().clone() for k, v in student.state_dict().items()}
    expected_projectors = {k: v.detach().clone() for k, v in full.intermediate.state_dict().items()}

    config = make_config(tmp_path / "parts")
    teacher, student = bitnet_pair(warmup_steps=4)
    first = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
    first.add_callback(StopAt(2))
    first.train()
    checkpoint = tmp_path / "parts" / "out" / "checkpoint-2"
    at_2 = load_file(str(checkpoint / "model.safetensors"))
    saved_groups = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"]
    assert [g["initial_lr"] for g in saved_groups] == [RATE, RATE, LATENT_RATE, PROJECTOR_RATE]

    teacher, student = bitnet_pair(warmup_steps=4)
    second = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 6
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(at_2[q_proj], expected_student[q_proj])  # steps 3-6 trained after the resume
    for name, value in expected_student.items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for name, value in expected_projectors.items():
        torch.testing.assert_close(second.intermediate.state_dict()[name], value, rtol=0, atol=0, msg=name)
