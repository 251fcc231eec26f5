"""`distily synth`: an OpenAI-compatible API with injected faults, kill and resume, secrets, local backends."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from distily import ConfigError, TeacherArguments
from distily.cli import main, parse_with_yaml
from distily.teacher.backends import (
    GenerationRequest,
    RetryPolicy,
    RowSampling,
    SynthError,
    TransformersBackend,
    VLLMBackend,
    retry_after_seconds,
    strip_credentials,
)
from distily.teacher.synth import (
    SYNTH_ARGUMENT_CLASSES,
    SynthArguments,
    parse_expansion,
    prompt_id,
    synthesize,
    temperature_at,
)
from distily.teacher.synth_dataset import read_samples, shard_files
from distily.teacher.templates import TEMPLATES, TaskTemplate, load_template, register_template

from .fake_openai import FakeOpenAI, Fault, answer_for

KEY = "sk-distily-test-" + "Qx7Zr2Wm" * 5  # what must never appear in any output
ENV = "DISTILY_TEST_KEY"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    return KEY


def write_prompts(path: Path, count: int) -> list[str]:
    prompts = [f"Question {i}: what is {i} squared?" for i in range(count)]
    path.write_text("\n".join(prompts) + "\n")
    return prompts


def api_args(out: Path, server: FakeOpenAI, prompts_file: Path | None, **overrides) -> SynthArguments:
    values = dict(
        output_dir=str(out),
        prompts=str(prompts_file) if prompts_file else None,
        api_model="fake-gpt",
        api_base=server.base_url,
        api_key_env=ENV,
        concurrency=3,
        request_timeout=0.6,
        max_retries=4,
        backoff_base=0.05,
        backoff_max=2.0,
        shard_size=4,
        max_new_tokens=32,
    )
    values.update(overrides)
    return SynthArguments(**values)


def assert_secret_absent(*roots: Path, texts: tuple[str, ...] = ()) -> int:
    """No file under ``roots`` and none of ``texts`` contains the key; returns how many files were read."""
    scanned = 0
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), f"API key found in {path}"
                scanned += 1
    for text in texts:
        assert KEY not in text
    return scanned


def sample_ids(folder: Path) -> list[str]:
    return [row["id"] for row in read_samples(folder)]


# ----------------------------------------------------------------------------------------------------------------
# The API backend against a local server


def test_api_run_answers_every_prompt_once_through_429_500_and_timeouts(tmp_path, api_key, caplog):
    prompts = write_prompts(tmp_path / "prompts.txt", 12)
    faults = {
        prompts[1]: [Fault(429, headers={"Retry-After": "1"})],
        prompts[2]: [Fault(500), Fault(503)],
        prompts[3]: [Fault(sleep=2.0)],  # longer than request_timeout: the client times out and retries
        prompts[4]: [Fault(429, headers={"retry-after-ms": "300"})],
    }

    def fault(content, attempt):
        scripted = faults.get(content, [])
        return scripted[attempt - 1] if attempt <= len(scripted) else None

    out = tmp_path / "out"
    with FakeOpenAI(KEY, fault, delay=0.05) as server:
        result = synthesize(api_args(out, server, tmp_path / "prompts.txt"), command=["distily", "synth"])

    assert result.status == "finished"
    rows = read_samples(out)
    assert sorted(row["id"] for row in rows) == sorted(f"{prompt_id(p)}-0" for p in prompts)
    by_prompt = {row["prompt"]: row for row in rows}
    for prompt in prompts:
        assert by_prompt[prompt]["completion"] == answer_for(prompt)
        assert by_prompt[prompt]["messages"] == [{"role": "user", "content": prompt}]
    assert [by_prompt[p]["attempts"] for p in prompts[1:5]] == [2, 3, 2, 2]
    assert all(by_prompt[p]["attempts"] == 1 for p in prompts[5:])
    # Retry-After was honoured: 1 s for the first 429, 300 ms (retry-after-ms) for the second.
    for prompt, wait in ((prompts[1], 1.0), (prompts[4], 0.3)):
        times = [entry.time for entry in server.log if entry.content == prompt]
        assert times[1] - times[0] >= wait - 0.05, (prompt, times)
    assert 2 <= server.max_in_flight <= 3  # concurrent, within the limit
    # Sampling parameters reached the server.
    sent = next(entry.body for entry in server.log if entry.content == prompts[0])
    assert (sent["model"], sent["max_tokens"], sent["temperature"], sent["top_p"]) == ("fake-gpt", 32, 0.7, 1.0)

    manifest = json.loads((out / "synth_manifest.json").read_text())
    assert manifest["counts"] == {
        "prompts": 12, "planned_samples": 12, "samples": 12, "rejected": {}, "failed": 0, "pending": 0,
        "truncated_samples": 0,
    }  # fmt: skip
    assert manifest["usage"]["prompt_tokens"] == sum(len(p.split()) + 4 for p in prompts)
    assert manifest["usage"]["completion_tokens"] == sum(len(answer_for(p).split()) for p in prompts)
    assert manifest["teacher"]["api_key_env"] == ENV and manifest["teacher"]["api_model"] == "fake-gpt"
    assert manifest["sessions"][-1]["retries"] == 5
    assert sum(shard["rows"] for shard in manifest["shards"]) == 12
    assert all(len(read_samples_file(out / s["file"])) == s["rows"] for s in manifest["shards"])
    assert assert_secret_absent(out, texts=(caplog.text,)) >= 5


def read_samples_file(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_secrets_stay_out_of_files_logs_and_errors(tmp_path, api_key, caplog):
    prompts = write_prompts(tmp_path / "prompts.txt", 4)

    # A hostile server that echoes the request headers (Authorization included) in an error body.
    def leaky(content, attempt):
        return Fault(400, echo_headers=True) if content == prompts[0] else None

    out = tmp_path / "out"
    with FakeOpenAI(KEY, leaky) as server:
        result = synthesize(api_args(out, server, tmp_path / "prompts.txt"), command=["distily", "synth"])
    assert result.status == "incomplete"  # the 400 is not retried, and the rerun would retry it
    assert result.counts["samples"] == 3 and result.counts["failed"] == 1
    failure = result.manifest["failures"][f"{prompt_id(prompts[0])}-0"]
    assert "HTTP 400" in failure and "Bearer ***" in failure
    manifest_text = (out / "synth_manifest.json").read_text()
    assert strip_credentials("https://user:pw@api.example.com/v1") == "https://api.example.com/v1"
    config = yaml.safe_load((out / "synth_config.yaml").read_text())
    assert config["api_key_env"] == ENV and KEY not in json.dumps(config)

    # A server that refuses the key: the run stops with an error that does not carry it.
    with FakeOpenAI("another-key") as server, pytest.raises(SynthError) as caught:
        synthesize(api_args(tmp_path / "refused", server, tmp_path / "prompts.txt"))
    assert "refused the key" in str(caught.value) and "HTTP 401" in str(caught.value)
    shown = "".join(traceback.format_exception(caught.value))
    assert_secret_absent(tmp_path / "out", tmp_path / "refused", texts=(shown, caplog.text, manifest_text))

    # The key itself passed where its variable's name belongs is refused without being echoed.
    with pytest.raises(ConfigError, match="NAME of an environment variable") as caught:
        synthesize(api_args(tmp_path / "x", server, tmp_path / "prompts.txt", api_key_env=KEY))
    assert KEY not in str(caught.value)
    with pytest.raises(ConfigError, match=r"DISTILY_UNSET_VAR .* is not set"):
        synthesize(api_args(tmp_path / "x", server, tmp_path / "prompts.txt", api_key_env="DISTILY_UNSET_VAR"))
    assert not (tmp_path / "x").exists()


def test_kill_mid_run_then_resume_gives_every_sample_exactly_once(tmp_path, api_key):
    write_prompts(tmp_path / "prompts.txt", 30)
    out, reference = tmp_path / "killed", tmp_path / "reference"
    with FakeOpenAI(KEY, delay=0.1) as server:
        flags = [
            "synth", "--prompts", str(tmp_path / "prompts.txt"), "--api_model", "fake-gpt", "--api_base",
            server.base_url, "--api_key_env", ENV, "--concurrency", "2", "--shard_size", "3", "--max_new_tokens",
            "16", "--samples_per_prompt", "2", "--temperature", "1.0", "--temperature_end", "0.2",
            "--temperature_schedule", "linear",
        ]  # fmt: skip
        env = {**os.environ, ENV: KEY}
        process = subprocess.Popen(
            [sys.executable, "-m", "distily.cli", *flags, "--output_dir", str(out)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while len(shard_files(out)) < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        output = process.communicate(timeout=30)[0].decode()
        assert process.returncode == -signal.SIGKILL, output
        before = {path.name: path.read_bytes() for path in shard_files(out)}
        ids_before = sample_ids(out)
        assert 9 <= len(ids_before) < 60 and len(set(ids_before)) == len(ids_before)
        requests_before = len(server.log)

        assert main([*flags, "--output_dir", str(out)]) == 0  # the same command resumes
        assert main([*flags, "--output_dir", str(reference)]) == 0  # an uninterrupted run, for comparison
        requests_resumed = len(server.log) - requests_before - 60
        assert main([*flags, "--output_dir", str(out)]) == 0  # finished: nothing left to ask
        assert len(server.log) == requests_before + 60 + requests_resumed

    ids = sample_ids(out)
    assert len(ids) == len(set(ids)) == 60
    assert set(ids) == set(sample_ids(reference)) and set(ids_before) <= set(ids)
    # Only the samples that were not on disk were asked for again (a few may have been in flight at the kill).
    assert 60 - len(ids_before) <= requests_resumed <= 60 - len(ids_before) + 2
    # Shards written before the kill are untouched; every sample has the temperature of its planned position.
    assert all((out / name).read_bytes() == data for name, data in before.items())
    rows = {row["id"]: row for row in read_samples(out)}
    reference_rows = {row["id"]: row for row in read_samples(reference)}
    for sample, row in rows.items():
        assert row["temperature"] == reference_rows[sample]["temperature"]
        assert row["completion"] == reference_rows[sample]["completion"] == answer_for(row["prompt"])
        assert row["temperature"] == pytest.approx(1.0 - 0.8 * row["ordinal"] / 59, abs=1e-6)
    manifest = json.loads((out / "synth_manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["counts"]["samples"] == 60
    assert len(manifest["sessions"]) == 3  # killed (its entry was written at start), resumed, no-op
    assert_secret_absent(out, reference, texts=(output,))


def test_budget_caps_tokens_and_a_rerun_with_more_budget_finishes(tmp_path, api_key):
    write_prompts(tmp_path / "prompts.txt", 10)
    out = tmp_path / "out"
    with FakeOpenAI(KEY) as server:
        # Each request may take (its prompt estimate ~16 tokens) + max_new_tokens 32 = ~48; 150 allows 3 at once.
        result = synthesize(api_args(out, server, tmp_path / "prompts.txt", max_total_tokens=150, concurrency=1))
        assert result.status == "budget_exhausted"
        used = result.manifest["usage"]["total_tokens"]
        assert 0 < result.counts["samples"] < 10 and used <= 150
        first = result.counts["samples"]
        result = synthesize(api_args(out, server, tmp_path / "prompts.txt", max_total_tokens=10_000))
    assert result.status == "finished" and result.counts["samples"] == 10
    assert len(server.ok_contents()) == 10  # no prompt was asked twice
    assert result.manifest["sessions"][0]["samples"] == first


def test_dedup_drops_repeated_answers_and_training_data_skips_them(tmp_path, api_key, tiny_tokenizer):
    prompts = write_prompts(tmp_path / "prompts.txt", 8)
    same = {prompts[2], prompts[5], prompts[6]}

    def fault(content, attempt):
        return Fault(text="def  same():\n    return 1") if content in same else None

    out = tmp_path / "out"
    with FakeOpenAI(KEY, fault) as server:
        result = synthesize(api_args(out, server, tmp_path / "prompts.txt", dedup=True, concurrency=1))
    assert result.status == "finished"
    assert result.counts["samples"] == 6 and result.counts["rejected"] == {"duplicate": 2}
    rejected = [json.loads(line) for path in shard_files(out, "rejected-") for line in path.read_text().splitlines()]
    first = f"{prompt_id(prompts[2])}-0"
    assert {row["duplicate_of"] for row in rejected} == {first}
    assert {row["prompt"] for row in rejected} == {prompts[5], prompts[6]}

    from distily.data import load_documents

    documents = load_documents(
        __import__("distily").DataArguments(dataset=str(out), dataset_cache_dir=str(tmp_path / "c"), eval_fraction=0.3)
    )
    found = sorted(list(documents["train"]["id"]) + list(documents["eval"]["id"]))
    assert found == sorted(sample_ids(out)) and len(found) == 6


def test_seed_topics_are_expanded_once_and_reused_on_resume(tmp_path, api_key):
    listing = "Here are some:\n1. How do I open a file?\n2) What is a generator?\n- Why use a set?\n\nok\n"

    def fault(content, attempt):
        return Fault(text=listing) if content.startswith("Write 3 different questions") else None

    out = tmp_path / "out"
    with FakeOpenAI(KEY, fault) as server:
        args = api_args(out, server, None, seed_topics="files, iteration", prompts_per_topic=3)
        result = synthesize(args)
        asked = len(server.log)
        assert synthesize(args).status == "finished"
        assert len(server.log) == asked  # nothing asked again: not the topics, not the samples
    assert result.status == "finished"
    stored = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    # Both topics gave the same three lines: one prompt each (ids are content hashes).
    assert [row["prompt"] for row in stored] == ["How do I open a file?", "What is a generator?", "Why use a set?"]
    assert {row["source"] for row in stored} == {"topic:files"}
    assert sorted(r["prompt"] for r in read_samples(out)) == sorted(r["prompt"] for r in stored)
    assert result.manifest["usage"]["expansion_tokens"] > 0
    asked_topics = sorted(e.content.split("ask about ")[1].split(".")[0] for e in server.log if "Write 3" in e.content)
    assert asked_topics == ["files", "iteration"]


def test_changed_settings_and_foreign_folders_are_refused(tmp_path, api_key, capsys):
    write_prompts(tmp_path / "prompts.txt", 3)
    out = tmp_path / "out"
    with FakeOpenAI(KEY) as server:
        assert synthesize(api_args(out, server, tmp_path / "prompts.txt")).status == "finished"
        before = {path.name: path.read_bytes() for path in shard_files(out)}
        with pytest.raises(ConfigError, match=r"other settings \(changed: max_new_tokens\)"):
            synthesize(api_args(out, server, tmp_path / "prompts.txt", max_new_tokens=64))
        assert {path.name: path.read_bytes() for path in shard_files(out)} == before
        write_prompts(tmp_path / "prompts.txt", 4)
        with pytest.raises(ConfigError, match=r"prompts in .* changed"):
            synthesize(api_args(out, server, tmp_path / "prompts.txt"))
        replaced = synthesize(
            api_args(out, server, tmp_path / "prompts.txt", max_new_tokens=64, overwrite_output_dir=True)
        )
        assert replaced.counts["samples"] == 4
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        (foreign / "keep.txt").write_text("mine")
        with pytest.raises(ConfigError, match="not a synth folder"):
            synthesize(api_args(foreign, server, tmp_path / "prompts.txt", overwrite_output_dir=True))
        assert (foreign / "keep.txt").read_text() == "mine"


def test_synth_config_yaml_reloads_to_the_same_arguments(tmp_path, api_key):
    write_prompts(tmp_path / "prompts.txt", 2)
    out = tmp_path / "out"
    with FakeOpenAI(KEY) as server:
        flags = ["--prompts", str(tmp_path / "prompts.txt"), "--api_model", "m", "--api_base", server.base_url,
                 "--api_key_env", ENV, "--template", "code", "--template_kwargs", '{"language": "Go"}',
                 "--output_dir", str(out)]  # fmt: skip
        assert main(["synth", *flags]) == 0
    teacher_args, args = parse_with_yaml(flags, classes=SYNTH_ARGUMENT_CLASSES)
    reloaded = parse_with_yaml(["--config", str(out / "synth_config.yaml")], classes=SYNTH_ARGUMENT_CLASSES)
    assert reloaded == (teacher_args, args)
    row = read_samples(out)[0]
    assert row["messages"][0]["content"].startswith("Write a Go function that Question")


# ----------------------------------------------------------------------------------------------------------------
# Pieces


def test_temperature_schedule_golden_values():
    def schedule(kind, start=1.0, end=0.2):
        args = SynthArguments(
            output_dir="x", prompts="p.txt", temperature=start, temperature_end=end, temperature_schedule=kind
        )
        return [temperature_at(args, i, 5) for i in range(5)]

    assert schedule("constant", end=None) == [1.0] * 5
    assert schedule("linear") == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    half = (1 + math.cos(math.pi / 4)) / 2  # cosine at f = 1/4
    assert schedule("cosine") == pytest.approx([1.0, 0.2 + 0.8 * half, 0.6, 0.2 + 0.8 * (1 - half), 0.2])
    assert schedule("exponential") == pytest.approx([0.2 ** (i / 4) for i in range(5)])
    with pytest.raises(ConfigError, match="needs --temperature_end"):
        SynthArguments(output_dir="x", prompts="p.txt", temperature_schedule="linear")


def test_retry_policy_and_retry_after_parsing():
    policy = RetryPolicy(max_retries=5, backoff_base=1.0, backoff_max=8.0)
    delays = [policy.delay(attempt, None) for attempt in range(1, 7)]
    for attempt, delay in enumerate(delays, 1):
        cap = min(8.0, 2 ** (attempt - 1))
        assert cap / 2 <= delay <= cap
    assert policy.delay(1, 3.5) == 3.5 and policy.delay(1, 100.0) == 8.0
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= retry_after_seconds({"retry-after": date}) <= 31
    assert retry_after_seconds({}) is None and retry_after_seconds({"retry-after": "soon"}) is None


def test_expansion_parsing():
    text = "Sure! Here they are:\n1. Reverse a list\n2) Sort a dict by value\n* Parse JSON\n- Reverse a list\nok"
    assert parse_expansion(text, 10) == ["Reverse a list", "Sort a dict by value", "Parse JSON"]  # no preamble
    assert parse_expansion(text, 2) == ["Reverse a list", "Sort a dict by value"]


def test_templates_render_validate_and_extend(tmp_path):
    code = load_template("code")
    messages, raw = code.request("reverses a string.", code.parameters({"language": "Go"}))
    assert raw is None
    assert messages == [{"role": "user", "content": "Write a Go function that reverses a string. Reply with only the "
                         "code, in one code block."}]  # fmt: skip
    assert load_template("continuation").request("def f(", {}) == (None, "def f(")
    with pytest.raises(ConfigError, match="does not use"):
        code.parameters({"lang": "Go"})
    with pytest.raises(ConfigError, match=r"Unknown task template 'qna'.*Did you mean 'qa'"):
        load_template("qna")
    with pytest.raises(ConfigError, match="must contain '\\{prompt\\}'"):
        TaskTemplate(name="bad", description="", instruction="no placeholder")

    path = tmp_path / "review.yaml"
    path.write_text(
        "system: You review {language} code.\n"
        "instruction: |-\n  Review this code:\n\n  {prompt}\n"
        "defaults: {language: Go}\n"
    )
    review = load_template(str(path))
    assert review.name == "review"
    assert review.request("x := 1", review.parameters())[0] == [
        {"role": "system", "content": "You review Go code."},
        {"role": "user", "content": "Review this code:\n\nx := 1"},
    ]
    register_template(TaskTemplate(name="test-haiku", description="haiku", instruction="A haiku about {prompt}"))
    try:
        assert load_template("test-haiku").request("rust", {})[0][-1]["content"] == "A haiku about rust"
        with pytest.raises(ValueError, match="already registered"):
            register_template(TaskTemplate(name="test-haiku", description="", instruction="{prompt}"))
    finally:
        TEMPLATES.unregister("test-haiku")


def test_row_sampling_applies_each_rows_temperature_and_top_p():
    torch.manual_seed(0)
    scores = torch.randn(3, 10)
    processed = RowSampling([0.5, 0.0, 2.0], [1.0, 1.0, 0.6])(None, scores)
    torch.testing.assert_close(processed[0], scores[0] / 0.5)
    assert torch.isfinite(processed[1]).sum() == 1 and processed[1].argmax() == scores[1].argmax()
    # Row 2: temperature 2, then the smallest set of top tokens whose probability reaches 0.6.
    probs = (scores[2] / 2.0).softmax(-1)
    ordered = probs.sort(descending=True)
    keep = int((ordered.values.cumsum(0) < 0.6).sum()) + 1
    kept = set(ordered.indices[:keep].tolist())
    assert {i for i in range(10) if torch.isfinite(processed[2, i])} == kept
    torch.testing.assert_close(processed[2, list(kept)], scores[2, list(kept)] / 2.0)


# ----------------------------------------------------------------------------------------------------------------
# Local backends


def test_transformers_backend_batched_greedy_equals_one_by_one(tiny_teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from distily.teacher.loading import load_teacher

    prompts = ["def add(a, b):", "class Point:\n    def", "for i in range(10):\n    print(i"]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    args = SynthArguments(
        output_dir=str(tmp_path / "out"), prompts=str(tmp_path / "prompts.jsonl"), template="continuation",
        temperature=0.0, max_new_tokens=12, batch_size=3, device="cpu",
    )  # fmt: skip
    result = synthesize(args, TeacherArguments(teacher=str(tiny_teacher_dir)))
    assert result.status == "finished" and result.manifest["teacher"]["backend"] == "transformers"
    rows = {row["prompt"]: row for row in read_samples(tmp_path / "out")}

    model, tokenizer = load_teacher(str(tiny_teacher_dir))
    assert isinstance(model, type(AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)))
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            greedy = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=2)
        new = greedy[0, ids.shape[1] :].tolist()
        expected = new[: new.index(2)] if 2 in new else new
        row = rows[prompt]
        assert row["input"] == prompt and row["messages"] is None
        assert row["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert row["prompt_tokens"] == ids.shape[1]
        assert row["completion_tokens"] == min(len(new), len(expected) + (2 in new))
        assert row["finish_reason"] == ("stop" if 2 in new else "length")


def test_transformers_backend_chat_without_template_uses_plain_turns(tiny_teacher_dir, tmp_path):
    from distily.teacher.loading import load_teacher

    model, tokenizer = load_teacher(str(tiny_teacher_dir))
    backend = TransformersBackend(model, tokenizer, batch_size=2)
    request = GenerationRequest("a", [{"role": "user", "content": "hi"}], None, 0.8, 0.9, 5, seed=3)
    first = list(backend.generate([request, GenerationRequest("b", None, "x = 1", 0.0, 1.0, 5, seed=4)]))
    again = list(backend.generate([request, GenerationRequest("b", None, "x = 1", 0.0, 1.0, 5, seed=4)]))
    assert [g.text for g in first] == [g.text for g in again]  # the batch's seed makes sampling repeatable
    assert first[0].prompt_tokens == len(tokenizer("User: hi\n\nAssistant:", add_special_tokens=False)["input_ids"])
    assert all(1 <= g.completion_tokens <= 5 for g in first)


class FakeVLLM:
    """The parts of vllm.LLM that VLLMBackend uses, recording what it was asked."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outputs = []
        for prompt, param in zip(prompts, params, strict=True):
            best = type("Completion", (), {"text": f"<{param.temperature}>", "token_ids": [1, 2, 3],
                                           "finish_reason": "stop"})  # fmt: skip
            outputs.append(type("RequestOutput", (), {"prompt_token_ids": list(range(len(prompt))), "outputs": [best]}))
        return outputs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def test_vllm_backend_seam_and_missing_engine_error(tmp_path, tiny_tokenizer, monkeypatch):
    write_prompts(tmp_path / "prompts.txt", 5)
    engine = FakeVLLM()
    backend = VLLMBackend(engine, tiny_tokenizer, chunk_size=2, teacher="fake", sampling_params=FakeSamplingParams)
    args = SynthArguments(
        output_dir=str(tmp_path / "out"), prompts=str(tmp_path / "prompts.txt"), backend="vllm", batch_size=2,
        temperature=0.9, temperature_end=0.1, temperature_schedule="linear", max_new_tokens=7,
    )  # fmt: skip
    result = synthesize(args, backend=backend)
    assert result.status == "finished" and result.counts["samples"] == 5
    assert [len(prompts) for prompts, _ in engine.calls] == [2, 2, 1]
    params = [p for _, chunk in engine.calls for p in chunk]
    assert [p.temperature for p in params] == pytest.approx([0.9, 0.7, 0.5, 0.3, 0.1])
    assert {(p.n, p.max_tokens, p.top_p) for p in params} == {(1, 7, 1.0)}
    rows = sorted(read_samples(tmp_path / "out"), key=lambda r: r["ordinal"])
    assert [r["completion"] for r in rows] == [f"<{p.temperature}>" for p in params]
    assert [r["seed"] for r in rows] == [p.seed for p in params]
    assert engine.calls[0][0][0] == f"User: {rows[0]['prompt']}\n\nAssistant:"  # no chat template: plain turns

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vllm
    with pytest.raises(SynthError, match=r"pip install 'distily\[gpu\]'"):
        synthesize(args, TeacherArguments(teacher="smollm2-135m-instruct"))
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(SynthError, match=r"pip install 'distily\[api\]'"):
        synthesize(SynthArguments(output_dir=str(tmp_path / "o"), prompts=str(tmp_path / "prompts.txt"), api_model="m"))


