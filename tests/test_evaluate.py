"""`distily eval`: perplexity on local corpora, the lm-evaluation-harness seam, and the card that uses them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

from distily.cli import main
from distily.config import ConfigError, EvalConfig
from distily.evaluate import harness_scores, lm_eval_arguments, perplexity, resolve_backend, run_lm_eval

from .conftest import TINY_VOCAB, tiny_llama_config


def test_perplexity_is_exp_of_the_mean_token_cross_entropy():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    blocks = Dataset.from_dict({"input_ids": torch.randint(3, TINY_VOCAB, (5, 12)).tolist()})
    result = perplexity(model, blocks, batch_size=2)
    ids = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        expected_loss = model(input_ids=ids, labels=ids).loss.item()  # mean over all 5 × 11 predicted tokens
    assert result["eval_tokens"] == 55
    assert result["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-5)


def test_harness_scores_keep_metrics_and_drop_stderr_and_aliases():
    results = {
        "results": {
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.25, "acc_stderr,none": 0.01, "acc_norm,none": 0.3},
            "arc_easy": {"acc,none": 0.5, "acc_stderr,none": "N/A"},
        }
    }
    assert harness_scores(results) == {"hellaswag": {"acc": 0.25, "acc_norm": 0.3}, "arc_easy": {"acc": 0.5}}


def test_lm_eval_backend_is_vllm_only_on_cuda_with_vllm(monkeypatch):
    import importlib.util

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "hf"
    arguments = lm_eval_arguments("runs/x", ["hellaswag"], "auto", cpu, batch_size=4, limit=10)
    assert arguments == {
        "model": "hf",
        "model_args": "pretrained=runs/x,dtype=float32",
        "tasks": ["hellaswag"],
        "batch_size": 4,
        "limit": 10,
        "num_fewshot": None,
        "confirm_run_unsafe_code": False,
        "device": "cpu",
    }
    unsafe = lm_eval_arguments("runs/x", ["mbpp"], "hf", cpu, allow_code_execution=True)
    assert unsafe["confirm_run_unsafe_code"] is True  # lm-eval's code tasks refuse to run without it
    # On a CUDA machine with vLLM installed, auto picks vLLM (never run here: no GPU; this checks the choice).
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "vllm" else real_find_spec(name))
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda) == "vllm"
    gpu_arguments = lm_eval_arguments("runs/x", ["arc_easy"], "auto", cuda, gguf_file=None)
    assert gpu_arguments["model"] == "vllm" and "device" not in gpu_arguments
    assert gpu_arguments["model_args"] == "pretrained=runs/x,dtype=auto,gpu_memory_utilization=0.8"


def test_missing_lm_eval_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval":
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ConfigError, match=r"pip install 'distily\[eval\]'"):
        run_lm_eval(lm_eval_arguments("m", ["hellaswag"], "hf", torch.device("cpu")))


def test_eval_config_validation():
    assert EvalConfig(tasks="perplexity, hellaswag").task_list == ["perplexity", "hellaswag"]
    with pytest.raises(ConfigError, match="--tasks is empty"):
        EvalConfig(tasks=" , ")
    with pytest.raises(ConfigError, match="--lm_eval_backend 'tpu'"):
        EvalConfig(lm_eval_backend="tpu")


def test_eval_command_on_a_run_matches_its_own_eval_and_feeds_the_card(tiny_teacher_dir, text_corpus, tmp_path, capsys):
    """`distily eval RUN` reuses the run's data settings, so its perplexity equals the run's eval_student_ppl;
    `distily export` then puts the numbers on the card."""
    from distily.export import export
    from distily.export.model_card import parse_front_matter

    from .test_cli import base_args

    out = tmp_path / "run"
    assert main(base_args(tiny_teacher_dir, text_corpus, out)) == 0
    assert main(["eval", str(out), "--tasks", "perplexity"]) == 0
    evaluation = json.loads((out / "distily_eval.json").read_text())
    run_eval = json.loads((out / "eval_results.json").read_text())
    assert evaluation["student"]["perplexity"] == pytest.approx(run_eval["eval_student_ppl"], rel=1e-4)
    assert evaluation["teacher"]["perplexity"] == pytest.approx(run_eval["eval_teacher_ppl"], rel=1e-4)
    assert evaluation["student"]["eval_tokens"] == run_eval["eval_tokens"]
    assert "student:" in capsys.readouterr().out

    # Harness results (as lm-eval would return them) appear on the card with mean and geometric mean.
    evaluation["student"]["tasks"] = {"arc_easy": {"acc": 0.25}, "piqa": {"acc": 0.64}}
    evaluation["teacher"]["tasks"] = {"arc_easy": {"acc": 0.5}, "piqa": {"acc": 0.72}}
    (out / "distily_eval.json").write_text(json.dumps(evaluation))
    export(out, ["safetensors"], output=tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| arc_easy (acc) | 0.5000 | 0.2500 |" in card
    assert "| benchmark mean | 0.6100 | 0.4450 |" in card
    assert "| benchmark geometric mean | 0.6000 | 0.4000 |" in card
    results = parse_front_matter(card)["model-index"][0]["results"]
    assert [r["metrics"][0]["type"] for r in results] == ["perplexity", "acc", "acc"]
    assert (
        results[1]["dataset"] == {"name": "arc_easy", "type": "arc_easy"} and results[1]["metrics"][0]["value"] == 0.25
    )


def test_eval_of_a_missing_model_fails_cleanly(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "MODEL (a run folder or model folder) is missing" in capsys.readouterr().err
