"""The recorded teacher: recording, storage, resuming, corruption, sparse losses and training from the cache."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch

from distily import DistillationConfig, DistillationTrainer
from distily.config import ConfigError, DataArguments, TeacherArguments
from distily.data import prepare_datasets
from distily.losses import build_loss, token_divergence
from distily.sparse import SparseTeacher, dense_log_probs, sparse_token_divergence, student_bucket_log_probs
from distily.teacher.recorded import (
    CacheError,
    RecordConfig,
    TeacherCache,
    VllmBackend,
    bytes_per_token,
    record,
)

from .conftest import TINY_VOCAB, tiny_llama_config

SEQ = 32
K = 16


def confident_teacher():
    """A tiny random Llama whose head is scaled up, so its distributions are peaked like a trained model's."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture
def teacher_dir(tmp_path, tiny_tokenizer):
    folder = tmp_path / "teacher"
    confident_teacher().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def data_args(corpus):
    # A seeded selection of blocks (what --max_train_blocks does), so rows are recorded out of block order.
    return DataArguments(dataset=str(corpus), eval_fraction=0.1, max_train_blocks=20, max_eval_blocks=6)


def record_args(teacher_dir, corpus, output, **overrides):
    values = dict(output=str(output), top_k=K, seq_len=SEQ, batch_size=3, rows_per_shard=4, device="cpu")
    values.update(overrides)
    data = data_args(corpus)
    return TeacherArguments(teacher=str(teacher_dir), teacher_dtype="float32"), data, RecordConfig(**values)


@pytest.fixture
def cache_dir(tmp_path, teacher_dir, text_corpus):
    output = tmp_path / "cache"
    record(*record_args(teacher_dir, text_corpus, output), progress=False)
    return output


@pytest.fixture
def bucket_cache_dir(tmp_path, teacher_dir, text_corpus):
    """A cache without tail samples: every loss is the bucket divergence."""
    output = tmp_path / "bucket-cache"
    record(*record_args(teacher_dir, text_corpus, output, tail_samples=0), progress=False)
    return output


def dataset_batch(cache_dir, corpus, tokenizer, split="train", rows=(0, 5, 2)):
    from distily.data import BlockCollator

    data = prepare_datasets(data_args(corpus), tokenizer, SEQ, block_index=True)
    dataset = data.train if split == "train" else data.eval
    return BlockCollator(tokenizer.pad_token_id)([dataset[i] for i in rows]), data


# ----------------------------------------------------------------------------------------------------------------
# Recording


