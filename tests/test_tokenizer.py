"""`distily tokenizer train`: deterministic, round-trips text, carries the teacher's special tokens and chat
template; a student built with it copies the teacher's rows of shared token strings; its GGUF runs in llama.cpp
with the logits PyTorch gives, and its own tokenizer tokenises there exactly as in Hugging Face."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from distily.cli import main
from distily.export import export
from distily.students import build_student_with_tokenizer, shared_token_ids, uniform_layer_subset
from distily.tokenizer import TOKENIZER_MANIFEST, bits_per_byte, tokens_per_byte, train_tokenizer_on_texts

from .conftest import BYTE_SAMPLE_TEXT, BYTE_VOCAB, SAMPLE_TEXT, make_byte_bpe_tokenizer, tiny_llama_config
from .test_export import LOGIT_ATOL, assert_same_top1, llama_cpp_logits, torch_logits, trained

ROUND_TRIP = [SAMPLE_TEXT, BYTE_SAMPLE_TEXT, "  x  =  1\n\n\n\t", "éà 🦙🦙 3333 it's 東京", "<|im_end|> not special"]


def train_cli(corpus, out, *extra) -> int:
    return main(
        ["tokenizer", "train", "--dataset", str(corpus), "--dataset_cache_dir", str(out.parent / "cache"),
         "--vocab_size", "350", "--output_dir", str(out), *extra]
    )  # fmt: skip


def test_training_is_deterministic_and_round_trips_text(text_corpus, tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    assert train_cli(text_corpus, first) == 0
    assert train_cli(text_corpus, second) == 0
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert len(tokenizer) == 350
    for text in ROUND_TRIP:  # every byte is in the vocabulary: any text comes back unchanged
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    manifest = json.loads((first / TOKENIZER_MANIFEST).read_text())
    assert manifest["split"] == "train" and manifest["vocab_size"] == 350 and manifest["documents"] > 0
    # Trained on the corpus: its code takes fewer tokens than bytes, and far fewer than the bytes-only start.
    assert tokens_per_byte(tokenizer, [SAMPLE_TEXT]) < 0.6


def test_an_existing_output_folder_is_refused_before_training(text_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert train_cli(text_corpus, out) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert train_cli(text_corpus, out, "--vocab_size", "100") == 2
    assert "--vocab_size must be a whole number above 256" in capsys.readouterr().err


def test_the_teachers_special_tokens_chat_template_and_pipeline_are_carried_over():
    teacher = make_byte_bpe_tokenizer()
    teacher.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    student = train_tokenizer_on_texts([SAMPLE_TEXT] * 20, 300, teacher_tokenizer=teacher)
    assert [student.convert_ids_to_tokens(i) for i in range(3)] == ["<pad>", "<s>", "</s>"]  # same ids
    assert (student.bos_token, student.eos_token, student.pad_token) == ("<s>", "</s>", "<pad>")
    assert student.chat_template == teacher.chat_template
    assert student.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"
    teacher_pipeline = json.loads(teacher.backend_tokenizer.to_str())
    student_pipeline = json.loads(student.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        assert student_pipeline[part] == teacher_pipeline[part]
    assert student("<s>", add_special_tokens=False)["input_ids"] == [1]


def tiny_byte_teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=BYTE_VOCAB)).eval()


def test_a_student_with_its_own_tokenizer_starts_from_the_teachers_rows_of_shared_strings():
    teacher, teacher_tokenizer = tiny_byte_teacher(), make_byte_bpe_tokenizer()
    own = train_tokenizer_on_texts([SAMPLE_TEXT.upper()] * 20, 300, teacher_tokenizer=teacher_tokenizer)
    student = build_student_with_tokenizer(teacher, teacher_tokenizer, own, {"num_hidden_layers": 2})
    assert student.config.vocab_size == 300 and student.get_input_embeddings().weight.shape[0] == 300
    student_ids, teacher_ids = shared_token_ids(own, teacher_tokenizer)
    # The 3 specials and the 256 bytes are shared; merges learned on upper-case code mostly are not.
    assert 259 <= len(student_ids) < 300
    own_vocab, teacher_vocab = own.get_vocab(), teacher_tokenizer.get_vocab()
    by_string = {own_vocab[token]: teacher_vocab[token] for token in own_vocab if token in teacher_vocab}
    assert dict(zip(student_ids.tolist(), teacher_ids.tolist(), strict=True)) == by_string
    for student_module, teacher_module in (
        (student.get_input_embeddings(), teacher.get_input_embeddings()),
        (student.get_output_embeddings(), teacher.get_output_embeddings()),  # untied here
    ):
        torch.testing.assert_close(student_module.weight[student_ids], teacher_module.weight[teacher_ids])
    unshared = sorted(set(range(300)) - set(student_ids.tolist()))
    assert unshared and not torch.equal(student.get_input_embeddings().weight[unshared[0]], torch.zeros(32))
    layers = uniform_layer_subset(4, 2)
    for index, source in enumerate(layers):
        torch.testing.assert_close(
            student.model.layers[index].mlp.up_proj.weight, teacher.model.layers[source].mlp.up_proj.weight
        )
    assert student.config.distily_init["shared_token_rows"] == len(student_ids)


def test_bits_per_byte_is_nll_over_bytes_and_counts_every_token_once():
    teacher, tokenizer = tiny_byte_teacher(), make_byte_bpe_tokenizer()
    texts = [SAMPLE_TEXT, BYTE_SAMPLE_TEXT]
    result = bits_per_byte(teacher, tokenizer, texts, seq_len=16, batch_size=3, progress=False)
    stream = [tokenizer.eos_token_id]
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = stream[:-1]
    assert result["tokens"] == len(stream) - 1  # every token but the leading EOS, predicted once
    assert result["bytes"] == sum(len(t.encode()) for t in texts) + 1
    # The same sum computed one window at a time by hand.
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, 16):
            window = torch.tensor([stream[start : start + 17]])
            logits = teacher(window[:, :-1]).logits[0]
            total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    assert result["nll_nats"] == pytest.approx(total, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(result["nll_nats"] / (np.log(2) * result["bytes"]), rel=1e-12)


@pytest.fixture(scope="module")
def own_tokenizer_student(tmp_path_factory):
    """A student with its own 320-token tokenizer (teacher's pipeline), trained a little, saved as a model folder."""
    teacher, teacher_tokenizer = tiny_byte_teacher(), make_byte_bpe_tokenizer()
    own = train_tokenizer_on_texts([SAMPLE_TEXT, BYTE_SAMPLE_TEXT] * 20, 320, teacher_tokenizer=teacher_tokenizer)
    student = build_student_with_tokenizer(teacher, teacher_tokenizer, own)
    trained(student, own)
    folder = tmp_path_factory.mktemp("own-tokenizer-student")
    student.save_pretrained(folder)
    own.save_pretrained(folder)
    return folder, own


def test_gguf_of_an_own_tokenizer_student_runs_in_llama_cpp_with_pytorchs_logits(own_tokenizer_student, tmp_path):
    import llama_cpp

    folder, own = own_tokenizer_student
    path = tmp_path / "student.gguf"
    result = export(folder, ["gguf"], "f32", path)
    assert result.gguf_tokenizer_pre == "gpt-2"  # detected from the student's own (GPT-2 byte-level) pipeline
    text = BYTE_SAMPLE_TEXT + SAMPLE_TEXT
    ids = own(text, add_special_tokens=False)["input_ids"][:96]
    reference = torch_logits(AutoModelForCausalLM.from_pretrained(folder), ids)
    logits = llama_cpp_logits(path, ids)
    assert logits.shape == reference.shape == (len(ids), 320)
    assert np.abs(logits - reference).max() < LOGIT_ATOL["f32"]
    assert_same_top1(reference, logits, LOGIT_ATOL["f32"])
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for sample in ROUND_TRIP[:-1]:
            assert (
                llm.tokenize(sample.encode(), add_bos=False, special=True)
                == own(sample, add_special_tokens=False)["input_ids"]
            )
        assert llm.n_vocab() == 320 and llm.token_eos() == own.eos_token_id
    finally:
        llm.close()


def test_safetensors_export_carries_the_students_own_tokenizer(own_tokenizer_student, tmp_path):
    folder, own = own_tokenizer_student
    out = tmp_path / "export"
    export(folder, ["safetensors"], "f32", out)
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.backend_tokenizer.to_str() == own.backend_tokenizer.to_str() and len(exported) == 320
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 320
