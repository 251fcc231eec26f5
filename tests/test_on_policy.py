"""On-policy distillation: config errors, the completion-only loss, the engines, replay, logs and exact resume."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from distily import ConfigError, DistillationTrainer
from distily.config.on_policy import ON_POLICY_DEFAULT_LOSS
from distily.on_policy import (
    BlockPrompts,
    ChatPrompts,
    GenerationEngine,
    ReplayBuffer,
    SamplingSettings,
    TransformersEngine,
    VLLMEngine,
    completion_batch,
    step_seed,
)
from distily.on_policy.engines import cut_at_eos, left_pad, vllm_weights
from distily.on_policy.prompts import read_prompt_requests, render_prompt

from .conftest import TINY_VOCAB
from .test_cli import base_args
from .test_trainer import SEQ, StopAt, make_config, make_pair, random_blocks

EOS = 2
PAD = 0


def settings(**overrides) -> SamplingSettings:
    values = dict(max_new_tokens=4, temperature=1.0, top_p=1.0, eos_token_ids=(EOS,), pad_token_id=PAD)
    values.update(overrides)
    return SamplingSettings(**values)


class FakeEngine(GenerationEngine):
    """Completions of 1 to ``max_new_tokens`` tokens counting up from the prompt's last token; row 0 ends in EOS."""

    name = "fake"

    def __init__(self, settings: SamplingSettings):
        super().__init__(settings)
        self.calls: list[tuple[list[list[int]], int]] = []

    def generate(self, prompts, seed):
        self.calls.append((prompts, seed))
        out = []
        for row, prompt in enumerate(prompts):
            length = 1 + (row + len(self.calls)) % self.settings.max_new_tokens
            tokens = [3 + (prompt[-1] + k + 1) % (TINY_VOCAB - 3) for k in range(length)]
            out.append([*tokens[:-1], EOS] if row == 0 else tokens)
        return out


def on_policy_config(tmp_path, **overrides):
    values = dict(lmbda=1.0, prompt_len=6, max_new_tokens=4, loss="reverse_kl")
    values.update(overrides)
    return make_config(tmp_path, **values)