def test_recorded_top_k_matches_a_direct_forward_pass(cache_dir, text_corpus, tiny_tokenizer):
    cache = TeacherCache(cache_dir, verify="all")
    manifest = cache.manifest
    assert manifest["status"] == "complete"
    assert manifest["identity"]["id_dtype"] == "uint16" and manifest["identity"]["top_k"] == K
    assert all(s["sha256"] for split in ("train", "eval") for s in manifest["splits"][split]["shards"])
    batch, data = dataset_batch(cache_dir, text_corpus, tiny_tokenizer)
    teacher = confident_teacher()
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1].float()
    log_probs = logits.log_softmax(-1)
    expected_values, expected_ids = log_probs.topk(K, dim=-1)
    rows = cache.rows_for("train", batch["block_index"].tolist())
    stored = cache.read_rows("train", rows)
    assert stored["top_ids"].shape == (3, SEQ - 1, K)
    # float16 log-probabilities: relative precision 2^-11; ids equal except where two values tie in float32.
    torch.testing.assert_close(stored["top_logprobs"], expected_values, rtol=2e-3, atol=2e-3)
    assert (stored["top_ids"] == expected_ids).float().mean() > 0.99
    expected_tail = log_probs.scatter(-1, expected_ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(stored["tail_logprob"], expected_tail.clamp(min=-100), rtol=2e-3, atol=2e-3)
    # The recorded distribution sums to one (top-k + tail).
    total = stored["top_logprobs"].exp().sum(-1) + stored["tail_logprob"].exp()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=5e-3)
    # Tail samples (8 by default): tokens outside the top k, with their log-probabilities.
    samples = stored["tail_sample_ids"]
    assert samples.shape == (3, SEQ - 1, 8) and manifest["identity"]["tail_samples"] == 8
    assert not (samples.unsqueeze(-1) == stored["top_ids"].unsqueeze(-2)).any()
    torch.testing.assert_close(stored["tail_sample_logprobs"], log_probs.gather(-1, samples), rtol=2e-3, atol=2e-3)
    labels = batch["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(-1)
    torch.testing.assert_close(stored["teacher_nll"], nll, rtol=1e-5, atol=1e-4)
    # Teacher perplexity of the eval split, from the full logits.
    eval_ids = torch.tensor(data.eval["input_ids"])
    with torch.no_grad():
        eval_logits = teacher(input_ids=eval_ids).logits[:, :-1]
    eval_ce = torch.nn.functional.cross_entropy(eval_logits.reshape(-1, TINY_VOCAB), eval_ids[:, 1:].reshape(-1))
    assert manifest["splits"]["eval"]["teacher_ppl"] == pytest.approx(math.exp(eval_ce.item()), rel=1e-4)


def test_bytes_per_token_at_k64_with_a_49k_vocabulary():
    settings = {"top_k": 64, "seq_len": 512, "id_dtype": "uint16", "tail_samples": 0}
    # ids 128 + log-probabilities 128 + tail 2 per position, the last position of a block not stored.
    assert bytes_per_token(settings) == pytest.approx((258 * 511 + 20) / 512)
    assert bytes_per_token(settings) < 258
    # Each tail sample: a uint16 id and a float16 log-probability.
    assert bytes_per_token({**settings, "tail_samples": 8}) == pytest.approx((290 * 511 + 20) / 512)
    assert bytes_per_token({**settings, "top_k": 56, "tail_samples": 8}) == bytes_per_token(settings)


def test_sampled_tail_follows_the_teacher_tail():
    from distily.teacher.recorded import top_k_of_logits

    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(0)) * 2
    logits[2, 5] = float("-inf")  # a token the model never emits is never drawn
    ids, _, tail, _, sample_ids, sample_logprobs = top_k_of_logits(
        logits, torch.zeros(3, dtype=torch.long), 4, 1.0, tail_samples=40000, seed=7
    )
    log_p = logits.log_softmax(-1)
    torch.testing.assert_close(sample_logprobs, log_p.gather(-1, sample_ids))
    counts = torch.zeros(3, 12).scatter_add_(-1, sample_ids, torch.ones_like(sample_ids, dtype=torch.float))
    expected = (log_p - tail[:, None]).exp().scatter(-1, ids, 0.0)
    torch.testing.assert_close(counts / 40000, expected, rtol=0, atol=0.01)  # ~4 standard errors
    assert counts[2, 5] == 0 and (counts.gather(-1, ids) == 0).all()
    again = top_k_of_logits(logits, torch.zeros(3, dtype=torch.long), 4, 1.0, tail_samples=40000, seed=7)[4]
    assert torch.equal(again, sample_ids)  # seeded: a resumed recording draws the same tokens


