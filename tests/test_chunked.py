"""The chunked loss path: the same numbers as full logits (losses, gradients, eval metrics), less memory.

Every comparison runs one ``compute_loss`` + backward on the chunked path and on the plain path (full logits)
from identical student copies, in float32, and compares the loss and the gradient of every student parameter
(the LM head and tied embeddings included). Dropout is off so both passes see the same network.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from transformers import GPT2LMHeadModel, LlamaForCausalLM

import distily
from distily import ConfigError, DistillationConfig, DistillationTrainer, build_student
from distily.chunked import (
    LogitsTeacherSignal,
    TokenObjective,
    auto_chunk_size,
    chunked_head_objective,
    hidden_state_path_problem,
)
from distily.config import config_to_dict, configs_from_dict
from distily.losses import LOSSES, build_loss, distillation_loss, forward_kl

from .conftest import TINY_VOCAB, tiny_gpt2_config, tiny_llama_config

SEQ = 17
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def make_pair(arch: str = "llama"):
    torch.manual_seed(0)
    if arch == "gpt2":  # GPT-2 ties its head to the token embeddings
        teacher = GPT2LMHeadModel(tiny_gpt2_config(**NO_DROPOUT))
        student = build_student(teacher, {"n_layer": 2})
    else:
        teacher = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=arch == "llama_tied"))
        student = build_student(teacher, {"num_hidden_layers": 2})
    with torch.no_grad():  # a random head is near-uniform; sharpen both so the divergences are far from zero
        teacher.get_output_embeddings().weight.mul_(8.0)
        student.get_output_embeddings().weight.mul_(4.0)
    return teacher, student


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows: one full, one with masked labels (a prompt), one right-padded (attention mask zeros)."""
    ids = torch.randint(3, TINY_VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[1, :6] = -100
    ids[2, 11:] = 0
    attention_mask[2, 11:] = 0
    labels[2, 11:] = -100
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}


def make_config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        seq_len=SEQ,
        per_device_eval_batch_size=4,
        disable_tqdm=True,
        save_strategy="no",
    )
    values.update(overrides)
    return DistillationConfig(**values)


def loss_and_grads(tmp_path, teacher, student, batch, chunked: str, num_items_in_batch=None, **overrides):
    student = copy.deepcopy(student)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path, chunked_loss=chunked, **overrides)
    )
    assert trainer.chunked == (chunked == "true")
    student.train()
    loss = trainer.compute_loss(student, batch, num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), grads, trainer


def assert_same(plain, chunked, rtol=1e-5):
    (loss_p, grads_p, _), (loss_c, grads_c, _) = plain, chunked
    assert loss_p.item() > 1e-3  # a real, non-trivial objective
    assert loss_c.item() == pytest.approx(loss_p.item(), rel=rtol, abs=1e-7)
    assert grads_c.keys() == grads_p.keys()
    for name, grad in grads_p.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_c[name], grad, rtol=rtol, atol=rtol * float(grad.abs().max()), msg=name)


@pytest.fixture
def registered_loss():
    """A user-registered loss (squared Hellinger), unregistered afterwards."""

    @distily.register_loss("test_chunked_hellinger")
    def hellinger(student_logits, teacher_logits, *, scale: float = 1.0):
        """scale · (1 − Σ √(p q))"""
        p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
        return scale * (1.0 - (p * q).sqrt().sum(-1))

    yield "test_chunked_hellinger"
    LOSSES.unregister("test_chunked_hellinger")


# -- equality with the plain path ---------------------------------------------------------------------------------

LOSS_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.3}),
    ("mse", {}),
    ("registered", {"scale": 2.0}),
]


@pytest.mark.parametrize(("loss", "loss_kwargs"), LOSS_CASES, ids=[case[0] for case in LOSS_CASES])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_and_gradients_equal_the_plain_path(tmp_path, registered_loss, loss, loss_kwargs, alpha):
    loss = registered_loss if loss == "registered" else loss
    teacher, student = make_pair()
    batch = padded_batch()
    common = dict(loss=loss, loss_kwargs=loss_kwargs, alpha=alpha, temperature=2.0, loss_chunk_size=7)
    plain = loss_and_grads(tmp_path, teacher, student, batch, "false", **common)
    chunked = loss_and_grads(tmp_path, teacher, student, batch, "true", **common)
    assert_same(plain, chunked)


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gpt2"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_architectures_and_chunk_sizes(tmp_path, arch, chunk):
    teacher, student = make_pair(arch)
    batch = padded_batch(seed=1)
    common = dict(loss="generalized_jsd", loss_kwargs={"beta": 0.5}, alpha=0.7, temperature=1.5, loss_chunk_size=chunk)
    plain = loss_and_grads(tmp_path, teacher, student, batch, "false", **common)
    chunked = loss_and_grads(tmp_path, teacher, student, batch, "true", **common)
    assert_same(plain, chunked)
    head = (
        "transformer.wte.weight"
        if arch == "gpt2"
        else ("model.embed_tokens.weight" if arch == "llama_tied" else "lm_head.weight")
    )
    assert head in chunked[1]  # the head's (tied) weight got its gradient through the chunked function


