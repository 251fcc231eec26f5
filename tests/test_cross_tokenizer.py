"""Cross-tokenizer distillation: offset alignment, ULD and the hybrid against hand computations, the trainer's
cross-tokenizer path against the plain path (identical tokenizers), a run with the student's own tokenizer, and
the errors that name --cross_tokenizer_loss."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from distily import DistillationConfig, DistillationTrainer
from distily.cli import main
from distily.config import ConfigError
from distily.cross_tokenizer import (
    CrossTokenizerObjective,
    PairedBlockCollator,
    SharedVocabulary,
    align,
    boundaries,
    exact_divergence,
    pack_paired_dataset,
    resolve_cross_tokenizer_loss,
    uld,
)
from distily.cross_tokenizer.data import _pack_paired
from distily.data import BlockCollator, pack_dataset
from distily.losses import build_loss
from distily.tokenizer import train_tokenizer_on_texts

from .conftest import BYTE_SAMPLE_TEXT, BYTE_VOCAB, SAMPLE_TEXT, make_byte_bpe_tokenizer, tiny_llama_config

# -- alignment ---------------------------------------------------------------------------------------------------


def spans(ends: list[int]) -> list[tuple[int, int]]:
    return [(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def test_alignment_of_two_hand_made_segmentations():
    # "def f(x):"  student: def| f|(|x|):   teacher: de|f| f(|x|)|:
    alignment = align(spans([3, 5, 6, 7, 9]), spans([2, 3, 6, 7, 8, 9]))
    # Shared boundaries with a next token on both sides: after "def" (3), "def f(" (6), "def f(x" (7); 9 is the end.
    assert alignment.student == [0, 2, 3]
    assert alignment.teacher == [1, 2, 3]
    # Next spans: " f" vs " f(" differ; "x" == "x"; "):" vs ")" differ.
    assert alignment.exact == [False, True, False]


def test_tokens_inside_one_character_are_not_boundaries():
    # "naïve": the student splits "ï" into two byte tokens that both report its span (2, 3), the second one
    # carrying "ve" too; the teacher has "na", "ï", "ve".
    student = [(0, 2), (2, 3), (2, 5)]
    teacher = [(0, 2), (2, 3), (3, 5)]
    assert boundaries(student) == [True, False, True]
    alignment = align(student, teacher)
    assert alignment.student == [0] and alignment.teacher == [0]  # only after "na"
    assert alignment.exact == [False]  # the next spans differ: (2, 3) is not a whole token on the student's side


def test_identical_segmentations_align_everywhere_and_exactly():
    same = spans([2, 4, 5, 9, 12])
    alignment = align(same, same)
    assert alignment.student == alignment.teacher == [0, 1, 2, 3]
    assert all(alignment.exact)


@pytest.fixture(scope="module")
def two_tokenizers():
    texts = [SAMPLE_TEXT, BYTE_SAMPLE_TEXT]
    teacher = make_byte_bpe_tokenizer(texts)
    student = train_tokenizer_on_texts(texts * 30, 300, teacher_tokenizer=teacher)
    return student, teacher


def token_bytes(tokenizer, token_id: int) -> bytes:
    """A byte-level BPE token's bytes (GPT-2's byte-to-symbol table inverted)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    if token_id in tokenizer.added_tokens_decoder:
        return tokenizer.added_tokens_decoder[token_id].content.encode()
    return bytes(table[symbol] for symbol in tokenizer.convert_ids_to_tokens(token_id))


