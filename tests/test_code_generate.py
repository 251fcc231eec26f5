"""distily.code_eval.generate: stop sequences, the transformers and llama.cpp backends, ``distily eval MODEL --tasks
humaneval`` end to end (with a backend known to be correct and with a tiny random Llama), bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from distily.cli import main
from distily.code_eval import GENERATION_BACKENDS, STOP_SEQUENCES, Completion, Task, truncate_at_stop
from distily.code_eval.generate import TransformersBackend, register_generation_backend, sample_seed
from distily.config.eval import EvalConfig
from distily.errors import ConfigError
from distily.run_folder import RunFolder

from .conftest import BYTE_VOCAB, make_byte_bpe_tokenizer, make_tiny_tokenizer, tiny_llama_config
from .test_code_eval import TASKS, write_jsonl

CANONICAL = {"t/0": "    return a + b\n", "t/1": "    return a - b\n", "t/2": "    return a * b\n"}
PROMPTS = ["def add(a, b):\n", "class Point:\n    def __init__(self, x):\n", "for i in range(10):\n    pri"]


# ----------------------------------------------------------------------------------------------------------------
# stop sequences


def test_truncate_at_the_earliest_stop_sequence():
    python = STOP_SEQUENCES["python"]
    assert truncate_at_stop("    return a + b\n\ndef other():\n    pass\n", python) == "    return a + b\n"
    assert truncate_at_stop("    return 1\n# done\nclass A:\n", python) == "    return 1"
    assert truncate_at_stop("    x = 1\nif __name__ == '__main__':\n", python) == "    x = 1"
    assert truncate_at_stop("    return 2\nprint(f(1))\n", python) == "    return 2"
    # an indented def (a nested function) and "#" inside a line do not stop it
    assert (
        truncate_at_stop("    def g():\n        return 1  # one\n", python) == "    def g():\n        return 1  # one\n"
    )
    assert truncate_at_stop("", python) == ""
    assert truncate_at_stop("\treturn a\n}\n\nfunc other() {\n", STOP_SEQUENCES["go"]) == "\treturn a\n}\n"


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(0, "t/0", 0) == sample_seed(0, "t/0", 0)
    seeds = {sample_seed(s, t, i) for s in (0, 1) for t in ("t/0", "t/1") for i in range(3)}
    assert len(seeds) == 12 and max(seeds) < 2**31


# ----------------------------------------------------------------------------------------------------------------
# prompt formats

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_prompt_quotes_the_task_and_prefills_the_answer_with_fence_and_prompt():
    from distily.code_eval.prompts import chat_prompt, extra_stops, prompt_builder

    task = Task("t/0", 'def add(a, b):\n    """Sum."""\n', "", "add")
    seen = []

    def render(messages):
        seen.append(messages)
        return "<RENDERED>"

    expected_user = (
        "Complete the following python function. Reply with the whole function in one code block.\n"
        '```python\ndef add(a, b):\n    """Sum."""\n```'
    )
    assert chat_prompt(task, render) == '<RENDERED>```python\ndef add(a, b):\n    """Sum."""\n'
    assert seen == [[{"role": "user", "content": expected_user}]]
    assert prompt_builder("raw", None)(task) == task.prompt
    assert extra_stops("raw") == () and "\n```" in extra_stops("chat")
    with pytest.raises(ConfigError, match="--prompt_format raw"):
        prompt_builder("chat", None)
    with pytest.raises(ConfigError, match="not one of raw, chat"):
        EvalConfig(tasks="humaneval", allow_code_execution=True, prompt_format="instruct")


def test_chat_format_renders_the_tokenizers_template_and_stops_at_the_closing_fence():
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    backend = TransformersBackend(model, tokenizer, "cpu", progress=False, prompt_format="chat")
    task = Task("t/0", "def f():\n", "", "f")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith("<|im_start|>user\nx<|im_end|>")
    prompt = backend.prompt_of(task)
    assert prompt.endswith("<|im_start|>assistant\n```python\ndef f():\n") and "Complete the following" in prompt
    assert backend.extra_stops and "\n```" in backend.extra_stops
    # the closing fence cuts a completion exactly as a stop sequence of the language does
    assert truncate_at_stop("    return 1\n```\nThis function", STOP_SEQUENCES["python"] + backend.extra_stops) == (
        "    return 1"
    )
    with pytest.raises(ConfigError, match="has none"):
        TransformersBackend(model, make_tiny_tokenizer(), "cpu", progress=False, prompt_format="chat")


# ----------------------------------------------------------------------------------------------------------------
# transformers


@pytest.fixture(scope="module")
def char_backend():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    return TransformersBackend(model, make_tiny_tokenizer(), "cpu", batch_size=8, progress=False)


def test_greedy_is_deterministic_and_batched_left_padding_equals_one_at_a_time(char_backend):
    languages = ["python"] * len(PROMPTS)
    batched = char_backend.complete(PROMPTS, languages, max_new_tokens=24)
    assert batched == char_backend.complete(PROMPTS, languages, max_new_tokens=24)
    widths = {len(char_backend.tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(widths) == len(PROMPTS)  # different lengths: the batch is really padded
    alone = [char_backend.complete([prompt], ["python"], max_new_tokens=24)[0] for prompt in PROMPTS]
    assert batched == alone
    assert any(batched)  # it generated something, and nothing after a stop sequence
    assert all(truncate_at_stop(text, STOP_SEQUENCES["python"]) == text for text in batched)


def test_stopping_criterion_marks_the_rows_that_hold_a_stop_sequence(char_backend):
    """Per row, on the generated part only (after the prompt's width), special tokens (padding) ignored."""
    from distily.code_eval.generate import StopOnSequences

    tok = char_backend.tokenizer
    prompt = tok("\ndef ")["input_ids"]  # a stop sequence inside the prompt does not count
    rows = [prompt + tok("1\ndef x")["input_ids"], prompt + tok("1\nreturn")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in rows])
    criteria = StopOnSequences(tok, len(prompt), [STOP_SEQUENCES["python"]] * 2)
    assert criteria(ids, None).tolist() == [True, False]
    assert StopOnSequences(tok, len(prompt), [STOP_SEQUENCES["go"]] * 2)(ids, None).tolist() == [False, False]


