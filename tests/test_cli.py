"""The `distily` command: end-to-end runs, YAML configs, overwrite protection and bad-input errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from distily.cli import main, parse_with_yaml
from distily.config import RUN_ARGUMENT_CLASSES, config_to_dict, configs_from_dict, load_yaml_file, train_kwargs


def base_args(teacher, corpus, out, *extra):
    return [
        "--teacher", str(teacher),
        "--student_config", '{"num_hidden_layers": 2}',
        "--dataset", str(corpus),
        "--dataset_cache_dir", str(out.parent / "cache"),
        "--output_dir", str(out),
        "--seq_len", "32",
        "--max_steps", "3",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "tensorboard",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_train_end_to_end_writes_a_complete_run(tiny_teacher_dir, text_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *base_args(tiny_teacher_dir, text_corpus, out)]) == 0
    printed = capsys.readouterr().out
    assert "eval perplexity" in printed and "student" in printed

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(out)("def")["input_ids"]
    manifest = json.loads((out / "distily_run.json").read_text())
    assert manifest["status"] == "finished" and manifest["global_step"] == 3
    assert manifest["distily_version"]
    start = json.loads((out / "eval_start_results.json").read_text())
    end = json.loads((out / "eval_results.json").read_text())
    assert start["eval_student_ppl"] > 0 and end["eval_student_ppl"] > 0
    assert start["eval_teacher_ppl"] == pytest.approx(end["eval_teacher_ppl"], rel=1e-6)
    assert (out / "trainer_state.json").is_file() and (out / "all_results.json").is_file()
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"

    # The saved config reloads to the very same objects.
    saved = load_yaml_file(out / "distily_config.yaml")
    reparsed = parse_with_yaml(["--config", str(out / "distily_config.yaml")])
    from_dict = configs_from_dict(saved)
    for one, two in zip(reparsed, from_dict, strict=True):
        assert one == two
    assert config_to_dict(*reparsed) == saved
    assert saved["student_config"] == {"num_hidden_layers": 2}


def test_yaml_values_are_overridden_by_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"teacher": "gpt2", "temperature": 2.0, "loss": "reverse_kl", "seq_len": 64}))
    parsed = train_kwargs(parse_with_yaml(["--config", str(config_file), "--temperature", "3.0"]))
    teacher, config = parsed["teacher_args"], parsed["config"]
    assert teacher.teacher == "gpt2"
    assert config.temperature == 3.0 and config.loss == "reverse_kl" and config.seq_len == 64


def test_finished_run_is_not_overwritten_silently(tiny_teacher_dir, text_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(tiny_teacher_dir, text_corpus, out)) == 0
    weights = (out / "model.safetensors").read_bytes()
    assert main(base_args(tiny_teacher_dir, text_corpus, out)) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == weights
    assert main(base_args(tiny_teacher_dir, text_corpus, out, "--overwrite_output_dir", "true", "--seed", "7")) == 0
    assert (out / "model.safetensors").read_bytes() != weights


def test_a_folder_that_is_not_a_run_is_never_replaced(tiny_teacher_dir, text_corpus, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(base_args(tiny_teacher_dir, text_corpus, out, "--overwrite_output_dir", "true")) == 2
    assert "holds no distily run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_resume_latest_checkpoint_through_the_cli(tiny_teacher_dir, text_corpus, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = base_args(tiny_teacher_dir, text_corpus, out, "--save_strategy", "steps", "--save_steps", "2")
    assert main(args) == 0
    uninterrupted = load_file(out / "model.safetensors")  # the weights of the run that was never stopped
    # Simulate a run killed after its step-2 checkpoint: drop what came after, mark it unfinished.
    manifest = json.loads((out / "distily_run.json").read_text())
    manifest["status"] = "running"
    (out / "distily_run.json").write_text(json.dumps(manifest))
    (out / "model.safetensors").unlink()
    (out / "checkpoint-3").rename(out / "checkpoint-3-partial")
    (out / "checkpoint-4").mkdir()  # an incomplete save: no trainer_state.json
    (out / "checkpoint-5").mkdir()  # another one: trainer state, but its weights were never written
    (out / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    assert main([*args, "--resume_from_checkpoint", "true"]) == 0
    manifest = json.loads((out / "distily_run.json").read_text())
    assert manifest["status"] == "finished" and manifest["global_step"] == 3
    # The newest complete checkpoint was chosen (not checkpoint-3-partial, -4 or -5) ...
    assert manifest["resumed_from"] == str(out / "checkpoint-2")
    # ... and training on from it ends with exactly the uninterrupted run's weights.
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_resume_refuses_an_incomplete_checkpoint_and_a_folder_that_is_not_a_run(
    tiny_teacher_dir, text_corpus, tmp_path, capsys
):
    out = tmp_path / "run"
    args = base_args(tiny_teacher_dir, text_corpus, out, "--save_strategy", "steps", "--save_steps", "2")
    assert main(args) == 0
    (out / "checkpoint-2" / "model.safetensors").unlink()  # as if the save had been killed midway
    weights = (out / "model.safetensors").read_bytes()
    assert main([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 2
    err = capsys.readouterr().err
    assert "is incomplete" in err and "Complete checkpoints beside it: ['checkpoint-3']" in err
    assert (out / "model.safetensors").read_bytes() == weights

    # A folder distily did not write (here: a plain Trainer output with a checkpoint) is never resumed into.
    other = tmp_path / "not_a_run"
    other.mkdir()
    shutil.copytree(out / "checkpoint-3", other / "checkpoint-3")
    for resume in ("true", str(other / "checkpoint-3")):
        assert main([*base_args(tiny_teacher_dir, text_corpus, other), "--resume_from_checkpoint", resume]) == 2
        assert "is not a distily run folder" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["checkpoint-3"]


BAD_INPUTS = [
    (["--loss", "kl_forward"], "Unknown loss 'kl_forward'.*forward_kl"),
    (["--student_config", "{num_hidden_layers: 2"], "--student_config is not valid JSON"),
    (["--student_config", '{"num_layerz": 2}'], "does not have: \\['num_layerz'\\]"),
    (["--student_config", '{"vocab_size": 50}'], "vocab_size=50 but the teacher's vocabulary has 128"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--alpha", "1.5"], "--alpha must be in \\[0, 1\\]"),
    (["--seq_len", "4096"], "seq_len=4096 is longer than the student's 128 positions"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_bad_input_fails_before_writing_anything(extra, message, tiny_teacher_dir, text_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*base_args(tiny_teacher_dir, text_corpus, out), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()


def test_missing_teacher_and_empty_dataset_fail_cleanly(tiny_teacher_dir, text_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(tmp_path / "no_such_teacher", text_corpus, out)) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(base_args(tiny_teacher_dir, empty, out)) == 2
    assert "empty" in capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": f"x = {i}\n" * 30}) for i in range(30)))
    assert main(base_args(tiny_teacher_dir, rows, out)) == 2
    assert "no text column 'text'" in capsys.readouterr().err
    assert main([*base_args(tiny_teacher_dir, rows, out), "--dataset_text_field", "body", "--max_steps", "1"]) == 0
    assert not (tmp_path / "never").exists()


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("teacher: gpt2\nlearning_rat: 0.1\n")
    assert main(["--config", str(config_file)]) == 2
    assert "'learning_rat' (did you mean 'learning_rate'?)" in capsys.readouterr().err


def test_every_config_field_is_a_flag():
    from dataclasses import fields

    from distily.config import run_parser

    parser = run_parser(RUN_ARGUMENT_CLASSES)
    options = {option for action in parser._actions for option in action.option_strings}
    names = [item.name for cls in RUN_ARGUMENT_CLASSES for item in fields(cls) if item.init]
    assert len(names) > 150  # every TrainingArguments field too, not a handful
    missing = [name for name in names if not name.startswith("_") and f"--{name}" not in options]
    assert missing == []
    for field in ("teacher", "student_config", "dataset", "loss", "loss_kwargs", "temperature", "alpha", "seq_len"):
        assert f"--{field}" in options


def test_teacher_folder_without_a_model_is_a_clear_error(text_corpus, tmp_path, capsys):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    out = tmp_path / "run"
    assert main(base_args(not_a_model, text_corpus, out)) == 2
    err = capsys.readouterr().err
    assert "Could not load teacher" in err and "smollm2-135m-instruct" in err
    assert not out.exists()