def reference_reverse_kl(student, teacher, batch) -> tuple[torch.Tensor, int]:
    """Sum over the completion tokens of KL(student ‖ teacher), from both models' full logits, and their count."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    log_q, log_p = F.log_softmax(s[mask].double(), -1), F.log_softmax(t[mask].double(), -1)
    return (log_q.exp() * (log_q - log_p)).sum(), int(mask.sum())


# -- config: each bad input a clear error ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(lmbda=-0.1), r"--lmbda must be a probability in \[0, 1\]"),
        (dict(lmbda=1.5), r"--lmbda must be a probability in \[0, 1\]"),
        (dict(lmbda=1.0, prompt_len=4, max_new_tokens=0), "--max_new_tokens must be a whole number > 0"),
        (dict(lmbda=1.0, prompt_len=SEQ), f"--prompt_len {SEQ} must be shorter than --seq_len {SEQ}"),
        (dict(lmbda=1.0, prompt_len=4, teacher_cache="cache"), "cannot score new sequences"),
        (dict(seq_kd=True, prompt_len=4, teacher_cache="cache"), "cannot score new sequences"),
        (dict(lmbda=1.0), "needs one prompt source: .*neither"),
        (dict(lmbda=1.0, prompt_len=4, replay_ratio=0.5), "--replay_ratio > 0 needs a buffer"),
        (dict(lmbda=1.0, prompt_len=4, replay_buffer_size=4, replay_ratio=1.0), r"--replay_ratio must be in \[0, 1\)"),
        (dict(lmbda=1.0, prompt_len=4, alpha=0.5), "Set --alpha 1"),
        (dict(lmbda=1.0, prompt_len=4, generation_top_p=0.0), r"--generation_top_p must be in \(0, 1\]"),
        (dict(lmbda=1.0, prompt_len=4, generation_backend="sglang"), "is not one of transformers, vllm"),
    ],
)
def test_bad_on_policy_flags_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, **overrides)


def test_vllm_backend_without_vllm_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs vLLM: pip install 'distily\[gpu\]'"):
        make_config(tmp_path, lmbda=1.0, prompt_len=4, generation_backend="vllm")


def test_the_loss_default_depends_on_sampling(tmp_path):
    assert make_config(tmp_path).loss == "forward_kl"
    assert make_config(tmp_path, lmbda=0.5, prompt_len=4).loss == ON_POLICY_DEFAULT_LOSS
    assert make_config(tmp_path, seq_kd=True, prompt_len=4).loss == ON_POLICY_DEFAULT_LOSS
    assert make_config(tmp_path, lmbda=0.5, prompt_len=4, loss="generalized_jsd").loss == "generalized_jsd"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lmbda", "2"], r"--lmbda must be a probability in \[0, 1\]"),
        (["--lmbda", "1", "--prompt_len", "8", "--max_new_tokens", "0"], "--max_new_tokens must be a whole number"),
        (["--lmbda", "1", "--prompt_len", "32"], "--prompt_len 32 must be shorter than --seq_len 32"),
        (["--lmbda", "1", "--prompt_len", "8", "--teacher_cache", "somewhere"], "cannot score new sequences"),
    ],
)
def test_bad_on_policy_flags_fail_before_writing_anything(
    extra, message, tiny_teacher_dir, text_corpus, tmp_path, capsys
):
    from distily.cli import main

    out = tmp_path / "run"
    assert main([*base_args(tiny_teacher_dir, text_corpus, out), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


# -- the batch and the completion-only loss -----------------------------------------------------------------------


def test_completion_batch_masks_the_prompt_and_the_padding():
    batch = completion_batch([[5, 6, 7], [8, 9]], [[10, 2], [11, 12, 13]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 10, 2], [8, 9, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 10, 2], [-100, -100, 11, 12, 13]]
    short = completion_batch([[5], [8, 9]], [[10], [11]], pad_token_id=0)
    assert short["input_ids"].tolist() == [[5, 10, 0], [8, 9, 11]]
    assert short["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert short["labels"].tolist() == [[-100, 10, -100], [-100, -100, 11]]
    with pytest.raises(ValueError, match="at least one token"):
        completion_batch([[]], [[3]], pad_token_id=0)


def perturbed_pair():
    """The tiny pair with the student moved away from the teacher's layers (a divergence well above rounding)."""
    teacher, student = make_pair()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return teacher, student


def test_the_loss_covers_the_completion_tokens_only(tmp_path):
    teacher, student = perturbed_pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=on_policy_config(tmp_path))
    batch = completion_batch([[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15, 16]], pad_token_id=PAD)
    student.train()
    loss = trainer.compute_loss(student, batch)
    total, count = reference_reverse_kl(student, teacher, batch)
    assert count == 6  # 2 + 4 completion tokens; the prompts' 6 tokens and the padding are not scored
    assert float(total / count) > 0.05
    # float32 log-softmax against a float64 reference: a few ulps of the per-token terms.
    torch.testing.assert_close(loss.double(), total / count, rtol=1e-5, atol=0)
    # The same rows scored on every position give a different value: the prompt really is left out.
    everything = dict(batch, labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100))
    all_total, all_count = reference_reverse_kl(student, teacher, everything)
    assert all_count == 10 and abs(float(all_total / all_count) - float(loss.detach())) > 1e-4