def test_seeded_sampling_repeats_and_does_not_depend_on_the_other_tasks(char_backend):
    tasks = [Task("a", PROMPTS[0], "", "f"), Task("b", PROMPTS[1], "", "f")]
    first = char_backend.generate(tasks, 3, 1.0, 16, seed=0)
    assert [c.task_id for c in first] == ["a"] * 3 + ["b"] * 3 and [c.line for c in first] == list(range(1, 7))
    assert first == char_backend.generate(tasks, 3, 1.0, 16, seed=0)
    other = char_backend.generate(tasks, 3, 1.0, 16, seed=1)
    assert [c.completion for c in other] != [c.completion for c in first]
    only_b = char_backend.generate(tasks[1:], 3, 1.0, 16, seed=0)
    assert [c.completion for c in only_b] == [c.completion for c in first[3:]]


def test_greedy_samples_are_copies(char_backend):
    tasks = [Task("a", PROMPTS[0], "", "f")]
    completions = char_backend.generate(tasks, 2, 0.0, 8, seed=0)
    assert completions[0].completion == completions[1].completion
    assert completions[0].completion == char_backend.complete([PROMPTS[0]], ["python"], 8)[0]


# ----------------------------------------------------------------------------------------------------------------
# the CLI end to end


@pytest.fixture
def canonical_backend():
    """A backend that returns the canonical solution of each task: a model known to be correct."""

    class Canonical:
        def generate(self, tasks, num_samples, temperature, max_new_tokens, seed):
            rows = [(t.task_id, CANONICAL[t.task_id]) for t in tasks for _ in range(num_samples)]
            return [Completion(task_id, text, line) for line, (task_id, text) in enumerate(rows, start=1)]

    register_generation_backend("canonical")(lambda model, config: Canonical())
    yield "canonical"
    GENERATION_BACKENDS.unregister("canonical")