def test_an_interrupted_recording_resumes_and_ends_identical(tmp_path, teacher_dir, text_corpus, cache_dir):
    output = tmp_path / "resumed"
    args = record_args(teacher_dir, text_corpus, output)
    record(*args, progress=False, stop_after_shards=2)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "recording"
    with pytest.raises(CacheError, match="unfinished"):
        TeacherCache(output)
    # A kill between the shard's rename and the manifest update: the shard is there, the manifest does not know it.
    manifest["splits"]["train"]["shards"][1] = None
    (output / "manifest.json").write_text(json.dumps(manifest))
    # A kill during a shard's write leaves only a temporary folder, never a shard under its final name.
    (output / "train" / ".shard-00002.safetensors.abc.tmp").mkdir()
    shard_1 = (output / "train" / "shard-00001.safetensors").stat().st_mtime_ns
    record(*args, progress=False)
    resumed = TeacherCache(output, verify="all").manifest
    assert (output / "train" / "shard-00001.safetensors").stat().st_mtime_ns == shard_1  # kept, not recomputed
    straight = json.loads((cache_dir / "manifest.json").read_text())
    for split in ("train", "eval"):
        assert resumed["splits"][split]["shards"] == straight["splits"][split]["shards"]
    # Running it again is a no-op; a different recording into the same folder is refused.
    record(*args, progress=False)
    with pytest.raises(CacheError, match="top_k"):
        record(*record_args(teacher_dir, text_corpus, output, top_k=4), progress=False)


def test_a_flipped_byte_in_a_shard_is_refused(tmp_path, cache_dir, text_corpus, tiny_tokenizer):
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    shard = broken / "train" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01  # a bit in the last tensor's data: still a valid safetensors file
    shard.write_bytes(bytes(data))
    cache = TeacherCache(broken)
    batch, _ = dataset_batch(broken, text_corpus, tiny_tokenizer, rows=(0,))
    with pytest.raises(CacheError, match="corrupted"):
        cache.signal(batch, batch["labels"][:, 1:] != -100)
    with pytest.raises(CacheError, match="corrupted"):
        TeacherCache(broken, verify="all")
    # Shards that are intact still serve rows.
    assert TeacherCache(broken).read_rows("train", np.array([4, 5]))["top_ids"].shape[0] == 2  # rows of shard 1


# ----------------------------------------------------------------------------------------------------------------
# Sparse losses


def random_case(n=6, vocab=40, k=5, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=generator, dtype=dtype) * 2
    teacher = torch.randn(n, vocab, generator=generator, dtype=dtype) * 3
    log_p = teacher.log_softmax(-1)
    values, ids = log_p.topk(k, -1)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return student, teacher, SparseTeacher(ids, values, tail)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"])
def test_sparse_losses_are_lower_bounds_equal_when_the_tails_are_proportional(name):
    student, teacher, sparse = random_case()
    loss = build_loss(name)
    full = token_divergence(student, teacher, loss)
    bucket = sparse_token_divergence(student, sparse, loss)
    assert (bucket <= full + 1e-12).all()
    # A student whose tail is the teacher's tail, rescaled: no information lost by the buckets.
    proportional = teacher.log_softmax(-1).clone()
    top = student.log_softmax(-1).gather(-1, sparse.ids)
    tail_mass = (1 - top.exp().sum(-1)).log()
    proportional = proportional - sparse.tail_logprob[:, None] + tail_mass[:, None]
    proportional.scatter_(-1, sparse.ids, top)
    torch.testing.assert_close(
        sparse_token_divergence(proportional, sparse, loss), token_divergence(proportional, teacher, loss)
    )