def test_num_items_in_batch_normalises_both_paths_alike(tmp_path):
    teacher, student = make_pair()
    batch = padded_batch(seed=2)
    plain = loss_and_grads(tmp_path, teacher, student, batch, "false", num_items_in_batch=torch.tensor(100))
    chunked = loss_and_grads(tmp_path, teacher, student, batch, "true", num_items_in_batch=torch.tensor(100))
    assert_same(plain, chunked)


def test_chunked_loss_is_the_textbook_formula(tmp_path):
    """Independently of the plain path: T² · mean forward KL over the real tokens, from the models' logits."""
    teacher, student = make_pair()
    batch = padded_batch(seed=3)
    loss, _, _ = loss_and_grads(tmp_path, teacher, student, batch, "true", temperature=2.0, loss_chunk_size=4)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    mask = batch["labels"][:, 1:] != -100
    log_p, log_q = (t[mask] / 2).log_softmax(-1), (s[mask] / 2).log_softmax(-1)
    expected = 4.0 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_loss_sees_one_chunk_at_a_time(tmp_path):
    """Chunks of 5 over 37 real tokens: 7 calls of 5 rows and one of 2."""
    shapes = []

    @distily.register_loss("test_chunk_spy")
    def spy(student_logits, teacher_logits):
        shapes.append(tuple(student_logits.shape))
        return forward_kl(student_logits, teacher_logits)

    try:
        teacher, student = make_pair()
        batch = padded_batch()
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        assert tokens == 16 + 11 + 10
        shapes.clear()
        loss_and_grads(tmp_path, teacher, student, batch, "true", loss="test_chunk_spy", loss_chunk_size=5)
        # DistillationConfig checks the loss once on a dummy token; then one call per chunk, forward only (the
        # gradient of each chunk is taken right away, nothing is recomputed in backward).
        assert shapes == [(1, 4)] + [(5, TINY_VOCAB)] * 7 + [(2, TINY_VOCAB)]
    finally:
        LOSSES.unregister("test_chunk_spy")


def test_a_teacher_signal_from_a_cache_plugs_into_the_chunked_path(tmp_path):
    """The seam a recorded teacher uses: override teacher_signal() to serve stored logits instead of a live
    forward pass. With the live teacher's own logits stored, loss and gradients are the live ones."""
    teacher, student = make_pair()
    batch = padded_batch(seed=7)
    with torch.no_grad():
        stored = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    served = []

    class CachedTeacherTrainer(DistillationTrainer):
        def teacher_signal(self, inputs, mask, chunked):
            served.append(int(mask.sum()))
            return LogitsTeacherSignal(stored[mask])

    live = loss_and_grads(tmp_path, teacher, student, batch, "true", alpha=0.5, temperature=2.0, loss_chunk_size=6)
    model = copy.deepcopy(student)
    config = make_config(tmp_path, chunked_loss="true", alpha=0.5, temperature=2.0, loss_chunk_size=6)
    trainer = CachedTeacherTrainer(model=model, teacher_model=teacher, args=config)
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    cached = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, trainer)
    assert served == [16 + 11 + 10]
    assert_same(live, cached)


def test_no_real_tokens_gives_zero_loss_and_zero_gradients(tmp_path):
    teacher, student = make_pair()
    batch = padded_batch()
    batch["labels"][:] = -100
    for chunked in ("false", "true"):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student), teacher_model=teacher, args=make_config(tmp_path, chunked_loss=chunked)
        )
        model = trainer.model
        model.train()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_bf16_teacher_matches_the_plain_path(tmp_path):
    """A bf16 teacher (as on GPUs): its head runs in bf16 on both paths, the divergence in float32."""
    teacher, student = make_pair()
    teacher = teacher.to(torch.bfloat16)
    batch = padded_batch(seed=4)
    plain = loss_and_grads(tmp_path, teacher, student, batch, "false", loss_chunk_size=8)
    chunked = loss_and_grads(tmp_path, teacher, student, batch, "true", loss_chunk_size=8)
    # bf16 matmuls of 8 rows and of the whole batch may round a logit differently: 1e-3, not 1e-5.
    assert_same(plain, chunked, rtol=1e-3)


