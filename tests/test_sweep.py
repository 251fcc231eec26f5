"""`distily sweep`: search spaces over config fields, the objective, pruning, shared storage, resume, reports."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from distily.cli import main
from distily.config import ConfigError, DistillationConfig, config_to_dict, known_fields, load_yaml_file, train_kwargs
from distily.sweep import SweepConfig, load_sweep
from distily.sweep.config import parse_sweep_argv, run_configs
from distily.sweep.runner import MetricsError, TrialError, Worker, combine, open_study
from distily.sweep.space import get_path, sample_config, set_path
from distily.sweep.storage import fail_dead_trials, open_storage, worker_id

REPO = Path(__file__).resolve().parent.parent
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
POSTGRES_ENV = "DISTILY_TEST_POSTGRES_URL"
# What `bash .ci/postgres` creates; used by a plain `make test` when such a server is running.
LOCAL_POSTGRES = "postgresql://distily:distily@localhost:5432/distily_test"


def distillation_config(configs) -> DistillationConfig:
    return next(config for config in configs if isinstance(config, DistillationConfig))


def fixed_settings(teacher, corpus, cache, **changes) -> dict:
    values = dict(
        teacher=str(teacher),
        student_config={"num_hidden_layers": 2},
        dataset=str(corpus),
        dataset_cache_dir=str(cache),
        seq_len=32,
        max_steps=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    values.update(changes)
    return values


def write_sweep(path: Path, fixed: dict, search_space: dict, **fields) -> Path:
    path.write_text(yaml.safe_dump({"fixed": fixed, "search_space": search_space, **fields}, sort_keys=False))
    return path


@pytest.fixture
def tiny_sweep(tmp_path, tiny_teacher_dir, text_corpus):
    """A sweep file over learning rate and loss (with a conditional loss parameter) on the tiny teacher."""
    return write_sweep(
        tmp_path / "tiny.yaml",
        fixed_settings(tiny_teacher_dir, text_corpus, tmp_path / "cache", eval_strategy="no"),
        {
            "learning_rate": {"low": "1e-4", "high": 1.0e-2, "log": True},  # YAML reads 1e-4 as text
            "loss": ["forward_kl", "generalized_jsd"],
            "loss_kwargs.beta": {"low": 0.1, "high": 0.9, "when": {"loss": "generalized_jsd"}},
        },
        n_trials=4,
        sampler_seed=0,
        sweep_dir=str(tmp_path / "sweep"),
    )


# ----------------------------------------------------------------------------------------------------------------
# Search space notation and objective


def test_paths_reach_into_dict_fields_and_lists():
    flat = {"student_config": '{"num_hidden_layers": 4}', "loss_kwargs": None, "components": [{"w": 1}, {"w": 2}]}
    set_path(flat, "student_config.intermediate_size", 256)
    set_path(flat, "loss_kwargs.beta", 0.3)
    set_path(flat, "components.1.w", 5)
    set_path(flat, "lr_scheduler_kwargs.min_lr_rate", 0.1)
    assert flat["student_config"] == {"num_hidden_layers": 4, "intermediate_size": 256}
    assert flat["loss_kwargs"] == {"beta": 0.3}
    assert flat["components"] == [{"w": 1}, {"w": 5}]
    assert flat["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    assert get_path(flat, "components.1.w") == (True, 5)
    assert get_path(flat, "student_config.hidden_size") == (False, None)
    with pytest.raises(ConfigError, match="list of 2 items"):
        set_path(flat, "components.7.w", 1)


def test_conditional_entries_and_dict_choices_build_the_trial_config(tmp_path):
    sweep = SweepConfig(
        fixed={"teacher": "gpt2", "seq_len": 64},
        search_space={
            "student_config": {"choices": [{"n_layer": 2}, {"n_layer": 3, "n_embd": 64}]},
            "student_config.n_head": [2, 4],
            "loss": ["forward_kl", "generalized_jsd"],
            "loss_kwargs.beta": {"low": 0.1, "high": 0.9, "when": {"loss": "generalized_jsd"}},
            "learning_rate": {"low": "1e-4", "high": "1e-2", "log": True},
        },
    )
    picks = {"student_config": {"n_layer": 3, "n_embd": 64}, "student_config.n_head": 4, "loss": "forward_kl"}
    flat, chosen = sample_config(sweep.params, sweep.fixed, lambda p: picks.get(p.path, p.extremes()[0]))
    assert flat["student_config"] == {"n_layer": 3, "n_embd": 64, "n_head": 4}
    assert "loss_kwargs" not in flat and "loss_kwargs.beta" not in chosen  # beta only with generalized_jsd
    assert flat["learning_rate"] == pytest.approx(1e-4)
    # An Optuna trial samples the same entries; dict choices travel through Optuna as JSON and come back as dicts.
    trial = optuna.trial.FixedTrial(
        {
            "student_config": json.dumps({"n_layer": 2}, sort_keys=True),
            "student_config.n_head": 2,
            "loss": "generalized_jsd",
            "loss_kwargs.beta": 0.25,
            "learning_rate": 3e-3,
        }
    )
    flat, chosen = sample_config(sweep.params, sweep.fixed, lambda p: p.suggest(trial))
    assert flat["student_config"] == {"n_layer": 2, "n_head": 2}
    assert flat["loss_kwargs"] == {"beta": 0.25}
    # The stored parameters rebuild the same run config (this is how best/trial-N.yaml is written).
    stored = {**trial.params}
    rebuilt = sweep.config_from_params(stored, tmp_path / "out")
    assert {k: v for k, v in rebuilt.items() if k != "output_dir"} == flat
    config = train_kwargs(run_configs(rebuilt))["config"]
    assert config.learning_rate == pytest.approx(3e-3) and config.loss_kwargs == {"beta": 0.25}


def test_geometric_mean_objective_reports_the_arithmetic_mean_too():
    sweep = SweepConfig(fixed={"teacher": "gpt2"}, search_space={"alpha": {"low": 0.5, "high": 1.0}},
                        metrics=["eval_student_ppl", "eval_loss"])  # fmt: skip
    values, reported = combine(sweep, {"eval_student_ppl": 4.0, "eval_loss": 9.0, "eval_runtime": 1.0})
    assert values == [pytest.approx(6.0)]  # sqrt(4 * 9)
    assert reported == {"geometric_mean": pytest.approx(6.0), "arithmetic_mean": pytest.approx(6.5)}
    assert combine(sweep, {"eval_student_ppl": 7.0, "eval_loss": 7.0})[0] == [pytest.approx(7.0)]
    with pytest.raises(TrialError, match="geometric mean needs positive"):
        combine(sweep, {"eval_student_ppl": 4.0, "eval_loss": 0.0})
    with pytest.raises(TrialError, match="non-finite"):
        combine(sweep, {"eval_student_ppl": math.nan, "eval_loss": 1.0})
    with pytest.raises(MetricsError, match=r"reported no \['eval_loss'\].*eval_student_ppl"):
        combine(sweep, {"eval_student_ppl": 4.0})
    multi = SweepConfig(fixed={"teacher": "gpt2"}, search_space={"alpha": {"low": 0.5, "high": 1.0}},
                        metrics=["eval_student_ppl", "student_parameters"], multi_objective=True)  # fmt: skip
    assert multi.directions == ["minimize", "minimize"]
    assert combine(multi, {"eval_student_ppl": 4.0, "student_parameters": 100}) == ([4.0, 100.0], {})


def test_a_pass_rate_enters_a_minimised_geometric_mean_as_its_failure_rate():
    fixed = {"teacher": "gpt2", "eval_tasks": "humaneval", "allow_code_execution": True}
    space = {"alpha": {"low": 0.5, "high": 1.0}}
    sweep = SweepConfig(fixed=fixed, search_space=space, metrics=["humaneval_pass@1", "eval_student_ppl"])
    values, reported = combine(sweep, {"humaneval_pass@1": 0.2, "eval_student_ppl": 20.0})
    assert values == [pytest.approx(math.sqrt(0.8 * 20.0))]  # (1 - 0.2) and 20, both better lower
    assert reported["arithmetic_mean"] == pytest.approx((0.8 + 20.0) / 2)
    # a better pass rate at the same perplexity is a lower objective
    assert combine(sweep, {"humaneval_pass@1": 0.5, "eval_student_ppl": 20.0})[0][0] < values[0]
    alone = SweepConfig(fixed=fixed, search_space=space, metrics=["humaneval_pass@1"], direction="maximize")
    assert combine(alone, {"humaneval_pass@1": 0.25})[0] == [pytest.approx(0.25)]  # maximised as it is
    with pytest.raises(ConfigError, match="add eval_tasks: humaneval and allow_code_execution: true"):
        SweepConfig(fixed={"teacher": "gpt2"}, search_space=space, metrics=["humaneval_pass@1"])
    with pytest.raises(ConfigError, match="is not something a run reports"):
        SweepConfig(fixed=fixed, search_space=space, metrics=["humaneval_pass@0"])


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any trial starts (and before the sweep folder exists)

BAD_SWEEPS = [
    ({"search_space": {"temprature": {"low": 1, "high": 2}}}, r"'temprature' is not a config field.*'temperature'"),
    ({"search_space": {"alpha.beta": {"low": 0.1, "high": 0.2}}}, r"reaches into 'alpha', which is not a dict"),
    ({"search_space": {"temperature": {"low": 2.0, "high": 1.0}}}, r"low must be less than high.*low=2.0, high=1.0"),
    ({"search_space": {"learning_rate": {"low": 0, "high": 1e-3, "log": True}}}, r"a log range needs low > 0"),
    ({"search_space": {"temperature": {"low": 1, "hi": 2}}}, r"unknown keys \['hi'\]"),
    ({"search_space": {"alpha": {"low": 0.5, "high": 1.5}}}, r"alpha = 1\.5 gives an invalid run config.*\[0, 1\]"),
    ({"search_space": {"loss": ["forward_kl", "kl_reverse"]}}, r"loss = 'kl_reverse'.*Unknown loss"),
    ({"search_space": {"temperature": 2.0}}, r"put it under 'fixed:'"),
    ({"search_space": {"seq_len": {"low": 16, "high": 64}}, "fixed": {"seq_len": 32}}, r"both fixed and in search"),
    (
        {
            "search_space": {"loss_kwargs.beta": {"low": 0.1, "high": 0.9, "when": {"loss": "reverse_kl"}}},
            "fixed": {"loss": "forward_kl"},
        },
        r"loss is fixed to 'forward_kl', not \['reverse_kl'\], so this entry would never be sampled",
    ),
    ({"search_space": {"output_dir": ["a", "b"]}}, r"cannot sweep 'output_dir'"),
    ({"sampler": "bayes"}, r"Unknown sampler 'bayes'.*Known samplers: nsgaii, random, tpe"),
    ({"pruner": "medain"}, r"Unknown pruner 'medain'. Did you mean 'median'"),
    ({"pruner": "median", "pruner_kwargs": {"n_startup": 2}}, r"pruner 'median' does not accept pruner_kwargs"),
    ({"pruner": "median", "fixed": {"eval_strategy": "no"}}, r"needs evaluations during training"),
    (
        {"multi_objective": True, "metrics": ["eval_student_ppl", "student_parameters"], "pruner": "median"},
        r"cannot prune multi-objective",
    ),
    ({"metrics": ["student_ppl"]}, r"metric 'student_ppl' is not something a run reports"),
    ({"direction": "minimise"}, r"direction 'minimise' is not one of minimize, maximize"),
    (
        {"storage": "postgresql://distily:secret@127.0.0.1:1/nowhere"},
        r"Cannot open storage 'postgresql://distily:\*\*\*@",
    ),
    ({"storage": "sqlite:////no/such/folder/study.db"}, r"folder '/no/such/folder' does not exist"),
    ({"storage": "journal:/no/such/folder/study.log"}, r"folder '/no/such/folder' does not exist"),
    ({"storage": "study.db"}, r"is not a URL"),
    ({"max_steps_typo": 3}, r"unknown keys: 'max_steps_typo'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SWEEPS)
def test_bad_sweeps_fail_before_any_trial(change, message, tmp_path, capsys):
    fixed = {"teacher": str(tmp_path / "never-loaded"), "eval_strategy": "steps", "eval_steps": 2, "seq_len": 32}
    fixed.update(change.pop("fixed", {}))
    values = {"search_space": {"temperature": {"low": 1.0, "high": 2.0}}, "sweep_dir": str(tmp_path / "sweep")}
    values.update(change)
    path = write_sweep(tmp_path / "bad.yaml", fixed, values.pop("search_space"), **values)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "secret" not in err  # passwords never appear in messages
    assert not (tmp_path / "sweep").exists()


def test_sweep_flags_override_the_file_and_run_flags_override_fixed(tiny_sweep):
    path, overrides, fixed = parse_sweep_argv(
        [str(tiny_sweep), "--n_trials", "7", "--storage", "journal:x.log", "--max_steps", "9", "--alpha=0.5"]
    )
    sweep = load_sweep(path, fixed_overrides=fixed, **overrides)
    assert (sweep.n_trials, sweep.storage) == (7, "journal:x.log")
    assert sweep.fixed["max_steps"] == 9 and sweep.fixed["alpha"] == 0.5
    with pytest.raises(ConfigError, match=r"neither a sweep flag nor a distily run flag\. Did you mean --max_steps"):
        parse_sweep_argv([str(tiny_sweep), "--max_stepz", "9"])
    with pytest.raises(ConfigError, match=r"\['learning_rate'\] are in the search_space"):
        load_sweep(tiny_sweep, fixed_overrides={"learning_rate": 0.1})


# ----------------------------------------------------------------------------------------------------------------
# Shipped sweeps


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweeps_are_valid(path):
    sweep = load_sweep(path)  # validates every field path and probes every range end as a real run config
    assert sweep.fixed["teacher"] == "smollm2-135m-instruct"
    assert sweep.name == path.stem and sweep.n_trials >= 8
    assert all(p.path.split(".")[0] in known_fields() for p in sweep.params)


def test_the_three_promised_sweeps_ship():
    assert {p.stem for p in SWEEPS} >= {"loss_and_temperature", "student_shape", "hidden_state_objective"}


def test_hidden_state_sweep_covers_the_hidden_state_fields(tmp_path):
    sweep = load_sweep(REPO / "sweeps" / "hidden_state_objective.yaml")
    swept = {p.path for p in sweep.params}
    assert {f"objective.hidden_states.{key}" for key in ("weight", "layer_mapper", "projector", "loss")} <= swept
    # A trial's choices land in the objective component and build a valid run config.
    chosen = {
        "objective.hidden_states.weight": 0.5,
        "objective.hidden_states.layer_mapper": "last_k",
        "objective.hidden_states.layer_mapper_kwargs.k": 3,
        "objective.hidden_states.projector": "orthogonal",
        "objective.hidden_states.loss": "cosine",
        "objective.hidden_states.norm": "layer_norm",
    }
    config = distillation_config(run_configs(sweep.trial_config(chosen, tmp_path / "trial")))
    hidden = config.objective["hidden_states"]
    assert hidden["weight"] == 0.5 and hidden["layer_mapper_kwargs"] == {"k": 3}
    assert (hidden["layer_mapper"], hidden["projector"], hidden["loss"], hidden["norm"]) == (
        "last_k",
        "orthogonal",
        "cosine",
        "layer_norm",
    )
    assert config.objective["logits"]["weight"] == 1.0
    # k is sampled only with last_k.
    flat = sweep.trial_config({**chosen, "objective.hidden_states.layer_mapper": "all"}, tmp_path / "other")
    assert distillation_config(run_configs(flat)).objective["hidden_states"]["layer_mapper_kwargs"] == {}


# ----------------------------------------------------------------------------------------------------------------
# Running sweeps


def _study(sweep_dir: Path, name: str, storage: str | None = None):
    storage = storage or f"sqlite:///{sweep_dir / 'study.db'}"
    return optuna.load_study(study_name=name, storage=open_storage(storage))


@pytest.mark.slow
def test_four_trial_sweep_best_trial_reproduces(tiny_sweep, tmp_path, capsys):
    assert main(["sweep", str(tiny_sweep)]) == 0
    sweep_dir = tmp_path / "sweep"
    study = _study(sweep_dir, "tiny")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    best = min(trials, key=lambda t: t.value)
    assert study.best_trial.number == best.number

    for trial in trials:
        folder = Path(trial.user_attrs["output_dir"])
        assert folder == sweep_dir / "trials" / f"trial-{trial.number:04d}"
        manifest = json.loads((folder / "distily_run.json").read_text())
        assert manifest["status"] == "finished" and manifest["sweep"]["trial"] == trial.number
        metrics = json.loads((folder / "eval_results.json").read_text())
        assert trial.value == pytest.approx(metrics["eval_student_ppl"], rel=1e-12)
        assert trial.user_attrs["geometric_mean"] == trial.user_attrs["arithmetic_mean"] == trial.value
        saved = load_yaml_file(folder / "distily_config.yaml")
        assert saved["learning_rate"] == pytest.approx(trial.params["learning_rate"])
        assert saved["loss"] == trial.params["loss"]
        assert saved["loss_kwargs"] == (
            {"beta": trial.params["loss_kwargs.beta"]} if "loss_kwargs.beta" in trial.params else {}
        )

    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"]["complete"] == 4 and len(summary["trials"]) == 4
    (row,) = summary["best"]
    assert row["number"] == best.number and row["values"] == [best.value]
    assert f"reproduce: `{row['command']}`" in (sweep_dir / "summary.md").read_text()
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (sweep_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        html = (sweep_dir / "plots" / f"{name}.html").read_text()
        assert 'src="plotly.min.js"' in html and "Plotly.newPlot" in html
    assert (sweep_dir / "plots" / "plotly.min.js").stat().st_size > 1_000_000

    # The best trial's config file is the trial's own resolved config (but for the output folder) ...
    best_config = load_yaml_file(row["config_file"])
    trial_config = load_yaml_file(sweep_dir / "trials" / f"trial-{best.number:04d}" / "distily_config.yaml")
    assert {**best_config, "output_dir": None} == {**trial_config, "output_dir": None}
    # ... and its command, run from scratch in this process, gives the same metric.
    command = row["command"].split()
    assert command[0] == "distily"
    assert main(command[1:]) == 0
    repro = json.loads((Path(best_config["output_dir"]) / "eval_results.json").read_text())
    assert repro["eval_student_ppl"] == pytest.approx(best.value, rel=1e-5)

    # Rerunning the finished sweep adds no trial; a changed definition is refused.
    capsys.readouterr()
    assert main(["sweep", str(tiny_sweep)]) == 0
    assert len(_study(sweep_dir, "tiny").get_trials()) == 4
    assert main(["sweep", str(tiny_sweep), "--max_steps", "5"]) == 2
    assert "was created from a different sweep definition (changed: fixed)" in capsys.readouterr().err


@pytest.mark.slow
def test_pruning_stops_a_deliberately_bad_trial(tmp_path, tiny_teacher_dir, text_corpus):
    path = write_sweep(
        tmp_path / "prune.yaml",
        fixed_settings(tiny_teacher_dir, text_corpus, tmp_path / "cache", max_steps=3, eval_steps=1),
        {"learning_rate": [0.001, 0.002, 50.0]},
        n_trials=3,
        pruner="median",
        pruner_kwargs={"n_startup_trials": 2},
        # Two sensible trials first, then a learning rate that wrecks the student at its first step.
        enqueue=[{"learning_rate": 0.001}, {"learning_rate": 0.002}, {"learning_rate": 50.0}],
        sweep_dir=str(tmp_path / "sweep"),
    )
    assert main(["sweep", str(path)]) == 0
    trials = _study(tmp_path / "sweep", "prune").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert [t.params["learning_rate"] for t in trials] == [0.001, 0.002, 50.0]
    bad = trials[2]
    assert list(bad.intermediate_values) == [1]  # stopped at its first evaluation, not after 3 steps
    assert all(list(t.intermediate_values) == [1, 2, 3] for t in trials[:2])
    good_at_1 = [t.intermediate_values[1] for t in trials[:2]]
    assert bad.intermediate_values[1] > max(good_at_1) or math.isnan(bad.intermediate_values[1])
    folder = tmp_path / "sweep" / "trials" / "trial-0002"
    manifest = json.loads((folder / "distily_run.json").read_text())
    assert manifest["status"] == "pruned" and "pruned at step 1" in manifest["reason"]
    assert not (folder / "model.safetensors").exists() and not (folder / "eval_results.json").exists()
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert summary["counts"] == {"complete": 2, "pruned": 1, "fail": 0, "running": 0, "waiting": 0}
    assert summary["trials"][2]["pruned_at_step"] == 1


def test_dead_trials_are_failed_but_live_workers_trials_are_not(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    study_id = storage.get_study_id_from_name("s")
    (trial_dir := tmp_path / "trial").mkdir()
    (trial_dir / "distily_run.json").write_text(json.dumps({"status": "running"}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, namespace, _ = worker_id().split("|")
    now = time.time()
    cases = {
        "this live process": (worker_id(), now),
        "a live process elsewhere": ("elsewhere|ns|1", now - 30),
        "a dead process here": (f"{host}|{namespace}|{dead.pid}", now),
        "silent elsewhere": ("elsewhere|ns|1", now - 300),
    }
    numbers = {}
    for name, (worker, beat) in cases.items():
        trial = study.ask()
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("heartbeat", beat)
        numbers[name] = trial.number
    storage.set_trial_user_attr(
        storage.get_trial_id_from_study_id_trial_number(study_id, numbers["a dead process here"]),
        "output_dir",
        str(trial_dir),
    )
    failed = fail_dead_trials(study, storage, grace_period=120)
    assert sorted(failed) == sorted([numbers["a dead process here"], numbers["silent elsewhere"]])
    states = {name: study.trials[number].state for name, number in numbers.items()}
    assert states == {
        "this live process": TrialState.RUNNING,
        "a live process elsewhere": TrialState.RUNNING,
        "a dead process here": TrialState.FAIL,
        "silent elsewhere": TrialState.FAIL,
    }
    assert "is gone" in study.trials[numbers["a dead process here"]].user_attrs["error"]
    assert re.search(r"no heartbeat for 30\d s", study.trials[numbers["silent elsewhere"]].user_attrs["error"])
    assert json.loads((trial_dir / "distily_run.json").read_text())["status"] == "failed"
    assert fail_dead_trials(study, storage, grace_period=120) == []  # a second worker finds nothing left to fail


def _worker(sweep_file: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "distily.cli", "sweep", str(sweep_file), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run_two_workers(sweep_file: Path, storage: str, study_name: str, n_trials: int = 4):
    """Worker one in a new process; once its first trial runs, worker two in this process, concurrently."""
    args = ["--n_trials", str(n_trials), "--storage", storage, "--study_name", study_name]
    other = _worker(sweep_file, *args)
    trials_dir = Path(load_sweep(sweep_file).directory) / "trials"
    deadline = time.time() + 300
    while not (trials_dir.is_dir() and any(trials_dir.iterdir())):
        assert other.poll() is None and time.time() < deadline, other.communicate()[0][-3000:]
        time.sleep(0.05)
    assert main(["sweep", str(sweep_file), *args]) == 0
    output = other.communicate(timeout=600)[0]
    assert other.returncode == 0, output[-3000:]
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials, [(t.number, t.state) for t in trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.WAITING) for t in trials)  # nothing failed or left running
    folders = [t.user_attrs["output_dir"] for t in complete]
    assert len(set(folders)) == n_trials and all(Path(f, "eval_results.json").is_file() for f in folders)
    for trial in complete:  # each trial's folder holds its own result: no trial ran twice
        metrics = json.loads(Path(trial.user_attrs["output_dir"], "eval_results.json").read_text())
        assert metrics["eval_student_ppl"] == pytest.approx(trial.value, rel=1e-12)
    return study, {t.user_attrs["worker"] for t in complete}


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tiny_sweep, tmp_path):
    _, workers = _run_two_workers(tiny_sweep, f"sqlite:///{tmp_path / 'shared.db'}", "shared")
    assert len(workers) == 2  # both took part


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if url:
        return url  # set (as CI does): an unreachable server is a failure, not a skip
    try:
        import psycopg

        psycopg.connect(LOCAL_POSTGRES, connect_timeout=2).close()
    except Exception as err:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_ENV} or run `bash .ci/postgres` ({type(err).__name__})")
    return LOCAL_POSTGRES


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(tiny_sweep):
    url = _postgres_url()
    name = f"distily-test-{uuid.uuid4().hex[:8]}"
    try:
        study, workers = _run_two_workers(tiny_sweep, url, name)
        assert len(workers) == 2
        assert study.user_attrs["distily_sweep"]["search_space"]["loss"] == ["forward_kl", "generalized_jsd"]
    finally:
        optuna.delete_study(study_name=name, storage=open_storage(url))


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_its_dead_trial_is_failed(tiny_sweep, tmp_path):
    """Here on a journal file: the worker that dies and the one that resumes are two processes sharing it."""
    sweep_dir = tmp_path / "sweep"
    storage = f"journal:{tmp_path / 'study.log'}"
    worker = _worker(tiny_sweep, "--n_trials", "2", "--storage", storage)
    manifest = sweep_dir / "trials" / "trial-0000" / "distily_run.json"
    deadline = time.time() + 300
    while not (manifest.is_file() and json.loads(manifest.read_text()).get("status") == "running"):
        assert worker.poll() is None and time.time() < deadline, worker.communicate()[0][-3000:]
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)  # no chance to clean up: the trial stays RUNNING in the storage
    worker.wait()
    assert _study(sweep_dir, "tiny", storage).trials[0].state == TrialState.RUNNING

    assert main(["sweep", str(tiny_sweep), "--n_trials", "2", "--storage", storage]) == 0
    trials = _study(sweep_dir, "tiny", storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "worker died: its worker process" in trials[0].user_attrs["error"]
    assert json.loads(manifest.read_text())["status"] == "failed"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"]["complete"] == 2 and summary["counts"]["fail"] == 1
    assert summary["best"][0]["number"] in (1, 2)


@pytest.mark.slow
def test_multi_objective_sweep_writes_a_pareto_front(tmp_path, tiny_teacher_dir, text_corpus):
    path = write_sweep(
        tmp_path / "shape.yaml",
        fixed_settings(tiny_teacher_dir, text_corpus, tmp_path / "cache", student_config={}, eval_strategy="no"),
        {"student_config.num_hidden_layers": {"low": 1, "high": 3}},
        n_trials=3,
        metrics=["eval_student_ppl", "student_parameters"],
        multi_objective=True,
        enqueue=[{"student_config.num_hidden_layers": n} for n in (1, 2, 3)],
        keep_weights=False,
        sweep_dir=str(tmp_path / "sweep"),
    )
    assert main(["sweep", str(path)]) == 0
    trials = _study(tmp_path / "sweep", "shape").get_trials()
    sizes = [t.values[1] for t in trials]
    assert sizes[0] < sizes[1] < sizes[2]  # more layers, more parameters
    for trial in trials:
        folder = Path(trial.user_attrs["output_dir"])
        assert not list(folder.glob("*.safetensors")) and (folder / "eval_results.json").is_file()
        config = load_yaml_file(folder / "distily_config.yaml")
        assert config["student_config"] == {"num_hidden_layers": trial.params["student_config.num_hidden_layers"]}
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    front = {row["number"] for row in summary["best"]}
    assert 0 in front  # the smallest student is never dominated on size
    assert all(len(row["values"]) == 2 for row in summary["best"])
    assert (tmp_path / "sweep" / "plots" / "pareto_front.png").is_file()
    config = load_yaml_file(summary["best"][0]["config_file"])
    assert config == config_to_dict(*run_configs(config))


def test_a_worker_that_loses_the_race_for_the_last_trial_returns_it_to_the_queue(tmp_path, monkeypatch):
    sweep = SweepConfig(
        fixed={"teacher": "gpt2"}, search_space={"alpha": {"low": 0.5, "high": 1.0}}, n_trials=1,
        sweep_dir=str(tmp_path / "sweep"),
    )  # fmt: skip
    storage = open_storage(sweep.storage_url, create_dirs=sweep.directory)
    study = open_study(sweep, storage)
    other = study.ask()  # another live worker took the only slot ...
    other.set_user_attr("worker", worker_id())
    other.set_user_attr("heartbeat", time.time())
    worker = Worker(sweep, study, storage, command=None)
    real_counts, calls = worker._counts, []

    def before_the_other_trial_was_visible(before=None):  # ... just after this worker's first look
        calls.append(before)
        return (0, 0) if len(calls) == 1 else real_counts(before)

    monkeypatch.setattr(worker, "_counts", before_the_other_trial_was_visible)
    worker.run()
    assert calls == [None, 1]  # looked, asked for trial 1, counted the trials ahead of it
    assert worker.ran == []
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.WAITING]
    assert study.get_trials()[1].params == {}  # handed back before anything was sampled
    assert study.ask().number == 1  # the next worker (or a rerun with more trials) picks it up


@pytest.mark.slow
def test_a_sweep_whose_trials_all_fail_stops_with_the_reason(tmp_path, tiny_teacher_dir, text_corpus, capsys):
    path = write_sweep(
        tmp_path / "failing.yaml",
        fixed_settings(tiny_teacher_dir, text_corpus, tmp_path / "cache", student_config={}),
        # The tiny teacher has 4 layers: students initialised from it cannot have 5 or 6 (known only at run time).
        {"student_config.num_hidden_layers": {"low": 5, "high": 6}},
        n_trials=4,
        max_failures=2,
        sweep_dir=str(tmp_path / "sweep"),
    )
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 trials failed in a row (max_failures=2)" in err and "between 1 and 4 layers" in err
    trials = _study(tmp_path / "sweep", "failing").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "No trial has completed yet." in summary and summary.count("between 1 and 4 layers") == 2