def test_sparse_forward_kl_golden_value_and_identities():
    # Teacher buckets (0.5, 0.3 | tail 0.2); student (0.25, 0.25 | tail 0.5) over a 4-token vocabulary.
    sparse = SparseTeacher(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.3]]).log(), torch.tensor([0.2]).log())
    student = torch.tensor([[0.25, 0.25, 0.25, 0.25]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert sparse_token_divergence(student, sparse, build_loss("forward_kl")).item() == pytest.approx(expected)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(0.25 / 0.3) + 0.5 * math.log(0.5 / 0.2)
    assert sparse_token_divergence(student, sparse, build_loss("reverse_kl")).item() == pytest.approx(reverse)
    # KL(P, P) = 0; JSD(beta=0) is forward KL.
    _, teacher, sparse = random_case()
    for name in ("forward_kl", "reverse_kl", "generalized_jsd"):
        assert sparse_token_divergence(teacher, sparse, build_loss(name)).abs().max() < 1e-12
    student, _, _ = random_case(seed=3)
    torch.testing.assert_close(
        sparse_token_divergence(student, sparse, build_loss("generalized_jsd", {"beta": 0.0})),
        sparse_token_divergence(student, sparse, build_loss("forward_kl")),
    )
    torch.testing.assert_close(dense_log_probs(sparse, 40).logsumexp(-1), torch.zeros(6, dtype=torch.float64))


def test_sparse_forward_kl_shortcut_matches_autograd():
    """The closed-form gradient of bucket forward KL equals autograd through the generic bucket computation,
    also for a student that puts almost no mass outside the teacher's top k."""
    from distily.losses import forward_kl

    student, _, sparse = random_case(dtype=torch.float32)
    student[0, sparse.ids[0]] += 30.0  # tail mass ~e^-30 for the first token
    results = []
    for generic in (False, True):
        logits = student.clone().requires_grad_(True)
        loss = (lambda s, t: forward_kl(s, t)) if generic else forward_kl  # a wrapper takes the generic path
        value = sparse_token_divergence(logits, sparse, loss, temperature=2.0)
        (value * torch.arange(1.0, 7.0)).sum().backward()
        results.append((value.detach(), logits.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def with_tail_samples(sparse: SparseTeacher, teacher: torch.Tensor, samples: int, seed: int = 0) -> SparseTeacher:
    from distily.teacher.recorded import sample_tail

    log_p = teacher.log_softmax(-1)
    outside = log_p.scatter(-1, sparse.ids, float("-inf"))
    ids = sample_tail(outside.double(), sparse.tail_logprob.double(), samples, torch.Generator().manual_seed(seed))
    return SparseTeacher(sparse.ids, sparse.logprobs, sparse.tail_logprob, ids, log_p.gather(-1, ids))


def test_tail_samples_make_forward_kl_unbiased():
    """With many samples the estimate converges to the full-vocabulary forward KL, value and gradient, where the
    buckets alone miss the tail's own divergence."""
    student, teacher, sparse = random_case()
    loss = build_loss("forward_kl")
    sampled = with_tail_samples(sparse, teacher, 100_000)
    logits = student.clone().requires_grad_(True)
    value = sparse_token_divergence(logits, sampled, loss)
    value.sum().backward()
    full_logits = student.clone().requires_grad_(True)
    full = token_divergence(full_logits, teacher, loss)
    full.sum().backward()
    bucket = sparse_token_divergence(student, sparse, loss)
    assert ((full - bucket) > 0.05).all()  # this student's tail shape differs from the teacher's
    torch.testing.assert_close(value.detach(), full.detach(), rtol=0, atol=0.02)
    # The gradient q − p on every token, with τ c_j / S in place of p_j in the tail.
    torch.testing.assert_close(logits.grad, full_logits.grad, rtol=0, atol=0.005)
    # One draw of 8 samples: the gradient is q − target exactly, with target p on the top k and τ c / S outside.
    few = with_tail_samples(sparse, teacher, 8, seed=1)
    logits = student.clone().requires_grad_(True)
    sparse_token_divergence(logits, few, loss).sum().backward()
    target = (
        torch.zeros_like(student)
        .scatter_add_(-1, few.sample_ids, sparse.tail_logprob.exp()[:, None].expand(-1, 8) / 8)
        .scatter_(-1, sparse.ids, sparse.logprobs.exp())
    )
    torch.testing.assert_close(logits.grad, student.softmax(-1) - target)


def test_tail_sample_shortcut_matches_autograd_and_the_no_grad_value():
    from distily.losses import forward_kl

    student, teacher, sparse = random_case(dtype=torch.float32)
    sampled = with_tail_samples(sparse, teacher, 5)
    sampled = SparseTeacher(*(t.float() if t.is_floating_point() else t for t in vars(sampled).values()))
    results = []
    for generic in (False, True):
        logits = student.clone().requires_grad_(True)
        loss = (lambda s, t: forward_kl(s, t)) if generic else forward_kl
        value = sparse_token_divergence(logits, sampled, loss, temperature=2.0)
        if generic:  # a wrapper is not forward_kl: the samples are not used, so add their term by hand
            log_q = (logits / 2.0).log_softmax(-1)
            log_tail_q = log_q.scatter(-1, sampled.ids, float("-inf")).logsumexp(-1, keepdim=True)
            log_tail = sampled.tail_logprob.unsqueeze(-1)
            drawn = (sampled.sample_logprobs - log_tail) - (log_q.gather(-1, sampled.sample_ids) - log_tail_q)
            value = value + sampled.tail_logprob.exp() * drawn.mean(-1)
        (value * torch.arange(1.0, 7.0)).sum().backward()
        results.append((value.detach(), logits.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        value = sparse_token_divergence(student, sampled, forward_kl, temperature=2.0)
    torch.testing.assert_close(value, results[0][0])


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_sparse_losses_gradcheck(name):
    student, _, sparse = random_case(n=3, vocab=12, k=4)
    loss = build_loss(name)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: sparse_token_divergence(s, sparse, loss, temperature=1.5), (student,))
    assert torch.autograd.gradcheck(lambda s: student_bucket_log_probs(s, sparse.ids), (student,))


# ----------------------------------------------------------------------------------------------------------------
# Training from the cache


def make_config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), report_to="none", seq_len=SEQ, per_device_train_batch_size=3, use_cpu=True
    )
    values.update(overrides)
    return DistillationConfig(**values)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "generalized_jsd"])
@pytest.mark.parametrize("chunked", ["true", "false"])
def test_cached_loss_is_close_to_the_live_loss(tmp_path, bucket_cache_dir, text_corpus, tiny_tokenizer, loss, chunked):
    """On the same batch: the cached loss (without tail samples) is the bucket divergence of the live teacher's
    distribution (up to float16 storage), a lower bound of the live loss that the recorded tail mass bounds."""
    from transformers import LlamaForCausalLM

    cache_dir = bucket_cache_dir

    batch, _ = dataset_batch(cache_dir, text_corpus, tiny_tokenizer)
    teacher = confident_teacher()
    torch.manual_seed(1)
    student = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2))
    common = dict(loss=loss, chunked_loss=chunked, loss_chunk_size=16)
    live = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher, args=make_config(tmp_path, **common)
    )
    cached = DistillationTrainer(
        model=copy.deepcopy(student), args=make_config(tmp_path, teacher_cache=str(cache_dir), **common)
    )
    losses, grads = [], []
    for trainer in (live, cached):
        trainer.model.train()
        value = trainer.compute_loss(trainer.model, batch)
        value.backward()
        losses.append(value.item())
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))
    # The bucket divergence computed from the live teacher's float32 logits.
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, TINY_VOCAB)
        s_logits = student(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, TINY_VOCAB)
    log_p = t_logits.log_softmax(-1)
    values, ids = log_p.topk(K, -1)
    sparse = SparseTeacher(ids, values, log_p.scatter(-1, ids, float("-inf")).logsumexp(-1))
    bucket = sparse_token_divergence(s_logits, sparse, build_loss(loss)).mean().item()
    assert losses[1] == pytest.approx(bucket, rel=5e-3)
    assert losses[1] <= losses[0] + 1e-4
    assert sparse.tail_logprob.exp().mean() < 0.05  # a confident teacher: k = 16 of 128 tokens hold > 95%
    if loss != "generalized_jsd":
        # Chain rule of KL: full = buckets + (mass of the tail) × KL inside the tail, the one term the cache lacks.
        log_q = s_logits.log_softmax(-1)
        outside = torch.ones_like(log_p, dtype=torch.bool).scatter_(-1, ids, False)
        in_tail_p = (log_p - sparse.tail_logprob[:, None]).masked_fill(~outside, float("-inf"))
        log_q_tail = log_q.masked_fill(~outside, float("-inf")).logsumexp(-1)
        in_tail_q = (log_q - log_q_tail[:, None]).masked_fill(~outside, float("-inf"))
        if loss == "forward_kl":
            weight, first, second = sparse.tail_logprob.exp(), in_tail_p, in_tail_q
        else:
            weight, first, second = log_q_tail.exp(), in_tail_q, in_tail_p
        inside = torch.where(outside, first.exp() * (first - second), torch.zeros_like(first)).sum(-1)
        gap = (weight * inside).mean().item()
        assert losses[0] == pytest.approx(losses[1] + gap, rel=5e-3)
    # The gradient is the bucket divergence's (from the float32 live distribution, up to float16 storage).
    reference = copy.deepcopy(student)
    reference_logits = reference(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, TINY_VOCAB)
    sparse_token_divergence(reference_logits, sparse, build_loss(loss)).mean().backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert torch.nn.functional.cosine_similarity(grads[1], expected, dim=0) > 0.999
    torch.testing.assert_close(grads[1], expected, rtol=0.05, atol=1e-3 * expected.abs().max().item())
    if loss == "forward_kl":  # the top-k + tail mass carry nearly all of forward KL's gradient
        assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.95


