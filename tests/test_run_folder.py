"""RunFolder: the one owner of a run folder's names, status, checkpoints, saved config and student."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, TrainerCallback

from distily.cli import main
from distily.config import (
    RUN_ARGUMENT_CLASSES,
    ConfigError,
    DataArguments,
    DistillationConfig,
    ExportArguments,
    PeftArguments,
    RunEvalArguments,
    StudentArguments,
    TeacherArguments,
)
from distily.errors import ExportError
from distily.run_folder import FINISHED, INTERRUPTED, RUNNING, RunFolder

from .conftest import tiny_llama_config


def checkpoint(folder: Path, step: int, *, weights: bool = True, state: bool = True) -> Path:
    """A checkpoint-STEP folder as Trainer leaves it, or as a save killed midway leaves it."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "training_args.bin").write_bytes(b"not weights")  # every checkpoint has it, complete or not
    if weights:
        save_file({"w": torch.full((2,), float(step))}, str(path / "model.safetensors"))
    if state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Status


def test_status_of_no_record_running_finished_and_unreadable(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert not run.is_run and run.status is None and run.manifest == {} and not run.is_finished
    assert not run.update_manifest(status="failed")  # no folder: nothing is created
    run.path.mkdir()
    manifest = RunFolder.start_manifest(command="distily --teacher t", teacher="t")
    run.write_manifest(manifest)
    assert run.is_run and run.status == RUNNING and run.teacher == "t"
    assert run.manifest["distily_version"] and run.manifest["torch_version"] and run.manifest["started_at"]
    assert run.manifest["command"] == "distily --teacher t" and "cpu" in run.manifest["hardware"]
    run.write_manifest(RunFolder.set_status(manifest, FINISHED, global_step=3))
    assert run.is_finished and run.manifest["global_step"] == 3 and run.manifest["finished_at"]
    assert run.update_manifest(objective=[1.5]) and run.manifest["objective"] == [1.5] and run.is_finished
    run.manifest_path.write_text("{not json")
    assert run.is_run and run.status == "unreadable"


class Explode(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("the machine caught fire")


def test_a_run_that_raises_is_recorded_as_interrupted_and_must_be_resumed(
    tiny_teacher_dir, text_corpus, tmp_path, capsys
):
    from distily.run import train

    from .test_cli import base_args

    out = tmp_path / "run"
    args = base_args(tiny_teacher_dir, text_corpus, out, "--save_strategy", "steps", "--save_steps", "1")
    from distily.cli import parse_with_yaml
    from distily.config import train_kwargs

    with pytest.raises(RuntimeError, match="caught fire"):
        train(**train_kwargs(parse_with_yaml(args)), callbacks=[Explode()])
    run = RunFolder(out)
    assert run.status == INTERRUPTED and "RuntimeError: the machine caught fire" in run.manifest["error"]
    assert run.latest_checkpoint() == out / "checkpoint-1"  # step 2 raised before its save
    with pytest.raises(ExportError, match=r"not finished.*--resume_from_checkpoint true"):
        run.require_finished()
    assert main(args) == 2  # not overwritten silently
    assert "holds an unfinished run. Continue it with --resume_from_checkpoint true" in capsys.readouterr().err
    assert main([*args, "--resume_from_checkpoint", "true"]) == 0
    assert run.is_finished and run.manifest["resumed_from"] == str(out / "checkpoint-1")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path, caplog):
    run = RunFolder(tmp_path)
    assert run.latest_checkpoint() is None
    for step in (1, 2, 9, 10):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 11, weights=False)  # killed after the optimizer, before the weights? no state either way
    checkpoint(tmp_path, 12, state=False)  # weights written, trainer state (written last) not
    sharded = checkpoint(tmp_path, 13, weights=False)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    save_file({"a": torch.zeros(1)}, str(sharded / "model-00001-of-00002.safetensors"))  # the second shard is missing
    (tmp_path / "checkpoint-99-partial").mkdir()
    (tmp_path / "checkpoint-x").mkdir()

    assert [p.name for p in run.checkpoints()] == [f"checkpoint-{n}" for n in (1, 2, 9, 10, 11, 12, 13)]
    with caplog.at_level(logging.WARNING, logger="distily.run_folder"):
        assert run.latest_checkpoint() == tmp_path / "checkpoint-10"  # numeric order: 10 after 9
    assert "['checkpoint-11', 'checkpoint-12', 'checkpoint-13']" in caplog.text
    save_file({"b": torch.zeros(1)}, str(sharded / "model-00002-of-00002.safetensors"))
    assert run.latest_checkpoint() == sharded  # now every shard is there
    adapter = checkpoint(tmp_path, 14, weights=False)
    save_file({"lora": torch.zeros(1)}, str(adapter / "adapter_model.safetensors"))
    assert run.latest_checkpoint() == adapter  # a LoRA checkpoint's weights are its adapter


