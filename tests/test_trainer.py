"""DistillationTrainer: the objective, the frozen teacher, evaluation, logging, accumulation and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, TrainerCallback

import distily
from distily import ConfigError, DistillationConfig, DistillationTrainer, build_student

from .conftest import TINY_VOCAB, tiny_llama_config

SEQ = 16


def random_blocks(rows: int, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(3, TINY_VOCAB, (rows, SEQ), generator=generator).tolist()})


def make_config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        seq_len=SEQ,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillationConfig(**values)


def make_pair(num_student_layers: int = 2):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config())
    student = build_student(teacher, {"num_hidden_layers": num_student_layers})
    return teacher, student


def test_teacher_is_frozen_and_kept_out_of_the_optimizer_and_checkpoints(tmp_path):
    teacher, student = make_pair()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = make_config(tmp_path, save_strategy="steps", save_steps=3)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(32))
    trainer.train()
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_params = {id(p) for p in teacher.parameters()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not teacher_params & optimised
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    saved = load_file(str(tmp_path / "out" / "checkpoint-3" / "model.safetensors"))
    student_keys = set(student.state_dict())
    assert set(saved) <= student_keys
    assert not any(key.startswith("teacher") for key in saved)
    # The student has 2 layers: a teacher's 4-layer weights would show up as layers 2 and 3.
    assert not any(".layers.2." in key or ".layers.3." in key for key in saved)


def test_objective_mixes_kd_and_ce_exactly(tmp_path):
    teacher, student = make_pair()
    config = make_config(tmp_path, alpha=0.3, temperature=2.0, loss="reverse_kl")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(8))
    batch = trainer.data_collator([random_blocks(4)[i] for i in range(4)])
    batch["labels"][0, 5:] = -100  # some padding-like positions
    student.train()
    loss = trainer.compute_loss(student, batch)

    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits[:, :-1].double()
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    log_q, log_p = (s / 2.0).log_softmax(-1), (t / 2.0).log_softmax(-1)
    reverse = (log_q.exp() * (log_q - log_p)).sum(-1)
    kd = 4.0 * reverse[mask].mean()
    ce = F.cross_entropy(s[mask], labels[mask])
    expected = 0.3 * kd + 0.7 * ce
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_plain_ce_baseline_needs_no_teacher(tmp_path):
    _, student = make_pair()
    config = make_config(tmp_path, alpha=0.0)
    trainer = DistillationTrainer(model=student, teacher_model=None, args=config, train_dataset=random_blocks(8))
    batch = trainer.data_collator([random_blocks(4)[i] for i in range(4)])
    loss = trainer.compute_loss(student, batch)
    expected = student(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_evaluate_reports_student_and_teacher_perplexity(tmp_path):
    teacher, student = make_pair()
    config = make_config(tmp_path)
    eval_data = random_blocks(6, seed=1)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(8), eval_dataset=eval_data
    )
    metrics = trainer.evaluate()
    ids = torch.tensor(eval_data["input_ids"])
    with torch.no_grad():
        student.eval()
        student_ce = student(input_ids=ids, labels=ids).loss.item()
        teacher_ce = teacher(input_ids=ids, labels=ids).loss.item()
    assert metrics["eval_student_ppl"] == pytest.approx(math.exp(student_ce), rel=1e-4)
    assert metrics["eval_teacher_ppl"] == pytest.approx(math.exp(teacher_ce), rel=1e-4)
    assert metrics["eval_tokens"] == 6 * (SEQ - 1)
    assert trainer.state.log_history[-1]["eval_student_ppl"] == metrics["eval_student_ppl"]


def test_training_logs_components_time_and_memory(tmp_path):
    teacher, student = make_pair()
    config = make_config(tmp_path, alpha=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(16))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["step_time"] > 0
        assert entry["tokens_per_second"] > 0
        assert entry["peak_memory_mb"] > 10
        # The logged loss is the weighted sum of its logged components.
        assert entry["loss"] == pytest.approx(0.5 * entry["loss_kd"] + 0.5 * entry["loss_ce"], rel=1e-3)


def _train_weights(tmp_path, name, **overrides):
    teacher, student = make_pair()
    config = make_config(tmp_path / name, max_steps=2, **overrides)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(16))
    trainer.train()
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = _train_weights(tmp_path, "big", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    accumulated = _train_weights(tmp_path, "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-5, msg=name)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=2, per_device_train_batch_size=2, seed=3)
    data = random_blocks(40)

    teacher, student = make_pair()
    full = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path / "full", **common), train_dataset=data
    )
    full.train()
    expected = {k: v.detach().clone() for k, v in student.state_dict().items()}

    teacher, student = make_pair()
    config = make_config(tmp_path / "parts", **common)
    first = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
    first.add_callback(StopAt(4))
    first.train()
    assert first.state.global_step == 4
    checkpoint = tmp_path / "parts" / "out" / "checkpoint-4"
    assert (checkpoint / "trainer_state.json").is_file()

    teacher, student = make_pair()  # a fresh process would start from scratch weights too
    second = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 6
    for name, value in expected.items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=1e-5, msg=name)
    state = json.loads((tmp_path / "parts" / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_bad_pairs_are_refused(tmp_path):
    teacher, student = make_pair()
    with pytest.raises(ConfigError, match="seq_len=512 is longer than the student's 128 positions"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, seq_len=512))
    other = LlamaForCausalLM(tiny_llama_config(vocab_size=TINY_VOCAB + 8))
    with pytest.raises(ConfigError, match=r"vocabulary .*differs from the teacher's"):
        DistillationTrainer(model=other, teacher_model=teacher, args=make_config(tmp_path))
    with pytest.raises(ValueError, match="no teacher_model was given"):
        DistillationTrainer(model=student, teacher_model=None, args=make_config(tmp_path))
    with pytest.raises(TypeError, match="DistillationConfig"):
        from transformers import TrainingArguments

        DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(output_dir=str(tmp_path)))


PUBLIC_API = [
    "ConfigError", "DataArguments", "DistillationConfig", "DistillationTrainer", "DistilyError", "EMBEDDED_TEACHERS",
    "FEATURE_LOSSES", "FEATURE_NORMS", "LAYER_MAPPERS", "LOSSES", "PROJECTORS", "Registry", "StudentArguments",
    "SynthArguments", "TEMPLATES", "TaskTemplate", "TeacherArguments", "TeacherEnsemble", "TeacherMember",
    "UnknownNameError", "__version__",
    "bits_per_byte", "build_loss", "build_projector", "build_student", "build_student_with_tokenizer",
    "distillation_loss", "load_teacher", "map_layers", "prune",
    "register_feature_loss", "register_feature_norm", "register_layer_mapper", "register_loss", "register_projector",
    "register_template", "synthesize", "train_tokenizer",
]  # fmt: skip


def test_public_api_names():
    # A snapshot: adding or removing a public name is a decision, made here on purpose.
    assert sorted(distily.__all__) == PUBLIC_API
    assert all(hasattr(distily, name) for name in distily.__all__)
    assert issubclass(distily.ConfigError, distily.DistilyError) and issubclass(distily.UnknownNameError, KeyError)