@pytest.mark.parametrize("chunked", ["true", "false"])
def test_tail_samples_bring_the_cached_loss_to_the_live_one(
    tmp_path, cache_dir, bucket_cache_dir, text_corpus, tiny_tokenizer, chunked
):
    """Forward KL on one batch from the live teacher, a cache with tail samples and one without: the samples
    estimate the tail term the buckets drop, so the value comes close to the live one."""
    from transformers import LlamaForCausalLM

    batch, _ = dataset_batch(cache_dir, text_corpus, tiny_tokenizer)
    torch.manual_seed(1)
    student = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2))
    common = dict(loss="forward_kl", chunked_loss=chunked, loss_chunk_size=16)
    runs = {
        "live": DistillationTrainer(
            model=copy.deepcopy(student), teacher_model=confident_teacher(), args=make_config(tmp_path, **common)
        ),
        "samples": DistillationTrainer(
            model=copy.deepcopy(student), args=make_config(tmp_path, teacher_cache=str(cache_dir), **common)
        ),
        "buckets": DistillationTrainer(
            model=copy.deepcopy(student), args=make_config(tmp_path, teacher_cache=str(bucket_cache_dir), **common)
        ),
    }
    losses, grads = {}, {}
    for name, trainer in runs.items():
        trainer.model.train()
        value = trainer.compute_loss(trainer.model, batch)
        value.backward()
        losses[name] = value.item()
        grads[name] = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    assert losses["buckets"] < losses["live"] - 0.01  # the lower bound
    assert abs(losses["samples"] - losses["live"]) < 0.25 * (losses["live"] - losses["buckets"])
    # Gradients: 8 samples per token are unbiased but noisy; on one batch both caches are within 2% of live
    # (the bias they remove shows over many steps: benchmarks/RESULTS.md).
    for name in ("samples", "buckets"):
        assert (grads[name] - grads["live"]).norm() < 0.02 * grads["live"].norm()