def test_on_policy_steps_are_normalised_by_the_completion_tokens_across_accumulation(tmp_path):
    teacher, student = make_pair()
    config = on_policy_config(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(8))
    fake = FakeEngine(trainer.on_policy.student.settings)
    trainer.on_policy.student = fake
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    assert len(fake.calls) == 2  # one generation per micro-batch
    # Replay the step's two sampled micro-batches on the initial weights: one loss over all completion tokens.
    reference = make_pair()[1]
    reference.load_state_dict(initial)
    replay = FakeEngine(fake.settings)
    sums = [
        reference_reverse_kl(reference, teacher, completion_batch(p, replay.generate(p, s), PAD)) for p, s in fake.calls
    ]
    expected = sum(t for t, _ in sums) / sum(n for _, n in sums)
    logged = trainer.state.log_history[0]
    # Trainer rounds the logged loss to 4 decimals.
    assert logged["loss"] == pytest.approx(float(expected), abs=6e-5)
    assert logged["on_policy_fraction"] == 1.0
    assert logged["eos_rate"] == pytest.approx(2 / 4)  # row 0 of each micro-batch ends in EOS
    assert "generation_seconds" in logged and logged["generation_seconds"] >= 0


def test_lmbda_zero_is_bitwise_todays_training(tmp_path):
    runs = []
    for name, extra in (("plain", {}), ("lmbda0", dict(lmbda=0.0, prompt_len=4, max_new_tokens=3))):
        teacher, student = make_pair()
        config = make_config(tmp_path / name, max_steps=3, loss="reverse_kl", **extra)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(16)
        )
        assert trainer.on_policy is None
        trainer.train()
        runs.append((student.state_dict(), [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]))
    (plain, plain_losses), (zero, zero_losses) = runs
    assert plain_losses == zero_losses
    for name, value in plain.items():
        assert torch.equal(zero[name], value), name


# -- engines -----------------------------------------------------------------------------------------------------


def test_cut_at_eos_and_left_padding():
    assert cut_at_eos([5, 2, 7, 2], (2,), 0) == [5, 2]
    assert cut_at_eos([5, 6, 0, 0], (2,), 0) == [5, 6]
    assert cut_at_eos([5, 9, 1], (2, 9), 0) == [5, 9]
    ids, mask = left_pad([[4, 5, 6], [7]], pad_token_id=0, device="cpu")
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_transformers_engine_is_seeded_left_padded_and_stops_at_eos():
    torch.manual_seed(0)
    student = make_pair()[1]
    engine = TransformersEngine(lambda: student, settings(max_new_tokens=6))
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    state = torch.random.get_rng_state()
    first = engine.generate(prompts, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the training RNG is left as it was
    assert engine.generate(prompts, seed=7) == first
    assert engine.generate(prompts, seed=8) != first
    assert all(len(c) == 6 for c in first if EOS not in c)
    # Greedy: the left-padded row completes exactly as the same prompt alone (padding is masked out).
    greedy = TransformersEngine(lambda: student, settings(max_new_tokens=6, temperature=0.0))
    together = greedy.generate(prompts, seed=0)
    assert together[1] == greedy.generate([prompts[1]], seed=0)[0]
    assert together[0] == greedy.generate([prompts[0]], seed=0)[0]
    # A completion ends at its first EOS: name the token greedy decoding emits third as the EOS.
    eos = together[0][2]
    stopped = TransformersEngine(lambda: student, settings(max_new_tokens=6, temperature=0.0, eos_token_ids=(eos,)))
    cut = stopped.generate([prompts[0]], seed=0)[0]
    assert cut == together[0][: together[0].index(eos) + 1] and cut[-1] == eos
    assert student.training  # generate switched to eval mode and back


class FakeLLM:
    """vLLM's ``LLM`` as far as :class:`VLLMEngine` uses it: generate, load_weights, reset_prefix_cache."""

    def __init__(self):
        self.loaded: list[str] = []
        self.requests = []
        runner = type("Runner", (), {"model": type("Model", (), {"load_weights": self._load})()})()
        worker = type("Worker", (), {"model_runner": runner})()
        executor = type("Executor", (), {"driver_worker": worker})()
        self.llm_engine = type("Engine", (), {"model_executor": executor})()
        self.resets = 0

    def _load(self, weights):
        self.loaded += [name for name, _ in weights]

    def reset_prefix_cache(self):
        self.resets += 1


def test_vllm_engine_pushes_the_weights_every_sync_steps():
    student = make_pair()[1]
    llm = FakeLLM()
    engine = VLLMEngine(student, None, settings(), sync_steps=2, llm=llm)
    for step in range(1, 6):
        engine.sync(student, step)
    assert engine.synced_steps == [2, 4] and llm.resets == 2
    assert llm.loaded == list(student.state_dict()) * 2


def test_vllm_weights_of_a_lora_student_are_merged_under_the_plain_names():
    from distily.config import PeftArguments
    from distily.lora import apply_lora

    student = make_pair()[1]
    plain_names = list(student.state_dict())
    lora = apply_lora(student, PeftArguments(lora_r=2, lora_alpha=4))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.base_layer.weight.detach().clone()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    merged = {name: tensor.clone() for name, tensor in vllm_weights(lora)}
    assert list(merged) == plain_names
    # The pushed q_proj is base + B·A·scale, computed by hand from the adapter's tensors ...
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], base + delta)
    assert not torch.allclose(delta, torch.zeros_like(delta))
    # ... and the student's own base weight is unmerged again afterwards (training goes on with the adapters).
    torch.testing.assert_close(layer.base_layer.weight, base)


