"""Padded vocabularies: teacher and student sharing a tokenizer but not their embedding row counts."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from distily import ConfigError, DistillationTrainer
from distily.losses import forward_kl
from distily.mixture import merge_sparse
from distily.sparse import SparseTeacher, sparse_token_divergence
from distily.vocab import RealVocabSparseSignal, vocab_alignment

from .conftest import TINY_VOCAB, make_tiny_tokenizer, tiny_llama_config
from .test_trainer import make_config, random_blocks

PAD_TEACHER, PAD_STUDENT = 24, 8


def padded(model: LlamaForCausalLM, extra: int, seed: int) -> LlamaForCausalLM:
    """``model`` with ``extra`` more embedding and head rows (large random values, so a wrong alignment shows);
    every other weight, and the first rows, identical."""
    config = copy.deepcopy(model.config)
    config.vocab_size += extra
    bigger = LlamaForCausalLM(config)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in bigger.state_dict().items():
        if tensor.shape == state[name].shape:
            tensor.copy_(state[name])
        else:
            rows = state[name].shape[0]
            tensor[:rows] = state[name]
            tensor[rows:] = 3 * torch.randn(tensor[rows:].shape, generator=generator)
    return bigger.eval()


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_tiny_tokenizer()
    assert len(tok) == TINY_VOCAB  # the models' real vocabulary is the whole tokenizer
    return tok


def batch_of(trainer, rows=4):
    return trainer.data_collator([{"input_ids": row} for row in random_blocks(rows)["input_ids"]])


def loss_and_head_grad(tmp_path, student, teacher, tokenizer, chunked, loss="forward_kl", temperature=1.0):
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_config(tmp_path, chunked_loss=chunked, loss=loss, temperature=temperature, alpha=0.6),
        processing_class=tokenizer,
    )
    student.zero_grad()
    student.train()
    loss_value = trainer.compute_loss(student, batch_of(trainer))
    loss_value.backward()
    return loss_value.detach(), student.lm_head.weight.grad.clone(), trainer


@pytest.mark.parametrize("chunked", ["true", "false"])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_padded_alignment_gives_exactly_the_unpadded_loss(tmp_path, tokenizer, chunked, loss):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    torch.manual_seed(1)
    student = LlamaForCausalLM(tiny_llama_config())
    reference, reference_grad, plain = loss_and_head_grad(tmp_path, student, teacher, tokenizer, chunked, loss, 2.0)
    assert plain.vocab_alignment is None
    for teacher_pad, student_pad in ((PAD_TEACHER, 0), (0, PAD_STUDENT), (PAD_TEACHER, PAD_STUDENT)):
        big_teacher = padded(teacher, teacher_pad, seed=2) if teacher_pad else teacher
        big_student = padded(student, student_pad, seed=3) if student_pad else student
        value, grad, trainer = loss_and_head_grad(tmp_path, big_student, big_teacher, tokenizer, chunked, loss, 2.0)
        assert trainer.vocab_alignment.size == TINY_VOCAB
        assert trainer.vocab_alignment.dropped == {"student": student_pad, "teacher": teacher_pad}
        # The same numbers up to float32 summation order (the padded head is a bigger matrix product).
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad[:TINY_VOCAB], reference_grad, rtol=1e-5, atol=1e-8)
        assert bool((grad[TINY_VOCAB:] == 0).all())  # the padding rows take no part in the objective


def test_padded_alignment_in_evaluation_gives_the_unpadded_perplexities(tmp_path, tokenizer):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    student = LlamaForCausalLM(tiny_llama_config())
    data = random_blocks(8)
    metrics = []
    for pair in ((student, teacher), (padded(student, PAD_STUDENT, 3), padded(teacher, PAD_TEACHER, 2))):
        trainer = DistillationTrainer(
            model=pair[0],
            teacher_model=pair[1],
            args=make_config(tmp_path),
            processing_class=tokenizer,
            eval_dataset=data,
        )
        metrics.append(trainer.evaluate())
    for key in ("eval_student_ppl", "eval_teacher_ppl", "eval_loss"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-5), key


def test_rows_that_are_not_padding_are_refused(tmp_path, tokenizer):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    small = LlamaForCausalLM(tiny_llama_config(vocab_size=TINY_VOCAB - 8))  # fewer rows than the tokenizer has
    with pytest.raises(ConfigError, match=r"fits in 120 rows, so the difference is not padding"):
        DistillationTrainer(model=small, teacher_model=teacher, args=make_config(tmp_path), processing_class=tokenizer)
    with pytest.raises(ConfigError, match="differs from the teacher's"):  # no tokenizer: nothing says what is real
        vocab_alignment(TINY_VOCAB + 8, TINY_VOCAB, None)
    assert vocab_alignment(TINY_VOCAB, [TINY_VOCAB, TINY_VOCAB], TINY_VOCAB) is None


def test_a_recorded_top_k_naming_padding_rows_is_the_real_distribution_coarse_grained():
    """A teacher whose tail is even over the real tokens: after dropping the padding ids from its top-k, the merged
    buckets are exactly the real-vocabulary distribution (padding mass removed, renormalised) grouped into those
    buckets, so the divergence equals one computed from the dense distribution directly."""
    real, rows, k = 40, 3, 5
    generator = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(real, generator=generator)[:k] for _ in range(rows)])
    ids[:, 0] = real + torch.arange(rows)  # one padding id in every top-k
    top = torch.rand(rows, k, generator=generator, dtype=torch.float64) * 0.1 + 0.05
    tail_mass = 1 - top.sum(-1)
    sparse = SparseTeacher(ids, top.log(), tail_mass.log())
    # The real-vocabulary distribution the merge promises: even tail τ / (V_real − k_real) outside the real top-k.
    k_real = k - 1
    expected = torch.full((rows, real), 0.0, dtype=torch.float64)
    expected[:] = (tail_mass / (real - k_real))[:, None]
    expected.scatter_(1, ids[:, 1:], top[:, 1:])
    expected = expected / expected.sum(-1, keepdim=True)
    merged = merge_sparse([sparse], None, real)
    assert bool((merged.ids < real).all())
    assert all(len(set(row.tolist())) == k for row in merged.ids)  # k distinct real ids, none twice
    student = torch.randn(rows, real, generator=generator, dtype=torch.float64)
    got = sparse_token_divergence(student, merged, forward_kl)
    # Reference: the same bucket partition applied to the dense expected distribution and the student's softmax.
    q = student.softmax(-1)
    p_top = expected.gather(1, merged.ids)
    q_top = q.gather(1, merged.ids)
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    reference = (p_top * (p_top / q_top).log()).sum(-1) + p_tail * (p_tail / q_tail).log()
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-12)
    # The signal wrapper: untouched when no padding id is named, merged when one is.
    clean = SparseTeacher(ids[:, 1:], top[:, 1:].log(), (1 - top[:, 1:].sum(-1)).log())
    assert torch.equal(RealVocabSparseSignal(_Fixed(clean), real).top_k(slice(None)).ids, clean.ids)
    torch.testing.assert_close(RealVocabSparseSignal(_Fixed(sparse), real).top_k(slice(None)).ids, merged.ids)


class _Fixed:
    def __init__(self, teacher):
        self.teacher = teacher

    def top_k(self, rows):
        return self.teacher[rows]


def test_a_pretrained_student_padded_differently_trains_when_it_shares_the_tokenizer(
    tmp_path, tiny_teacher_dir, tiny_tokenizer, text_corpus
):
    """``--student`` with more embedding rows and the teacher's tokenizer saved beside it: aligned, trained. The
    same folder without the tokenizer is refused (tests/test_scale.py), as is one with another tokenizer."""
    from distily import DistillationConfig
    from distily.config import DataArguments, StudentArguments, TeacherArguments
    from distily.run import train

    torch.manual_seed(1)
    student_dir = tmp_path / "padded-student"
    padded(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)), PAD_STUDENT, seed=3).save_pretrained(student_dir)
    tiny_tokenizer.save_pretrained(student_dir)

    def run(name):
        config = DistillationConfig(
            output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
            report_to="none", use_cpu=True, seq_len=16, save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        return train(
            TeacherArguments(teacher=str(tiny_teacher_dir), teacher_dtype="float32"),
            StudentArguments(student=str(student_dir)),
            DataArguments(dataset=str(text_corpus), max_eval_blocks=4),
            config,
        )

    result = run("aligned")
    assert result.trainer.vocab_alignment.dropped == {"student": PAD_STUDENT, "teacher": 0}
    assert result.metrics_after["eval_student_ppl"] > 0
    make_tiny_tokenizer(["other merges entirely, other merges " * 30]).save_pretrained(student_dir)
    # another tokenizer is not padding: refused, naming the cross-tokenizer option (docs/tokenizers.md)
    with pytest.raises(ConfigError, match=r"tokenizer .* is not the teacher's .*--cross_tokenizer_loss"):
        run("other-tokenizer")
    assert not (tmp_path / "other-tokenizer").exists()