def test_train_four_steps_from_the_cache_without_the_teacher(tmp_path, cache_dir, text_corpus, monkeypatch):
    from distily.config import StudentArguments
    from distily.run import train

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded when training from a cache")

    monkeypatch.setattr("distily.teacher.loading.load_teacher", no_teacher)
    monkeypatch.setattr("distily.run.load_run_teacher", no_teacher)
    config = make_config(
        tmp_path,
        teacher_cache=str(cache_dir),
        max_steps=4,
        logging_steps=1,
        learning_rate=1e-3,
        per_device_eval_batch_size=4,
        save_strategy="no",
    )
    result = train(
        TeacherArguments(),
        StudentArguments(student_config={"num_hidden_layers": 2}, student_init="random"),
        data_args(text_corpus),
        config,
    )
    assert result.trainer.state.global_step == 4
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(value) for value in losses)
    # The teacher's eval perplexity comes from the recorded full-logit NLL: it equals the recording's.
    recorded = TeacherCache(cache_dir).manifest["splits"]["eval"]["teacher_ppl"]
    assert result.metrics_after["eval_teacher_ppl"] == pytest.approx(recorded, rel=1e-5)
    assert result.metrics_after["eval_loss"] > 0
    manifest = json.loads((tmp_path / "out" / "distily_run.json").read_text())
    assert manifest["teacher_cache"] == str(cache_dir) and manifest["teacher_parameters"] is None