def test_resume_checkpoint_rules(tmp_path):
    run = RunFolder(tmp_path / "run")
    for off in (None, False, "", "false", "no", "None"):
        assert run.resume_checkpoint(off) is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        run.resume_checkpoint("true")  # a fresh folder
    run.path.mkdir()
    checkpoint(run.path, 2)
    incomplete = checkpoint(run.path, 4, weights=False)
    with pytest.raises(ConfigError, match="is not a distily run folder"):
        run.resume_checkpoint("true")  # checkpoints, but no distily run record
    run.write_manifest(RunFolder.start_manifest())
    assert run.resume_checkpoint("true") == run.resume_checkpoint(True) == run.path / "checkpoint-2"
    with pytest.raises(ConfigError, match=r"is incomplete.*beside it: \['checkpoint-2'\]"):
        run.resume_checkpoint(str(incomplete))
    with pytest.raises(ConfigError, match="does not exist"):
        run.resume_checkpoint(str(run.path / "checkpoint-7"))
    assert run.resume_checkpoint(str(run.path / "checkpoint-2")) == run.path / "checkpoint-2"


def test_the_trainer_resumes_from_the_same_checkpoint_the_cli_picks(tmp_path):
    """``DistillationTrainer.train(resume_from_checkpoint=True)`` skips a newer checkpoint whose weights were never
    written, where transformers' own get_last_checkpoint would pick it and fail; and it ends where an
    uninterrupted run ends."""
    from distily import DistillationTrainer, build_student

    from .test_trainer import make_config, random_blocks

    def pair():
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(tiny_llama_config())
        return teacher, build_student(teacher, {"num_hidden_layers": 2})

    data = random_blocks(32)
    config = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    teacher, student = pair()
    DistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path, **config), train_dataset=data
    ).train()
    out = tmp_path / "out"
    expected = load_file(out / "checkpoint-4" / "model.safetensors")
    (out / "checkpoint-4" / "model.safetensors").unlink()  # a save killed midway
    teacher, student = pair()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path, **config), train_dataset=data
    )
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    for name, value in expected.items():
        assert torch.equal(student.state_dict()[name], value), name


# ----------------------------------------------------------------------------------------------------------------
# Saved config and student


def run_configs(tmp_path):
    return (
        TeacherArguments(teacher="some/teacher"),
        StudentArguments(student_config={"num_hidden_layers": 2}),
        PeftArguments(),
        DataArguments(dataset="python-stdlib", max_eval_blocks=8, eval_fraction=0.1),
        DistillationConfig(
            output_dir=str(tmp_path / "run"), use_cpu=True, seq_len=64, temperature=2.0, report_to="none"
        ),
        ExportArguments(export="safetensors"),
        RunEvalArguments(eval_tasks="hellaswag", eval_tasks_limit=5),
    )


def test_configs_round_trip_through_the_saved_yaml(tmp_path):
    configs = run_configs(tmp_path)
    run = RunFolder(tmp_path / "run")
    with pytest.raises(ConfigError, match="holds no saved config"):
        run.configs()
    run.write_config(*configs)
    assert [type(c) for c in run.configs()] == list(RUN_ARGUMENT_CLASSES)
    for saved, original in zip(run.configs(), configs, strict=True):
        assert saved == original
    (data,) = run.configs((DataArguments,))
    assert data == configs[3]
    assert run.saved_config()["seq_len"] == 64 and "hub_token" not in run.saved_config()  # no secrets
    values = run.saved_config()
    values["learning_rat"] = 0.1
    run.config_path.write_text(json.dumps(values))  # JSON is YAML
    with pytest.raises(ConfigError, match="'learning_rat' \\(did you mean 'learning_rate'\\?\\)"):
        run.configs((DataArguments,))


def test_load_student_merges_an_adapter_folder_and_refuses_what_is_not_a_model(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")  # the adapter records this folder as its base
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
    model, tokenizer = RunFolder(tmp_path / "adapter").load_student()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert len(tokenizer) == len(tiny_tokenizer)

    with pytest.raises(ExportError, match="holds no model"):
        RunFolder(tmp_path).load_student()
    with pytest.raises(ExportError, match="only BitNet runs write one"):
        RunFolder(tmp_path / "base").load_student(packed=True)


# ----------------------------------------------------------------------------------------------------------------
# Exports read the run


def test_exporting_an_unfinished_run_is_refused_with_the_fix(tmp_path, tiny_tokenizer, capsys):
    from distily.export import export

    run = RunFolder(tmp_path / "run")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(run.path)
    tiny_tokenizer.save_pretrained(run.path)
    for status in (RUNNING, INTERRUPTED):
        run.write_manifest({"status": status})
        with pytest.raises(ExportError, match=f"not finished \\(status '{status}'\\).*--resume_from_checkpoint true"):
            export(run.path, ["safetensors"])
        assert main(["export", str(run.path), "--format", "safetensors"]) == 2
        assert "Finish or resume it before exporting" in capsys.readouterr().err
        assert not run.export_dir.exists()
    run.write_manifest({"status": FINISHED})
    assert export(run.path, ["safetensors"]).output == run.export_dir


def test_export_and_gguf_writer_do_not_reach_into_the_teacher_or_the_student_builder():
    """The GGUF pre-tokenizer comes from the run record; the export never loads the teacher to find it."""
    import distily.export.gguf as gguf_module

    tree = ast.parse(Path(gguf_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(f"{'.' * node.level}{node.module or ''}")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {name for name in imported if "teacher" in name or "students" in name}, imported