# -- prompts -------------------------------------------------------------------------------------------------------


def test_block_prompts_take_the_start_of_each_block():
    inputs = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9], [3, 4, 5, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
    }
    assert BlockPrompts(3).prompts(inputs, draw=0) == [[5, 6, 7], [3, 4]]


def test_chat_prompts_are_rendered_and_drawn_in_a_seeded_order(tmp_path, tiny_tokenizer):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "def add"}, {"messages": [{"role": "user", "content": "class Point"}]}, {"input": "for i in"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    requests = read_prompt_requests(path)
    assert requests[0] == {"messages": [{"role": "user", "content": "def add"}]}
    assert requests[2] == {"input": "for i in"}
    ids = [render_prompt(tiny_tokenizer, r) for r in requests]
    # No chat template: the plain "User: ... Assistant:" rendering; raw input stays as it is.
    assert tiny_tokenizer.decode(ids[0]).replace(" ", "") == "User:defadd\n\nAssistant:".replace(" ", "")
    assert ids[2] == tiny_tokenizer("for i in", add_special_tokens=False)["input_ids"]
    source = ChatPrompts(ids, seed=1)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long)}
    drawn = [p for draw in range(3) for p in source.prompts(batch, draw)]
    assert sorted(map(tuple, drawn[:3])) == sorted(map(tuple, ids))  # each pass is a permutation of the prompts
    assert drawn == [p for draw in range(3) for p in ChatPrompts(ids, seed=1).prompts(batch, draw)]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 has none of"):
        read_prompt_requests(tmp_path / "bad.jsonl")


# -- replay ----------------------------------------------------------------------------------------------------------


def test_replay_buffer_returns_what_was_stored_and_round_trips(tmp_path):
    buffer = ReplayBuffer(3)
    buffer.add([[1], [2], [3], [4]], [[10], [20], [30], [40]])
    assert len(buffer) == 3  # the oldest sample was dropped
    prompts, completions = buffer.sample(3, torch.Generator().manual_seed(0))
    assert sorted(zip(map(tuple, prompts), map(tuple, completions), strict=True)) == [
        ((2,), (20,)),
        ((3,), (30,)),
        ((4,), (40,)),
    ]
    buffer.save(tmp_path / "buffer.json")
    loaded = ReplayBuffer(3)
    loaded.load(tmp_path / "buffer.json")
    assert loaded.state_dict() == buffer.state_dict()
    assert loaded.sample(2, torch.Generator().manual_seed(5)) == buffer.sample(2, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="holds 3 samples, 4 were asked for"):
        buffer.sample(4, torch.Generator())


def test_step_seed_separates_steps_micro_batches_and_processes():
    seeds = {step_seed(0, step, micro, rank) for step in range(20) for micro in range(3) for rank in range(4)}
    assert len(seeds) == 240 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(1, 2, 3) == step_seed(1, 2, 3) != step_seed(1, 3, 2)


