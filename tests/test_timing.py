"""The training time budget (--max_train_seconds) and the per-phase timings a run prints and records."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from distily.cli import main
from distily.config import ConfigError, DistillationConfig
from distily.timing import PhaseTimes, TrainTimeBudget

from .test_cli import base_args


class FakeClock:
    """Advances ``step`` seconds every time it is read."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def drive(budget: TrainTimeBudget, max_steps: int, save_strategy: str = "steps") -> tuple[int, TrainerControl]:
    """Runs the callback through a training loop of ``max_steps`` steps; returns the step it stopped at."""
    args = SimpleNamespace(device=torch.device("cpu"), save_strategy=save_strategy)
    state, control = TrainerState(max_steps=max_steps), TrainerControl()
    budget.on_train_begin(args, state, control)
    for step in range(1, max_steps + 1):
        state.global_step = step
        budget.on_step_end(args, state, control)
        if control.should_training_stop:
            return step, control
    return max_steps, control


def test_budget_stops_before_the_step_that_would_pass_it(monkeypatch):
    # Each step reads the clock once and is seen to take 10 s (the first read is on_train_begin at t=10).
    monkeypatch.setattr(TrainTimeBudget, "clock", staticmethod(FakeClock(10.0)))
    budget = TrainTimeBudget(35.0)
    stopped, control = drive(budget, max_steps=100)
    # After 3 steps 30 s have passed and a 4th (mean 10 s) would end at 40 s > 35 s.
    assert stopped == 3 and budget.stopped_at_step == 3
    assert control.should_save  # a budget stop leaves a checkpoint to resume from

    monkeypatch.setattr(TrainTimeBudget, "clock", staticmethod(FakeClock(10.0)))
    budget = TrainTimeBudget(40.0)  # exactly enough for 4 steps
    assert drive(budget, max_steps=100, save_strategy="no")[0] == 4
    assert not drive(budget, max_steps=100, save_strategy="no")[1].should_save


def test_budget_that_covers_the_run_changes_nothing(monkeypatch):
    monkeypatch.setattr(TrainTimeBudget, "clock", staticmethod(FakeClock(1.0)))
    budget = TrainTimeBudget(1000.0)
    stopped, control = drive(budget, max_steps=5)
    assert stopped == 5 and budget.stopped_at_step is None and not control.should_save


@pytest.mark.parametrize("value", [0, -5, math.inf, math.nan, True])
def test_bad_budget_is_refused(value, tmp_path):
    with pytest.raises(ConfigError, match="--max_train_seconds must be a number of seconds > 0"):
        DistillationConfig(output_dir=str(tmp_path), max_train_seconds=value, report_to="none")


def test_phase_times_add_up():
    phases = PhaseTimes()
    with phases.phase("a"):
        pass
    with phases.phase("a"), phases.phase("b"):
        pass
    assert list(phases.seconds) == ["a", "b"]
    assert phases.table().splitlines()[-1].startswith("total")


def test_a_budget_stopped_run_evaluates_saves_and_resumes_to_the_uninterrupted_weights(
    tiny_teacher_dir, text_corpus, tmp_path, monkeypatch, capsys
):
    steps = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "100", "--lr_scheduler_type", "constant"]
    whole = tmp_path / "whole"
    assert main(base_args(tiny_teacher_dir, text_corpus, whole, *steps)) == 0
    capsys.readouterr()

    # Every step seems to take 10 s: a 45 s budget stops after 4 steps (a 5th would end at 50 s).
    monkeypatch.setattr(TrainTimeBudget, "clock", staticmethod(FakeClock(10.0)))
    cut = tmp_path / "cut"
    assert main(base_args(tiny_teacher_dir, text_corpus, cut, *steps, "--max_train_seconds", "45")) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((cut / "distily_run.json").read_text())
    assert manifest["status"] == "finished" and manifest["global_step"] == 4 and manifest["max_steps"] == 6
    assert manifest["stopped_by_time_budget"] is True
    assert {"load teacher", "prepare data", "evaluate before", "train", "evaluate after"} <= set(
        manifest["phase_seconds"]
    )
    assert "Trained 4 of 6 steps: --max_train_seconds 45 ended training." in printed
    assert "Seconds per phase" in printed
    assert json.loads((cut / "eval_results.json").read_text())["eval_student_ppl"] > 0
    assert (cut / "checkpoint-4" / "trainer_state.json").is_file()  # saved at the stop, though save_steps is 100

    # Resumed without the budget, the run ends with exactly the weights of the uninterrupted one.
    monkeypatch.undo()
    resumed = [*base_args(tiny_teacher_dir, text_corpus, cut, *steps), "--resume_from_checkpoint", "true"]
    assert main(resumed) == 0
    assert json.loads((cut / "distily_run.json").read_text())["global_step"] == 6
    expected, got = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