def test_a_correct_model_scores_pass_at_1_of_one(tmp_path, canonical_backend, capsys):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    argv = ["eval", str(model), "--tasks", "humaneval", "--task_file", str(tasks), "--allow_code_execution", "true"]
    assert main([*argv, "--generation_backend", canonical_backend, "--output_dir", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert lines == [{"task_id": key, "completion": value} for key, value in CANONICAL.items()]
    whole = json.loads((out / "distily_eval.json").read_text())
    result = whole["code_eval"]["humaneval"]
    assert result["scores"] == {"humaneval": {"pass@1": 1.0}} and result["totals"]["passed"] == 3
    assert whole["student"] == {"tasks": {"humaneval": {"pass@1": 1.0}}}  # what the card and sweeps read
    assert result["generation"]["backend"] == "canonical" and result["generation"]["num_samples"] == 1
    assert "humaneval pass@1 = 1.0000" in capsys.readouterr().out
    # several samples, pass@k up to num_samples; no --output_dir: the model's folder
    assert (
        main(
            [
                *argv,
                "--generation_backend",
                canonical_backend,
                "--num_samples",
                "2",
                "--limit",
                "2",
                "--pass_at_k",
                "1,2",
            ]
        )
        == 0
    )
    result = json.loads((model / "distily_eval.json").read_text())["code_eval"]["humaneval"]
    assert result["scores"] == {"humaneval": {"pass@1": 1.0, "pass@2": 1.0}} and result["num_samples"] == 4
    assert len((model / "completions.jsonl").read_text().splitlines()) == 4


@pytest.fixture
def tiny_model_dir(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "student"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_tiny_random_llama_end_to_end_through_transformers(tiny_model_dir, tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    out = tmp_path / "out"
    argv = ["eval", str(tiny_model_dir), "--tasks", "humaneval", "--task_file", str(tasks), "--output_dir", str(out)]
    flags = ["--allow_code_execution", "true", "--generation_backend", "transformers", "--max_new_tokens", "12"]
    flags += ["--num_samples", "2", "--pass_at_k", "1,2", "--temperature", "0.8", "--device", "cpu"]
    assert main([*argv, *flags]) == 0
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [line["task_id"] for line in lines] == ["t/0", "t/0", "t/1", "t/1", "t/2", "t/2"]
    result = json.loads((out / "distily_eval.json").read_text())["code_eval"]["humaneval"]
    assert result["num_tasks"] == 3 and result["num_samples"] == 6
    assert result["scores"] == {"humaneval": {"pass@1": 0.0, "pass@2": 0.0}}  # random weights write no code
    assert result["totals"] == {"passed": 0, "failed": 6, "timed_out": 0}
    assert result["generation"]["backend"] == "transformers" and result["generation"]["temperature"] == 0.8
    statuses = [s["status"] for problem in result["problems"].values() for s in problem["samples"]]
    assert statuses == ["failed"] * 6
    # the same seed draws the same completions again
    assert main([*argv, *flags]) == 0
    again = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert again == lines


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp


def test_llama_cpp_greedy_text_equals_transformers(tmp_path):
    """The same f32 weights greedy-decoded by llama.cpp and by PyTorch write the same text.

    Both compute in float32, but with different kernels (summation order), so logits differ by ~1e-5; the model is
    trained on a short text first so its top tokens win by far more than that (a random model's near-ties could
    flip), and the comparison is then exact.
    """
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from distily.code_eval.generate import LlamaCppBackend
    from distily.export import export

    from .test_export import TEXT, trained

    del llama_cpp
    tokenizer = make_byte_bpe_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # exported into the GGUF, rendered by llama.cpp's side below
    torch.manual_seed(0)
    model = trained(LlamaForCausalLM(tiny_llama_config(vocab_size=BYTE_VOCAB)), tokenizer)
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = tmp_path / "student-f32.gguf"
    export(folder, ["gguf"], "f32", path)

    prompt = TEXT[:40]
    torch_text = TransformersBackend(model, tokenizer, "cpu", progress=False).complete([prompt], ["python"], 32)[0]
    backend = LlamaCppBackend(str(path), progress=False)
    try:
        assert backend.complete(prompt, "python", 32) == torch_text
        assert torch_text  # the trained model continues its text
    finally:
        backend.close()
    # --prompt_format chat: the GGUF's template rendered by llama.cpp's side is transformers' rendering
    task = Task("t/0", TEXT[:40], "", "f")
    torch_chat = TransformersBackend(model, tokenizer, "cpu", progress=False, prompt_format="chat")
    chat = LlamaCppBackend(str(path), progress=False, prompt_format="chat")
    try:
        assert chat.prompt_of(task) == torch_chat.prompt_of(task)
        assert chat.prompt_of(task).endswith("<|im_start|>assistant\n```python\n" + TEXT[:40])
        tokens = chat.llm.tokenize(chat.prompt_of(task).encode(), add_bos=False, special=True)
        hf_tokens = tokenizer(chat.prompt_of(task), add_special_tokens=False)["input_ids"]
        assert tokens == hf_tokens
    finally:
        chat.close()

    # and through the CLI: a .gguf MODEL goes to llama_cpp (auto) and the results go beside it
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    argv = ["eval", str(path), "--tasks", "humaneval", "--task_file", str(tasks), "--allow_code_execution", "true"]
    assert main([*argv, "--max_new_tokens", "16", "--limit", "1"]) == 0
    result = json.loads((tmp_path / "distily_eval.json").read_text())["code_eval"]["humaneval"]
    assert result["generation"]["backend"] == "llama_cpp" and result["num_samples"] == 1
    assert len((tmp_path / "completions.jsonl").read_text().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(self, packed=False):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(RunFolder, "load_student", refuse)


def test_bad_requests_fail_before_loading_the_model(tiny_model_dir, tmp_path, capsys, no_model_loading):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    out = tmp_path / "out"
    base = ["eval", str(tiny_model_dir), "--tasks", "humaneval", "--task_file", str(tasks), "--output_dir", str(out)]
    yes = ["--allow_code_execution", "true"]

    assert main(base) == 2
    assert "--allow_code_execution true" in capsys.readouterr().err

    assert main([*base, *yes, "--num_samples", "1", "--pass_at_k", "10"]) == 2
    assert "--num_samples is 1" in capsys.readouterr().err

    assert main([*base, *yes, "--generation_backend", "hf"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("llama_cpp", "transformers", "vllm"))

    monkeypatch_vllm = pytest.MonkeyPatch()
    monkeypatch_vllm.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    try:
        assert main([*base, *yes, "--generation_backend", "vllm"]) == 2
    finally:
        monkeypatch_vllm.undo()
    assert "pip install 'distily[gpu]'" in capsys.readouterr().err

    assert main([*base, *yes, "--generation_backend", "llama_cpp"]) == 2  # a folder is not a .gguf file
    assert "not a .gguf file" in capsys.readouterr().err

    assert main(["eval", str(tiny_model_dir), "--tasks", "humaneval,perplexity", *yes]) == 2
    assert "mixes a code task" in capsys.readouterr().err
    assert not out.exists() and not (tiny_model_dir / "completions.jsonl").exists()


def test_config_checks():
    with pytest.raises(ConfigError, match="--temperature"):
        EvalConfig(tasks="humaneval", allow_code_execution=True, temperature=-1.0)
    with pytest.raises(ConfigError, match="pass@10 needs"):
        EvalConfig(tasks="humaneval", allow_code_execution=True, pass_at_k="1,10", num_samples=5)
    assert EvalConfig(tasks="humaneval", allow_code_execution=True, pass_at_k="1,10", num_samples=10).k_list == [1, 10]
    assert EvalConfig(tasks="perplexity").code_tasks == []  # the other tasks are untouched by the new fields


def test_llama_cpp_missing_names_the_package(monkeypatch, tmp_path):
    from distily.code_eval.generate import LlamaCppBackend

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(ConfigError, match="pip install llama-cpp-python"):
        LlamaCppBackend(str(tmp_path / "m.gguf"))