def test_a_cache_that_does_not_match_is_refused(tmp_path, cache_dir, text_corpus, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    student = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2))
    with pytest.raises(CacheError, match=r"--seq_len 64 differs"):
        DistillationTrainer(model=student, args=make_config(tmp_path, teacher_cache=str(cache_dir), seq_len=64))
    with pytest.raises(CacheError, match=r"--temperature 2\.0 differs"):
        DistillationTrainer(model=student, args=make_config(tmp_path, teacher_cache=str(cache_dir), temperature=2.0))
    with pytest.raises(ConfigError, match="cannot be computed from a recorded teacher"):
        make_config(tmp_path, teacher_cache=str(cache_dir), loss="mse")
    from .conftest import make_tiny_tokenizer

    other_tokenizer = make_tiny_tokenizer(["completely different text " * 20])
    with pytest.raises(CacheError, match="tokenizer differs"):
        DistillationTrainer(
            model=student, args=make_config(tmp_path, teacher_cache=str(cache_dir)), processing_class=other_tokenizer
        )
    # Other data: the fingerprint check names it; a block whose tokens differ is refused at the batch.
    other = tmp_path / "other_corpus"
    other.mkdir()
    for index in range(30):
        (other / f"f{index}.py").write_text(f"x_{index} = {index}\n" * 40)
    data = prepare_datasets(DataArguments(dataset=str(other), eval_fraction=0.1), tiny_tokenizer, SEQ, block_index=True)
    with pytest.raises(CacheError, match="train data differs"):
        TeacherCache(cache_dir).check_compatible(source_fingerprints=data.source_fingerprints)
    from distily.data import BlockCollator

    cache = TeacherCache(cache_dir)
    feature = dict(data.train[0], block_index=int(np.flatnonzero(cache.row_of_block("train") >= 0)[0]))
    batch = BlockCollator(0)([feature])
    with pytest.raises(CacheError, match="tokens differ"):
        cache.signal(batch, batch["labels"][:, 1:] != -100)
    # Rows that were never recorded.
    with pytest.raises(CacheError, match="not in the teacher cache"):
        TeacherCache(cache_dir).rows_for("train", [10_000])


# ----------------------------------------------------------------------------------------------------------------
# vLLM backend (never run on a GPU here: a fake engine with vLLM's prompt_logprobs structure)


class FakeLogprob:
    """vllm.logprobs.Logprob: logprob, rank (1 = most likely), decoded_token."""

    def __init__(self, logprob, rank):
        self.logprob, self.rank, self.decoded_token = logprob, rank, None


class FakeVllmEngine:
    """Mimics ``vllm.LLM.generate(prompts, SamplingParams(prompt_logprobs=k))``: per prompt, ``prompt_logprobs`` is
    ``[None, {token: Logprob}, ...]`` with the top-k of each position plus the prompt's own token."""

    def __init__(self, model, k):
        self.model, self.k, self.calls = model, k, 0

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        from types import SimpleNamespace

        self.calls += 1
        outputs = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.no_grad():
                log_probs = self.model(input_ids=ids).logits[0].float().log_softmax(-1)
            positions = [None]
            for j in range(1, ids.shape[1]):
                row = log_probs[j - 1]
                values, top = row.topk(self.k)
                entries = {
                    int(t): FakeLogprob(float(v), rank + 1) for rank, (t, v) in enumerate(zip(top, values, strict=True))
                }
                actual = int(ids[0, j])
                rank = int((row > row[actual]).sum()) + 1
                entries.setdefault(actual, FakeLogprob(float(row[actual]), rank))
                positions.append(entries)
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], prompt_logprobs=positions))
        return outputs