def test_packed_blocks_align_positions_that_have_read_the_same_text(two_tokenizers):
    student, teacher = two_tokenizers
    texts = [SAMPLE_TEXT, BYTE_SAMPLE_TEXT, SAMPLE_TEXT.upper()]
    blocks = _pack_paired({"text": texts}, student, teacher, seq_len=24, teacher_seq_len=64)
    assert len(blocks["input_ids"]) >= 3
    aligned = exact_count = 0
    for ids, teacher_ids, s_pos, t_pos, exact in zip(*(blocks[k] for k in blocks), strict=True):
        assert len(ids) == 24 and s_pos and max(s_pos) < 23
        for i, j, same in zip(s_pos, t_pos, exact, strict=True):
            # Bytes, not text: an aligned position may fall inside a character (both sides split it alike).
            read_s = b"".join(token_bytes(student, t) for t in ids[: i + 1])
            read_t = b"".join(token_bytes(teacher, t) for t in teacher_ids[: j + 1])
            # The teacher's block may start after the student's (a straddling token is left out): suffixes.
            assert read_s.endswith(read_t) or read_t.endswith(read_s), (read_s, read_t)
            if same:
                assert token_bytes(student, ids[i + 1]) == token_bytes(teacher, teacher_ids[j + 1])
            exact_count += same
        aligned += len(s_pos)
    assert 0 < exact_count < aligned


# -- losses ------------------------------------------------------------------------------------------------------


def test_uld_against_a_hand_computation():
    p = torch.tensor([[0.1, 0.7, 0.2]])  # the teacher: 3 tokens
    q = torch.tensor([[0.5, 0.5]])  # the student: 2 tokens
    # Sorted: p = (0.7, 0.2, 0.1), q = (0.5, 0.5, 0): |0.2| + |0.3| + |0.1| = 0.6.
    assert uld(q.log(), p.log()).item() == pytest.approx(0.6, abs=1e-6)
    assert uld(p.log(), p.log()).item() == pytest.approx(0.0, abs=1e-7)  # same distribution, any order
    assert uld(p.log()[:, [2, 0, 1]], p.log()).item() == pytest.approx(0.0, abs=1e-7)


def test_uld_gradient():
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: uld(s, teacher).double(), (student,))


def hand_vocab() -> SharedVocabulary:
    # student: a=0 b=1 c=2; teacher: a=0 b=1 d=2 e=3. Shared: a, b.
    return SharedVocabulary(torch.tensor([0, 1]), torch.tensor([0, 1]), student_size=3, teacher_size=4)


def test_exact_divergence_over_the_shared_vocabulary_by_hand():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])  # buckets a, b, other = 0.4, 0.3, 0.3
    q = torch.tensor([[0.5, 0.25, 0.25]])  # buckets a, b, other = 0.5, 0.25, 0.25
    expected = 0.4 * math.log(0.4 / 0.5) + 0.3 * math.log(0.3 / 0.25) + 0.3 * math.log(0.3 / 0.25)
    value = exact_divergence(q.log(), p.log(), hand_vocab(), build_loss("forward_kl"))
    assert value.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.0201355, abs=1e-6)