def test_bf16_autocast_student_matches_the_plain_path(tmp_path):
    """Mixed precision: the head runs under autocast, so the chunked path goes through autograd (generic head)."""
    teacher, student = make_pair()
    batch = padded_batch(seed=5)
    results = []
    for chunked in ("false", "true"):
        model = copy.deepcopy(student)
        trainer = DistillationTrainer(
            model=model, teacher_model=teacher, args=make_config(tmp_path, chunked_loss=chunked, loss_chunk_size=6)
        )
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, trainer))
    assert_same(results[0], results[1], rtol=2e-2)


def test_lora_student_with_a_lora_head(tmp_path):
    """A PEFT student whose head is LoRA-wrapped: a generic head module, gradients only for the adapters."""
    from peft import LoraConfig, get_peft_model

    teacher, student = make_pair()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    peft_student = get_peft_model(student, lora)
    assert hidden_state_path_problem(peft_student) is None
    batch = padded_batch(seed=6)
    plain = loss_and_grads(tmp_path, teacher, peft_student, batch, "false", alpha=0.5, loss_chunk_size=9)
    chunked = loss_and_grads(tmp_path, teacher, peft_student, batch, "true", alpha=0.5, loss_chunk_size=9)
    assert_same(plain, chunked)
    assert any("lm_head.lora_A" in name for name in chunked[1])
    assert all("lora_" in name for name in chunked[1])


# -- evaluation ----------------------------------------------------------------------------------------------------


def test_eval_metrics_equal_the_plain_path(tmp_path):
    teacher, student = make_pair()
    rows = [padded_batch(seed)["input_ids"][0].tolist() for seed in range(5)] + [list(range(3, 3 + SEQ - 4))]
    eval_data = Dataset.from_dict({"input_ids": rows})  # 6 rows, the last one short (padded by the collator)
    metrics = {}
    for chunked in ("false", "true"):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student),
            teacher_model=teacher,
            args=make_config(tmp_path, chunked_loss=chunked, alpha=0.5, loss_chunk_size=10),
            eval_dataset=eval_data,
        )
        metrics[chunked] = trainer.evaluate()
    plain, chunked = metrics["false"], metrics["true"]
    for key in ("eval_loss", "eval_student_ppl", "eval_teacher_ppl"):
        assert chunked[key] == pytest.approx(plain[key], rel=1e-5), key
    assert chunked["eval_tokens"] == plain["eval_tokens"] == 5 * (SEQ - 1) + (SEQ - 5)
    # And the perplexities are the models' own: exp of the mean next-token cross-entropy over every real token.
    total, tokens = 0.0, 0
    with torch.no_grad():
        for model, key in ((teacher, "eval_teacher_ppl"), (student, "eval_student_ppl")):
            total, tokens = 0.0, 0
            for row in rows:
                ids = torch.tensor([row])
                total += model(input_ids=ids, labels=ids).loss.item() * (len(row) - 1)
                tokens += len(row) - 1
            assert chunked[key] == pytest.approx(math.exp(total / tokens), rel=1e-5), key


def test_compute_metrics_gets_full_logits(tmp_path):
    """Metrics computed from logits are evaluated on the plain path, so they still receive the logits."""
    teacher, student = make_pair()
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"rows": float(prediction.predictions.shape[0])}

    eval_data = Dataset.from_dict({"input_ids": [padded_batch(s)["input_ids"][0].tolist() for s in range(3)]})
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_config(tmp_path, chunked_loss="true"),
        eval_dataset=eval_data,
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert seen == [(3, SEQ, TINY_VOCAB)]
    assert metrics["eval_rows"] == 3.0


# -- the building blocks -------------------------------------------------------------------------------------------