def test_bad_synth_flags_fail_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (["--prompts", "p.txt", "--template", "qna"], "Unknown task template 'qna'"),
        (["--prompts", "p.txt", "--template", "code", "--template_kwargs", '{"lang": "Go"}'], "does not use"),
        ([], "Give the prompts"),
        (["--prompts", "p.txt", "--backend", "openai"], "needs --api_model"),
        (["--prompts", str(tmp_path / "none.txt"), "--teacher", "x"], "does not exist"),
        (["--prompts", "p.txt", "--top_p", "0"], "--top_p must be in"),
    ]
    for flags, message in cases:
        assert main(["synth", *flags, "--output_dir", str(out)]) == 2, flags
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_sigterm_writes_the_samples_generated_so_far(tmp_path, api_key):
    """`kill -TERM` (what a scheduler sends) flushes every sample already generated and marks the run
    interrupted; with shards far larger than the run and no timed flush, only the signal can have written them."""
    write_prompts(tmp_path / "prompts.txt", 40)
    out = tmp_path / "terminated"
    with FakeOpenAI(KEY, delay=0.05) as server:
        flags = [
            "synth", "--prompts", str(tmp_path / "prompts.txt"), "--api_model", "fake-gpt", "--api_base",
            server.base_url, "--api_key_env", ENV, "--concurrency", "2", "--shard_size", "1000",
            "--flush_seconds", "3600", "--max_new_tokens", "16", "--output_dir", str(out),
        ]  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "distily.cli", *flags],
            cwd=REPO, env={**os.environ, ENV: KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while len(server.log) < 8 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        assert not shard_files(out), "nothing is written before the signal"
        answered = len(server.log)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 128 + signal.SIGTERM, output
    ids = sample_ids(out)
    # Every answer received before the signal is on disk (two more may have been in flight), none twice.
    assert len(ids) == len(set(ids)) and answered - 2 <= len(ids) <= answered + 2, (answered, len(ids))
    manifest = json.loads((out / "synth_manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["counts"]["samples"] == len(ids)
    assert KEY not in output
