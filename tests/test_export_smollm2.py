"""The realistic GGUF check: a 2-layer student cut from the embedded SmolLM2 teacher, run in llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distily import build_student
from distily.export.gguf import write_gguf
from distily.run import teacher_gguf_tokenizer_pre
from distily.students import count_parameters

from .test_export import assert_same_top1, llama_cpp_logits, perplexity

pytestmark = pytest.mark.slow

PROMPT = '''import os


def read_config(path):
    """Return the settings in a file as a dict, ignoring comments."""
    settings = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings
'''


@pytest.fixture(scope="module")
def student(smollm2):
    teacher, tokenizer = smollm2
    torch.manual_seed(0)
    return build_student(teacher, {"num_hidden_layers": 2}).eval(), tokenizer


@pytest.fixture(scope="module")
def reference(student):
    model, tokenizer = student
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0].float().numpy()


def test_smollm2_student_runs_in_llama_cpp_f16(student, reference, tmp_path):
    import gguf
    import llama_cpp

    model, tokenizer = student
    # The teacher's own GGUF names its pre-tokenizer; a run records it and the student's GGUF inherits it.
    pre = teacher_gguf_tokenizer_pre("smollm2-135m-instruct", model.config.vocab_size)
    report = write_gguf(model, tokenizer, tmp_path / "s-f16.gguf", "f16", tokenizer_pre=pre)
    assert report.tokenizer_pre == "smollm"
    reader = gguf.GGUFReader(report.path)
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.attention.head_count"].contents() == 9
    assert reader.fields["llama.attention.head_count_kv"].contents() == 3
    assert reader.fields["llama.rope.dimension_count"].contents() == 64
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings: llama.cpp reuses token_embd

    ids, expected = reference
    logits = llama_cpp_logits(report.path, ids)
    # An untrained 2-layer slice is wildly over-confident (logits span ~60); f16 weights move them by < 0.1.
    assert np.abs(logits - expected).max() < 0.1
    assert_same_top1(expected, logits, atol=0.1)

    llm = llama_cpp.Llama(model_path=str(report.path), vocab_only=True, verbose=False)
    try:
        for text in (PROMPT, "<|im_start|>user\nHi 123 4567!<|im_end|>\n", "naïve café 🦙  spaces\t\ttabs"):
            expected_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected_ids, text
        assert llm.token_eos() == tokenizer.eos_token_id
    finally:
        llm.close()


def test_q8_0_keeps_perplexity_within_one_percent_at_full_scale(smollm2, tmp_path):
    """q8_0 of the full 30-layer model (a 2-layer slice's perplexity is ~1e24, too ill-conditioned to compare)."""
    import inspect
    import json.decoder

    model, tokenizer = smollm2
    ids = tokenizer(inspect.getsource(json.decoder), add_special_tokens=False)["input_ids"][:250]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()
    pre = teacher_gguf_tokenizer_pre("smollm2-135m-instruct", model.config.vocab_size)
    report = write_gguf(model, tokenizer, tmp_path / "t-q8_0.gguf", "q8_0", tokenizer_pre=pre)
    assert report.size_bytes < 0.6 * 2 * count_parameters(model)  # about 8.5 bits per weight instead of 16
    logits = llama_cpp_logits(report.path, ids)
    ppl_torch, ppl_llama = perplexity(expected, ids), perplexity(logits, ids)
    assert ppl_torch < 20  # a competent model on Python code
    assert ppl_llama == pytest.approx(ppl_torch, rel=0.01)