def test_chunked_head_objective_gradients_match_autograd():
    """The function alone, on a linear head with a bias, float64: values and gradients equal autograd's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=True).double()
    hidden = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(13, 11, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (13,))
    objective = TokenObjective(
        labels=labels,
        loss_fn=build_loss("generalized_jsd", {"beta": 0.2}),
        teacher=LogitsTeacherSignal(teacher_logits),
        temperature=1.7,
        kd_weight=0.6,
        ce_weight=0.4,
        student_ce=True,
        teacher_ce=True,
    )
    total, stats = chunked_head_objective(hidden, head, objective, chunk_size=4)
    (total * 3.0).backward()  # a non-unit upstream gradient
    got = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]

    hidden.grad, head.weight.grad, head.bias.grad = None, None, None
    expected_total, expected_stats = objective(head(hidden), slice(None))
    (expected_total * 3.0).backward()
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-12)
    torch.testing.assert_close(stats, expected_stats, rtol=1e-12, atol=1e-12)
    for value, reference in zip(got, [hidden.grad, head.weight.grad, head.bias.grad], strict=True):
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    kd = distillation_loss(head(hidden), teacher_logits, None, objective.loss_fn, 1.7, num_tokens=1.0)
    assert stats[0].item() == pytest.approx(kd.item(), rel=1e-12)


@pytest.mark.parametrize(
    ("vocab", "device", "expected"),
    [(49152, "cpu", 128), (32768, "cpu", 256), (131072, "cpu", 64), (128, "cpu", 65536), (49152, "cuda", 1024),
     (262144, "cuda", 256), (10**9, "cpu", 16)],
)  # fmt: skip
def test_auto_chunk_size(vocab, device, expected):
    assert auto_chunk_size(vocab, device) == expected


class SoftCappedLlama(LlamaForCausalLM):
    """Post-processes its logits (like Gemma's soft-capping): head(hidden) is not its output."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = 5.0 * torch.tanh(outputs.logits / 5.0)
        return outputs


def test_models_that_post_process_logits_fall_back_or_fail_clearly(tmp_path, caplog):
    torch.manual_seed(0)
    teacher = SoftCappedLlama(tiny_llama_config())
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    student = build_student(LlamaForCausalLM(tiny_llama_config()), {"num_hidden_layers": 2})
    assert "post-processes its logits" in hidden_state_path_problem(teacher, teacher=True)
    with caplog.at_level("WARNING", logger="distily.trainer"):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path))
    assert not trainer.chunked
    assert "teacher: SoftCappedLlama's logits are not its output embeddings" in caplog.text
    with pytest.raises(ConfigError, match=r"--chunked_loss true cannot be used here: teacher: SoftCappedLlama"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, chunked_loss="true"))


# -- configuration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [("auto", "auto"), (True, "true"), (False, "false"), ("TRUE", "true"), ("off", "false"), ("on", "true")],
)
def test_chunked_loss_flag_values(tmp_path, given, stored):
    assert make_config(tmp_path, chunked_loss=given).chunked_loss == stored


def test_bad_chunk_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--chunked_loss must be one of auto, true, false, got 'sometimes'"):
        make_config(tmp_path, chunked_loss="sometimes")
    for bad in (-1, 2.5, True, "128"):
        with pytest.raises(ConfigError, match=r"--loss_chunk_size must be a whole number of tokens \(0 for automatic"):
            make_config(tmp_path, loss_chunk_size=bad)


def test_chunk_flags_round_trip_through_the_saved_config(tmp_path):
    from distily.config import DataArguments, StudentArguments, TeacherArguments

    configs = (TeacherArguments(teacher="t"), StudentArguments(), DataArguments(), make_config(tmp_path))
    configs[3].chunked_loss, configs[3].loss_chunk_size = "false", 96
    saved = config_to_dict(*configs)
    assert saved["chunked_loss"] == "false" and saved["loss_chunk_size"] == 96

    def distillation(loaded):  # found by type: the run's dataclasses grow (PEFT, export) in the middle and at the end
        return next(config for config in loaded if isinstance(config, DistillationConfig))

    assert distillation(configs_from_dict(saved)) == configs[3]
    # The CLI spelling: a YAML `false` is a bool, and is stored as the string.
    assert distillation(configs_from_dict({**saved, "chunked_loss": False})).chunked_loss == "false"


# -- memory --------------------------------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from distily import DistillationConfig, DistillationTrainer, build_student
    torch.manual_seed(0)
    torch.set_num_threads(1)
    vocab, seq, chunked = 32768, 256, sys.argv[1]
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                         tie_word_embeddings=True)
    teacher = LlamaForCausalLM(config).eval()
    student = build_student(teacher, {"num_hidden_layers": 1})
    args = DistillationConfig(output_dir=sys.argv[2], use_cpu=True, report_to="none", seq_len=seq,
                              chunked_loss=chunked, loss_chunk_size=64, alpha=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    ids = torch.randint(1, vocab, (4, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    def step():
        trainer.compute_loss(student, batch).backward()
        student.zero_grad(set_to_none=False)
    step()  # warm-up: gradient buffers exist from here on
    def status(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    step()
    print(json.dumps({"step_kib": status("VmHWM") - before}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_chunked_step_peak_memory_is_far_below_the_plain_step(tmp_path):
    """4 × 256 tokens, vocabulary 32768: full logits are 128 MiB per float32 tensor, and a plain step holds
    several of them at once (both models' logits, softmaxes, the gradient); a chunked step of 64 tokens holds
    8 MiB ones. Measured as the rise of the peak resident set size over one step, each path in a fresh process."""
    step_kib = {}
    for chunked in ("false", "true"):
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, chunked, str(tmp_path / chunked)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        step_kib[chunked] = json.loads(done.stdout.strip().splitlines()[-1])["step_kib"]
    logits_kib = 4 * 255 * 32768 * 4 / 1024
    assert step_kib["false"] > 3 * logits_kib  # the plain step really holds several full-size tensors ...
    assert step_kib["true"] < 0.15 * step_kib["false"]  # ... and the chunked one a small fraction of that