def test_sampler_mixes_sources_by_lmbda_and_replays(tmp_path):
    teacher, student = make_pair()
    config = on_policy_config(tmp_path, lmbda=0.5, replay_buffer_size=8, replay_ratio=0.5, seq_kd=True, seed=4)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config)
    sampler = trainer.on_policy
    sampler.student, sampler.teacher = FakeEngine(sampler.student.settings), FakeEngine(sampler.student.settings)
    data = {"input_ids": torch.arange(3, 3 + 2 * SEQ).view(2, SEQ), "labels": torch.arange(3, 3 + 2 * SEQ).view(2, SEQ)}
    data["attention_mask"] = torch.ones_like(data["input_ids"])
    kinds = []
    for step in range(40):
        batch = sampler.batch(data, step, 0)
        kinds.append("data" if batch is data else "x")
    logs = sampler.pop_logs(40)
    assert kinds.count("data") == 0  # seq_kd: every batch that is not on-policy is the teacher's
    assert len(sampler.teacher.calls) + len(sampler.student.calls) <= 40
    student_batches = len(sampler.student.calls)
    assert 5 <= student_batches <= 20 and 5 <= len(sampler.teacher.calls) <= 30
    assert 0 < logs["replay_fraction"] < 1 and 0 < logs["on_policy_fraction"] < 1
    assert 0 < logs["teacher_sample_fraction"] < 1
    # Every replayed batch was stored before: the buffer holds the student's fresh samples only.
    stored = {(tuple(p), tuple(c)) for p, c in sampler.buffer.state_dict()["samples"]}
    replay = FakeEngine(sampler.student.settings)
    fresh = {
        (tuple(p), tuple(c))
        for prompts, seed in sampler.student.calls
        for p, c in zip(prompts, replay.generate(prompts, seed), strict=True)
    }
    assert stored and len(stored) <= 8 and stored <= fresh


# -- training: logs, checkpoints and exact resume ---------------------------------------------------------------


def test_resumed_on_policy_run_ends_with_the_uninterrupted_weights(tmp_path):
    common = dict(
        lmbda=0.75,
        prompt_len=6,
        max_new_tokens=5,
        replay_buffer_size=4,
        replay_ratio=0.5,
        generation_temperature=1.0,
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=2,
        seed=3,
        loss="reverse_kl",
    )
    data = random_blocks(40)
    teacher, student = make_pair()
    full = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path / "full", **common), train_dataset=data
    )
    full.train()
    expected = {k: v.detach().clone() for k, v in student.state_dict().items()}
    logs = [entry for entry in full.state.log_history if "loss" in entry]
    assert any(entry["replay_fraction"] > 0 for entry in logs[4:])  # the resumed part replays stored samples
    assert any(entry["completion_length"] > 0 for entry in logs)

    teacher, student = make_pair()
    config = make_config(tmp_path / "parts", **common)
    first = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
    first.add_callback(StopAt(4))
    first.train()
    checkpoint = tmp_path / "parts" / "out" / "checkpoint-4"
    saved = json.loads((checkpoint / "replay_buffer-rank0.json").read_text())
    assert saved == first.on_policy.buffer.state_dict() and len(saved["samples"]) >= 2

    teacher, student = make_pair()
    second = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 8
    for name, value in expected.items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=1e-5, msg=name)
    assert second.on_policy.buffer.state_dict() == full.on_policy.buffer.state_dict()

    # A checkpoint without the buffer cannot be resumed with replay: an error, not a silently different run.
    (checkpoint / "replay_buffer-rank0.json").unlink()
    teacher, student = make_pair()
    third = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
    with pytest.raises(ConfigError, match="needs the replay buffer"):
        third.train(resume_from_checkpoint=str(checkpoint))