def test_hybrid_objective_against_a_hand_computation():
    """Two aligned positions in one block: the first names the same next token on both sides (exact), the second
    is flagged exact by the spans but the next tokens differ in id mapping, so it falls back to ULD."""
    q = torch.tensor([[0.5, 0.25, 0.25], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    inputs = {
        "input_ids": torch.tensor([[2, 1, 2]]),  # student next tokens: pos 0 -> b(1), pos 1 -> c(2)
        "teacher_input_ids": torch.tensor([[3, 1, 0]]),  # teacher next tokens: pos 0 -> b(1), pos 1 -> a(0)
        "aligned_student": torch.tensor([[0, 1]]),
        "aligned_teacher": torch.tensor([[0, 1]]),
        "aligned_exact": torch.tensor([[1, 1]]),
    }
    mask = torch.tensor([[True, True]])
    exact = 0.4 * math.log(0.4 / 0.5) + 0.6 * math.log(0.3 / 0.25)
    uld_second = abs(0.4 - 0.6) + abs(0.3 - 0.3) + abs(0.2 - 0.1) + abs(0.1 - 0.0)  # sorted: 0.4 0.3 0.2 0.1
    hybrid = CrossTokenizerObjective("hybrid", hand_vocab(), build_loss("forward_kl"))
    sums = hybrid(q.log()[None], p.log()[None], inputs, mask)
    assert sums.kd.item() == pytest.approx(exact + uld_second, abs=1e-6)
    assert (sums.aligned, sums.exact, sums.unaligned_blocks) == (2, 1, 0)
    uld_first = abs(0.4 - 0.5) + abs(0.3 - 0.25) + abs(0.2 - 0.25) + 0.1
    plain = CrossTokenizerObjective("uld", hand_vocab())(q.log()[None], p.log()[None], inputs, mask)
    assert plain.kd.item() == pytest.approx(uld_first + uld_second, abs=1e-6)
    # Temperature: the divergence of logits / T, times T².
    hot = CrossTokenizerObjective("uld", hand_vocab(), temperature=2.0)(q.log()[None], p.log()[None], inputs, mask)
    expected = 4 * (uld(q.log()[:2] / 2, p.log()[:2] / 2)).sum()
    assert hot.kd.item() == pytest.approx(expected.item(), abs=1e-6)
    # A block without aligned positions is skipped and counted.
    none = dict(inputs, aligned_student=torch.tensor([[-1, -1]]), aligned_teacher=torch.tensor([[-1, -1]]))
    skipped = hybrid(q.log()[None], p.log()[None], none, mask)
    assert skipped.kd.item() == 0.0 and skipped.unaligned_blocks == 1


# -- the trainer's cross-tokenizer path ----------------------------------------------------------------------------


def tiny_byte_llama(seed: int, vocab: int = BYTE_VOCAB):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def test_hybrid_on_identical_tokenizers_equals_the_plain_loss(tmp_path):
    """With the teacher's own tokenizer every position aligns exactly and every token is shared, so the hybrid
    is the registered divergence on every position: the cross-tokenizer path gives the plain path's loss."""
    from datasets import Dataset

    tokenizer = make_byte_bpe_tokenizer()
    documents = Dataset.from_dict({"text": [SAMPLE_TEXT, BYTE_SAMPLE_TEXT, SAMPLE_TEXT]})
    paired = pack_paired_dataset(documents, tokenizer, tokenizer, seq_len=32)
    plain = pack_dataset(documents, tokenizer, seq_len=32)
    assert paired["input_ids"] == plain["input_ids"] and paired["teacher_input_ids"] == plain["input_ids"]
    teacher, student = tiny_byte_llama(0).eval(), tiny_byte_llama(1)
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", seq_len=32, alpha=0.7, temperature=2.0)
    losses, grads = {}, {}
    for name, dataset, collator, extra in (
        ("plain", plain, BlockCollator(0), {}),
        ("hybrid", paired, PairedBlockCollator(0, 0), {"cross_tokenizer_loss": "hybrid"}),
    ):
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=DistillationConfig(**common, **extra),
            data_collator=collator, processing_class=tokenizer, teacher_tokenizer=tokenizer,
        )  # fmt: skip
        batch = collator([dataset[i] for i in range(len(dataset))])
        student.zero_grad()
        losses[name] = trainer.compute_loss(student.train(), batch)
        losses[name].backward()
        grads[name] = torch.cat([p.grad.flatten() for p in student.parameters()])
    assert losses["hybrid"].item() == pytest.approx(losses["plain"].item(), rel=1e-5)
    torch.testing.assert_close(grads["hybrid"], grads["plain"], rtol=1e-4, atol=1e-6)


@pytest.fixture
def byte_teacher_dir(tmp_path):
    folder = tmp_path / "byte_teacher"
    tiny_byte_llama(0).save_pretrained(folder)
    make_byte_bpe_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def own_tokenizer_dir(tmp_path, text_corpus):
    from distily.config import DataArguments
    from distily.config.tokenizer import TokenizerTrainArguments
    from distily.tokenizer import train_tokenizer

    args = TokenizerTrainArguments(vocab_size=320, output_dir=str(tmp_path / "own_tokenizer"))
    data = DataArguments(dataset=str(text_corpus), dataset_cache_dir=str(tmp_path / "cache"))
    return train_tokenizer(args, data, teacher_tokenizer=make_byte_bpe_tokenizer())


def run_args(teacher, corpus, out, *extra):
    return [
        "--teacher", str(teacher), "--student_config", '{"num_hidden_layers": 2}', "--dataset", str(corpus),
        "--dataset_cache_dir", str(out.parent / "cache"), "--output_dir", str(out), "--seq_len", "32",
        "--max_steps", "4", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "true", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def test_a_student_with_its_own_tokenizer_trains_and_saves_that_tokenizer(
    byte_teacher_dir, own_tokenizer_dir, text_corpus, tmp_path
):
    out = tmp_path / "run"
    assert (
        main(["train", *run_args(byte_teacher_dir, text_corpus, out, "--student_tokenizer", str(own_tokenizer_dir))])
        == 0
    )
    own = AutoTokenizer.from_pretrained(own_tokenizer_dir)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.backend_tokenizer.to_str() == own.backend_tokenizer.to_str()
    manifest = json.loads((out / "distily_run.json").read_text())
    assert manifest["cross_tokenizer_loss"] == "hybrid" and manifest["student_tokenizer"] == str(own_tokenizer_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(own) == 320
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss_kd" in entry]
    assert logged and all(0 < entry["aligned_fraction"] <= 1 and entry["unaligned_blocks"] == 0 for entry in logged)
    assert all(math.isfinite(entry["loss"]) for entry in logged)
    end = json.loads((out / "eval_results.json").read_text())
    assert end["eval_student_ppl"] > 0 and "eval_teacher_ppl" not in end  # teacher ppl: other tokens


# -- bad input ---------------------------------------------------------------------------------------------------


def test_tokenizers_that_differ_need_a_cross_tokenizer_loss(two_tokenizers):
    student, teacher = two_tokenizers
    with pytest.raises(ConfigError, match="--cross_tokenizer_loss uld\\|hybrid"):
        resolve_cross_tokenizer_loss(None, student, teacher, own_tokenizer=False)
    assert resolve_cross_tokenizer_loss("uld", student, teacher, own_tokenizer=False) == "uld"
    assert resolve_cross_tokenizer_loss(None, student, teacher, own_tokenizer=True) == "hybrid"
    assert resolve_cross_tokenizer_loss(None, teacher, make_byte_bpe_tokenizer(), own_tokenizer=False) is None


def test_a_pretrained_student_with_another_tokenizer_is_refused_before_writing(
    byte_teacher_dir, own_tokenizer_dir, text_corpus, tmp_path, capsys
):
    student = tmp_path / "pretrained"
    tiny_byte_llama(3, vocab=320).save_pretrained(student)
    AutoTokenizer.from_pretrained(own_tokenizer_dir).save_pretrained(student)
    out = tmp_path / "run"
    args = [a for a in run_args(byte_teacher_dir, text_corpus, out) if a != '{"num_hidden_layers": 2}']
    args.remove("--student_config")
    assert main(["train", *args, "--student", str(student)]) == 2
    assert re.search("not the teacher's.*Pass --cross_tokenizer_loss uld\\|hybrid", capsys.readouterr().err)
    assert not out.exists()
    # Given the flag, the same student trains.
    assert main(["train", *args, "--student", str(student), "--cross_tokenizer_loss", "uld", "--max_steps", "2"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"teacher_cache": "some/cache"}, "--cross_tokenizer_loss needs a live teacher"),
        ({"objective": {"hidden_states": {"weight": 1.0}}}, "read positions the two tokenizers do not share"),
        ({"chunked_loss": "true"}, "drop --chunked_loss true"),
        ({"cross_tokenizer_loss": "wasserstein"}, "is not one of uld, hybrid"),
    ],
)
def test_cross_tokenizer_config_errors_name_the_fix(extra, message, tmp_path):
    values = {"cross_tokenizer_loss": "uld", **extra}
    with pytest.raises(ConfigError, match=message):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, **values)


def test_a_student_tokenizer_with_a_teacher_cache_or_a_pretrained_student_is_refused(tmp_path):
    from distily.config import StudentArguments
    from distily.cross_tokenizer.setup import check_no_teacher_cache

    config = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="--student_tokenizer needs a live teacher"):
        check_no_teacher_cache(config, StudentArguments(student_tokenizer=str(tmp_path / "tok")))
    with pytest.raises(ConfigError, match="Drop one of them"):
        StudentArguments(student_tokenizer=str(tmp_path / "tok"), student=str(tmp_path / "pretrained"))
