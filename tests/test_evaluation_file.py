"""distily.evaluation_file: every evaluation adds to distily_eval.json, and replaces only what it measured."""

from __future__ import annotations

import json
import logging

from distily.evaluation_file import merge_evaluations, task_metrics, write_evaluation

PERPLEXITY = {
    "tasks": ["perplexity", "hellaswag"],
    "dataset": "python-stdlib",
    "student": {"eval_ppl": 20.0, "tasks": {"hellaswag": {"acc": 0.3}}},
    "teacher": {"eval_ppl": 10.0, "tasks": {"hellaswag": {"acc": 0.4}}},
}
HUMANEVAL = {
    "tasks": ["humaneval"],
    "code_eval": {"humaneval": {"scores": {"humaneval": {"pass@1": 0.25}}, "num_tasks": 4}},
    "student": {"tasks": {"humaneval": {"pass@1": 0.25}}},
}


def test_a_code_evaluation_keeps_the_perplexity_and_harness_results():
    merged = merge_evaluations(PERPLEXITY, HUMANEVAL)
    assert merged == {
        "tasks": ["perplexity", "hellaswag", "humaneval"],
        "dataset": "python-stdlib",
        "student": {"eval_ppl": 20.0, "tasks": {"hellaswag": {"acc": 0.3}, "humaneval": {"pass@1": 0.25}}},
        "teacher": {"eval_ppl": 10.0, "tasks": {"hellaswag": {"acc": 0.4}}},
        "code_eval": HUMANEVAL["code_eval"],
    }
    # and the other way round: a perplexity evaluation after it keeps humaneval
    assert merge_evaluations(HUMANEVAL, PERPLEXITY)["student"]["tasks"] == merged["student"]["tasks"]


def test_a_task_measured_again_replaces_its_entry_only():
    again = {"tasks": ["hellaswag"], "student": {"tasks": {"hellaswag": {"acc": 0.35}}}}
    merged = merge_evaluations(merge_evaluations(PERPLEXITY, HUMANEVAL), again)
    assert merged["student"] == {
        "eval_ppl": 20.0,
        "tasks": {"hellaswag": {"acc": 0.35}, "humaneval": {"pass@1": 0.25}},
    }
    assert merged["teacher"]["tasks"] == {"hellaswag": {"acc": 0.4}}
    gguf = merge_evaluations({"gguf": {"a.gguf": {"eval_ppl": 3.0}}}, {"gguf": {"b.gguf": {"eval_ppl": 4.0}}})
    assert gguf["gguf"] == {"a.gguf": {"eval_ppl": 3.0}, "b.gguf": {"eval_ppl": 4.0}}


def test_write_merges_into_the_file_and_says_what_it_replaced(tmp_path, caplog):
    path = tmp_path / "distily_eval.json"
    write_evaluation(path, PERPLEXITY)
    with caplog.at_level(logging.WARNING):
        write_evaluation(path, HUMANEVAL)
    assert "Replacing" not in caplog.text  # nothing measured twice
    with caplog.at_level(logging.WARNING):
        whole = write_evaluation(path, {"student": {"tasks": {"humaneval": {"pass@1": 0.5}}}})
    assert "student.tasks.humaneval" in caplog.text and "hellaswag" not in caplog.text
    assert json.loads(path.read_text()) == whole
    assert task_metrics(whole) == {"hellaswag_acc": 0.3, "humaneval_pass@1": 0.5}
    assert task_metrics(whole, "teacher") == {"hellaswag_acc": 0.4}
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left
