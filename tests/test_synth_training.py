"""Training on a `distily synth` folder: split by prompt id, chat rendering, masked prompts, seq-KD and logit KD."""

from __future__ import annotations

import json

import pytest

from distily import DataArguments
from distily.cli import main
from distily.data import is_eval_key, load_documents, prepare_datasets
from distily.teacher.backends import Generation
from distily.teacher.synth import SynthArguments, synthesize
from distily.teacher.synth_dataset import read_samples

from .conftest import make_tiny_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


class FixedBackend:
    """A teacher that answers every request with a short function derived from its seed."""

    name = "fixed"

    def describe(self):
        return {"backend": self.name, "teacher": "fixed"}

    def estimate_prompt_tokens(self, request):
        return 1

    def generate(self, requests):
        for request in requests:
            text = f"def f{request.seed % 97}(x):\n    return x * {request.seed % 7} + 1\n"
            yield Generation(id=request.id, text=text, finish_reason="stop", prompt_tokens=5, completion_tokens=20)


@pytest.fixture
def synth_folder(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Write code number {i} for a list." for i in range(60)))
    out = tmp_path / "synth"
    result = synthesize(SynthArguments(output_dir=str(out), prompts=str(prompts)), backend=FixedBackend())
    assert result.status == "finished" and result.counts["samples"] == 60
    return out


def args_for(folder, tmp_path, **overrides) -> DataArguments:
    return DataArguments(dataset=str(folder), dataset_cache_dir=str(tmp_path / "cache"), eval_fraction=0.2, **overrides)


def test_split_is_by_prompt_id(synth_folder, tmp_path):
    documents = load_documents(args_for(synth_folder, tmp_path))
    rows = read_samples(synth_folder)
    expected_eval = sorted(r["id"] for r in rows if is_eval_key(r["prompt_id"], 0.2))
    assert sorted(documents["eval"]["id"]) == expected_eval and 0 < len(expected_eval) < 60
    assert sorted(list(documents["train"]["id"]) + list(documents["eval"]["id"])) == sorted(r["id"] for r in rows)


@pytest.mark.parametrize("chat", [True, False])
def test_blocks_mask_the_prompt_and_train_on_the_completion(synth_folder, tmp_path, chat):
    tokenizer = make_tiny_tokenizer()
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    args = args_for(synth_folder, tmp_path)
    prepared = prepare_datasets(args, tokenizer, seq_len=32)
    documents = load_documents(args)

    # The expected token stream, built by hand from the samples of the train split.
    ids, labels = [], []
    for row in documents["train"]:
        user = json.loads(row["synth_request"])["messages"][0]["content"]
        if chat:
            prompt = f"<s>user\n{user}</s>\n<s>assistant\n"
            answer = f"{row['completion']}</s>\n"  # ends with EOS: no separator added
            extra = []
        else:
            prompt = f"User: {user}\n\nAssistant:"
            answer = " " + row["completion"]
            extra = [tokenizer.eos_token_id]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + extra
        ids += prompt_ids + answer_ids
        labels += [-100] * len(prompt_ids) + answer_ids
    blocks = [(ids[i : i + 32], labels[i : i + 32]) for i in range(0, len(ids) - len(ids) % 32, 32)]
    blocks = [(i, lab) for i, lab in blocks if any(x != -100 for x in lab[1:])]  # nothing to learn: dropped
    assert [list(b) for b in prepared.train["input_ids"]] == [b for b, _ in blocks]
    assert [list(b) for b in prepared.train["labels"]] == [lab for _, lab in blocks]
    masked = sum(x == -100 for _, lab in blocks for x in lab)
    assert 0 < masked < len(blocks) * 32

    # --prompt_loss true: every token is a label.
    everything = prepare_datasets(args_for(synth_folder, tmp_path, prompt_loss=True), tokenizer, seq_len=32)
    pairs = zip(everything.train["input_ids"], everything.train["labels"], strict=True)
    assert all(list(i) == list(lab) for i, lab in pairs)
    # --dataset_text_field completion: the completions alone, as plain documents.
    plain = prepare_datasets(args_for(synth_folder, tmp_path, dataset_text_field="completion"), tokenizer, 32)
    assert plain.train.column_names == ["input_ids"]
    assert "Write code" not in tokenizer.decode([t for b in plain.train["input_ids"] for t in b])


def test_four_step_training_run_on_synthetic_data(synth_folder, tiny_teacher_dir, tmp_path):
    """Sequence-level KD (alpha 0: plain CE on the teacher's samples) and logit KD on the same samples."""
    for alpha, name in (("0", "seqkd"), ("0.5", "logitkd")):
        out = tmp_path / name
        flags = [
            "--teacher", str(tiny_teacher_dir), "--student_config", '{"num_hidden_layers": 2}',
            "--dataset", str(synth_folder), "--dataset_cache_dir", str(tmp_path / "cache"), "--eval_fraction", "0.2",
            "--alpha", alpha, "--seq_len", "32", "--max_steps", "4", "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
            "--output_dir", str(out),
        ]  # fmt: skip
        assert main(["train", *flags]) == 0
        manifest = json.loads((out / "distily_run.json").read_text())
        assert manifest["status"] == "finished" and manifest["global_step"] == 4
        state = json.loads((out / "trainer_state.json").read_text())
        steps = [entry for entry in state["log_history"] if "loss" in entry]
        assert len(steps) == 4
        if alpha == "0":
            assert all("loss_kd" not in e and e["loss"] == pytest.approx(e["loss_ce"], rel=1e-3) for e in steps)
        else:
            assert all(e["loss"] == pytest.approx(0.5 * e["loss_kd"] + 0.5 * e["loss_ce"], rel=1e-3) for e in steps)
        # Evaluation counts only the completion tokens (the prompt labels are masked).
        end = json.loads((out / "eval_results.json").read_text())
        tokenizer = make_tiny_tokenizer()
        prepared = prepare_datasets(args_for(synth_folder, tmp_path), tokenizer, seq_len=32)
        unmasked = sum(sum(x != -100 for x in lab[1:]) for lab in prepared.eval["labels"])
        assert end["eval_tokens"] == unmasked < len(prepared.eval) * 31


@pytest.mark.slow
def test_smollm2_chat_template_renders_and_masks_the_prompt(smollm2):
    """The real teacher's chat template: the prompt part ends with the assistant header, the rest is trained."""
    from distily.teacher.synth_dataset import pack_prompt_completion, render_sample

    _, tokenizer = smollm2
    request = {"messages": [{"role": "user", "content": "How do I reverse a list?"}], "input": None}
    prompt, answer = render_sample(tokenizer, request, "Use reversed(xs) or xs[::-1].")
    assert prompt.endswith("<|im_start|>assistant\n") and "How do I reverse a list?" in prompt
    assert answer.startswith("Use reversed(xs)") and answer.rstrip().endswith("<|im_end|>")
    batch = {"synth_request": [json.dumps(request)] * 8, "completion": ["Use reversed(xs) or xs[::-1]."] * 8}
    blocks = pack_prompt_completion(batch, tokenizer, seq_len=64, separator=tokenizer.eos_token_id, prompt_loss=False)
    trained = [t for labels in blocks["labels"] for t in labels if t != -100]
    text = tokenizer.decode(trained)
    assert "reverse a list" not in text  # the question is never a label
    assert text.count("Use reversed(xs) or xs[::-1].") >= len(blocks["labels"]) - 1