def test_on_policy_training_with_lora_and_bitnet_students(tmp_path):
    from distily.bitnet import BitNetOptions, convert_to_bitnet
    from distily.config import PeftArguments
    from distily.lora import apply_lora

    for name in ("lora", "bitnet"):
        teacher, student = make_pair()
        student = (
            apply_lora(student, PeftArguments(lora_r=2, lora_alpha=4))
            if name == "lora"
            else convert_to_bitnet(student, BitNetOptions())
        )
        trainable = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        config = on_policy_config(tmp_path / name, max_steps=2)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(8))
        trainer.train()
        logged = trainer.state.log_history[0]
        assert logged["on_policy_fraction"] == 1.0 and 1 <= logged["completion_length"] <= 4
        assert math.isfinite(logged["loss"])
        changed = [n for n, p in student.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
        assert changed, name


def test_sampling_needs_a_live_teacher(tmp_path):
    _, student = make_pair()
    config = make_config(tmp_path, seq_kd=True, prompt_len=4, alpha=0.0)  # plain CE on the teacher's samples
    with pytest.raises(ConfigError, match="need a live teacher"):
        DistillationTrainer(
            model=student, teacher_model=None, args=config, train_dataset=Dataset.from_dict({"input_ids": [[3] * SEQ]})
        )


@pytest.mark.slow
def test_ddp_processes_sample_their_own_share_save_their_buffers_and_resume(tiny_teacher_dir, text_corpus, tmp_path):
    """2 processes on-policy with replay: each samples its own rows (own prompts, own seeds) and keeps its own
    buffer in every checkpoint; the run resumed from its step-2 checkpoint ends with the same weights."""
    import shutil

    from safetensors.torch import load_file

    from .test_distributed import launch, logged, run_args

    out = tmp_path / "ddp"
    flags = ["--lmbda", "1", "--prompt_len", "8", "--max_new_tokens", "4", "--replay_buffer_size", "4"]
    flags += ["--replay_ratio", "0.5", "--loss", "reverse_kl"]
    launch(run_args(tiny_teacher_dir, text_corpus, out, tmp_path / "cache", 2, *flags))
    assert logged(out, "on_policy_fraction") == [1.0] * 4
    buffers = [json.loads((out / "checkpoint-2" / f"replay_buffer-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(b["samples"] for b in buffers)
    prompts = [{tuple(p) for p, _ in b["samples"]} for b in buffers]
    assert not prompts[0] & prompts[1]  # each process sampled completions of its own blocks
    weights = load_file(out / "model.safetensors")

    manifest = json.loads((out / "distily_run.json").read_text())
    manifest["status"] = "running"
    (out / "distily_run.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "checkpoint-4")
    launch(
        run_args(tiny_teacher_dir, text_corpus, out, tmp_path / "cache", 2, *flags, "--resume_from_checkpoint", "true")
    )
    resumed = load_file(out / "model.safetensors")
    for name, value in weights.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_prompts_from_a_synth_folder_drive_training(tmp_path, tiny_tokenizer):
    folder = tmp_path / "synth"
    folder.mkdir()
    (folder / "synth_manifest.json").write_text("{}")
    rows = [
        {"id": f"s{i}", "prompt_id": f"p{i // 2}", "messages": [{"role": "user", "content": f"def f{i // 2}"}]}
        for i in range(6)
    ]  # two samples per prompt: one request each
    (folder / "samples-00000.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    requests = read_prompt_requests(folder)
    assert [r["messages"][0]["content"] for r in requests] == ["def f0", "def f1", "def f2"]

    teacher, student = make_pair()
    config = make_config(
        tmp_path, lmbda=1.0, prompts=str(folder), max_new_tokens=3, max_steps=1, loss="reverse_kl", seq_len=64
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=random_blocks(8),
        processing_class=tiny_tokenizer,
    )
    source = trainer.on_policy.prompts
    assert isinstance(source, ChatPrompts) and len(source) == 3
    fake = FakeEngine(trainer.on_policy.student.settings)
    trainer.on_policy.student = fake
    trainer.train()
    rendered = {tuple(render_prompt(tiny_tokenizer, r)) for r in requests}
    assert {tuple(p) for p in fake.calls[0][0]} <= rendered