def test_vllm_backend_records_what_transformers_records(tmp_path, teacher_dir, text_corpus, cache_dir):
    engine = FakeVllmEngine(confident_teacher(), K)
    output = tmp_path / "vllm_cache"
    teacher_args, data_args, config = record_args(teacher_dir, text_corpus, output, backend="vllm")
    record(teacher_args, data_args, config, backend=VllmBackend(engine, K), progress=False)
    assert engine.calls > 0
    vllm_cache, hf_cache = TeacherCache(output, verify="all"), TeacherCache(cache_dir)
    assert vllm_cache.manifest["identity"]["backend"] == "vllm"
    rows = np.arange(6)
    got, expected = vllm_cache.read_rows("train", rows), hf_cache.read_rows("train", rows)
    assert (got["top_ids"] == expected["top_ids"]).float().mean() > 0.99
    torch.testing.assert_close(got["top_logprobs"], expected["top_logprobs"], rtol=2e-3, atol=2e-3)
    # vLLM's tail is 1 - Σ top-k: the same as the log-sum-exp tail where it is not tiny.
    big = expected["tail_logprob"] > -8
    torch.testing.assert_close(got["tail_logprob"][big], expected["tail_logprob"][big], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got["teacher_nll"], expected["teacher_nll"], rtol=1e-4, atol=1e-3)


def test_vllm_backend_without_vllm_says_what_to_install(tmp_path, teacher_dir, text_corpus):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed: this test checks the message shown without it")
    with pytest.raises(ConfigError, match=r"distily\[gpu\]"):
        record(*record_args(teacher_dir, text_corpus, tmp_path / "c", backend="vllm"), progress=False)
    with pytest.raises(ConfigError, match="temperature 1"):
        RecordConfig(output="x", backend="vllm", temperature=2.0)
    # vLLM returns only the top k: no tail samples by default, and asking for them is refused.
    assert RecordConfig(output="x", backend="vllm").tail_samples == 0
    assert RecordConfig(output="x").tail_samples == 8
    with pytest.raises(ConfigError, match="tail_samples 0"):
        RecordConfig(output="x", backend="vllm", tail_samples=4)
    with pytest.raises(ConfigError, match="whole number"):
        RecordConfig(output="x", tail_samples=-1)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def test_record_and_train_from_the_command_line(tmp_path, teacher_dir, text_corpus, capsys):
    from distily.cli import main

    cache = tmp_path / "cli_cache"
    data = [
        "--dataset",
        str(text_corpus),
        "--eval_fraction",
        "0.1",
        "--max_train_blocks",
        "6",
        "--max_eval_blocks",
        "3",
    ]
    flags = ["--teacher", str(teacher_dir), *data, "--seq_len", str(SEQ), "--top_k", "8", "--output", str(cache)]
    assert main(["record", *flags, "--rows_per_shard", "4", "--device", "cpu"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    manifest = TeacherCache(cache).manifest
    assert manifest["identity"]["top_k"] == 8 and len(manifest["splits"]["train"]["shards"]) == 2
    run = ["--teacher_cache", str(cache), *data, "--student_config", '{"num_hidden_layers": 2}', "--student_init"]
    run += ["random", "--max_steps", "2", "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no"]
    assert main([*run, "--seq_len", str(SEQ), "--output_dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "distily_run.json").read_text())["status"] == "finished"
    # A cache recorded at another seq_len: one line naming the difference, exit status 2, nothing written.
    assert main([*run, "--seq_len", "16", "--output_dir", str(tmp_path / "refused")]) == 2
    assert "--seq_len 16 differs" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
