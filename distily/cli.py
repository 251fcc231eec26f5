"""The ``distily`` command: thin wrappers that parse arguments and call the library.

``distily [train] --teacher ... --student_config '{...}' --dataset ... --output_dir ...`` trains (``train`` is
the default subcommand). Every field of the run's config dataclasses is a flag; ``--config run.yaml`` loads
defaults from a YAML file and flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .config import RUN_ARGUMENT_CLASSES, check_known_keys, load_yaml_file, run_parser, train_kwargs
from .errors import ConfigError, DistilyError

logger = logging.getLogger("distily")

# Subcommand name -> "module:function" taking argv (imported lazily, so `distily --help` stays fast).
COMMANDS: dict[str, str] = {
    "train": "distily.cli:train_command",
    "export": "distily.cli:export_command",
    "eval": "distily.cli:eval_command",
    "sweep": "distily.cli:sweep_command",
    "synth": "distily.teacher.synth:synth_command",
    "record": "distily.cli:record_command",
    "prune": "distily.pruning.command:prune_command",
    "tokenizer": "distily.tokenizer.command:tokenizer_command",
}


def split_dotted_flags(argv: list[str], classes=RUN_ARGUMENT_CLASSES) -> tuple[list[str], dict[str, dict]]:
    """Take ``--field.key.subkey VALUE`` flags out of ``argv`` for the dict fields of ``classes``.

    Returns the other arguments and ``{field: {key: {subkey: value}}}``; values are read as YAML scalars
    (``1.0`` is a float, ``true`` a bool, ``[1, 2]`` a list). ``--objective.hidden_states.weight 1.0`` sets
    one field of one objective component.
    """
    import yaml

    dict_fields = {
        item.name
        for cls in classes
        for klass in cls.__mro__
        for item in dataclasses.fields(cls)
        if "dict" in str(vars(klass).get("__annotations__", {}).get(item.name, ""))
    }
    rest: list[str] = []
    dotted: dict[str, dict] = {}
    index = 0
    while index < len(argv):
        arg = argv[index]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in name and name.split(".")[0] in dict_fields:
            if "=" in arg:
                text = arg.split("=", 1)[1]
            elif index + 1 < len(argv):
                index += 1
                text = argv[index]
            else:
                raise ConfigError(f"--{name} needs a value, e.g. --{name} 1.0.")
            field_name, *keys = name.split(".")
            if not all(keys):
                raise ConfigError(f"--{name} is not a valid path: use --field.key.subkey VALUE.")
            node = dotted.setdefault(field_name, {})
            for key in keys[:-1]:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--{name}: {key!r} is set to a value and used as a mapping.")
            node[keys[-1]] = yaml.safe_load(text)
        else:
            rest.append(arg)
        index += 1
    return rest, dotted


def _merge(base: dict, updates: dict) -> dict:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _dict_value(value, flag: str) -> dict:
    """A dict field's base value before dotted flags apply: a mapping, a JSON string, or nothing."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--{flag} is not valid JSON ({err.msg}): {value!r}.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--{flag}.KEY flags need --{flag} to be a mapping, got {type(value).__name__}.")
    return value


def parse_with_yaml(argv: list[str], classes=RUN_ARGUMENT_CLASSES, prog: str = "distily"):
    """Parse ``argv`` into ``classes``; values from ``--config FILE`` are defaults that flags override.

    ``--field.key VALUE`` sets one key of a dict field (``--objective.hidden_states.weight 1.0``,
    ``--loss_kwargs.beta 0.5``), on top of the field's value from ``--field JSON`` or the config file.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    rest, dotted = split_dotted_flags(rest, classes)
    parser = run_parser(classes)
    parser.prog = prog
    parser.add_argument("--config", default=None, help="YAML file of flag: value defaults; flags override it.")
    values = {}
    if known.config:
        values = load_yaml_file(known.config)
        check_known_keys(values, f"Config file {known.config!r}", classes)
    if dotted:
        whole = argparse.ArgumentParser(add_help=False)
        for name in dotted:
            whole.add_argument(f"--{name}", default=None)
        given, rest = whole.parse_known_args(rest)
        for name, updates in dotted.items():
            base = getattr(given, name) if getattr(given, name) is not None else values.get(name)
            values[name] = _merge(_dict_value(base, name), updates)
    if values:
        parser.set_defaults(**values)
    namespace_objects = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False)
    return tuple(obj for obj in namespace_objects if not isinstance(obj, argparse.Namespace))


def train_command(argv: list[str]) -> int:
    from .run import main_command, train

    train(**train_kwargs(parse_with_yaml(argv)), command=main_command())
    return 0


def sweep_command(argv: list[str]) -> int:
    """``distily sweep FILE [--n_trials N] [--storage URL] [--study_name NAME] [--run_flag VALUE ...]``."""
    from .run import main_command
    from .sweep import load_sweep, run_sweep
    from .sweep.config import parse_sweep_argv

    path, overrides, fixed = parse_sweep_argv(argv)
    sweep = load_sweep(path, fixed_overrides=fixed, **overrides)
    result = run_sweep(sweep, command=main_command())
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    print(f"\nStudy {result.study_name} ({result.storage}): {counts or 'no trials'}.", flush=True)
    for best in result.best:
        print(f"Best trial {best['number']}: {best['values']} {best['params']}\n  reproduce: {best['command']}")
    print(f"Summary and plots: {result.directory / 'summary.md'}", flush=True)
    return 0


def record_command(argv: list[str]) -> int:
    """``distily record --teacher ... --dataset ... --seq_len 512 --top_k 64 --output CACHE_DIR``."""
    from .config import DataArguments, TeacherArguments
    from .teacher.recorded import RecordConfig, TeacherCache, record

    teacher_args, data_args, config = parse_with_yaml(
        argv, classes=(TeacherArguments, DataArguments, RecordConfig), prog="distily record"
    )
    output = record(teacher_args, data_args, config)
    manifest = TeacherCache(output).manifest
    splits = manifest["splits"]
    print(
        f"Teacher cache {output}: {splits['train']['blocks']} train + {splits['eval']['blocks']} eval blocks, "
        f"{manifest['bytes_per_token']} bytes/token, teacher perplexity train {splits['train']['teacher_ppl']:.3f} "
        f"eval {splits['eval']['teacher_ppl']:.3f}. Train from it with --teacher_cache {output}.",
        flush=True,
    )
    return 0


def _positional(argv: list[str], what: str, usage: str) -> tuple[str, list[str]]:
    """The first argument that is not a flag (``RUN_DIR``), and the rest."""
    if argv[:1] in (["-h"], ["--help"]) or not argv or argv[0].startswith("-"):
        if argv[:1] in (["-h"], ["--help"]):
            return "", argv
        raise ConfigError(f"{what} is missing. Usage: {usage}")
    return argv[0], argv[1:]


def export_command(argv: list[str]) -> int:
    """``distily export RUN_DIR --format safetensors,gguf --outtype q8_0 --output PATH``."""
    from .config import ExportConfig
    from .export import export_request
    from .run import run_gguf_tokenizer_pre

    usage = "distily export RUN_DIR --format safetensors|gguf --outtype f32|f16|bf16|q8_0|tq2_0|tq1_0 --output PATH"
    source, rest = _positional(argv, "RUN_DIR (the run folder to export)", usage)
    (config,) = parse_with_yaml(rest, classes=(ExportConfig,), prog="distily export RUN_DIR")
    gguf_tokenizer_pre = config.gguf_tokenizer_pre
    if gguf_tokenizer_pre is None and "gguf" in config.formats:
        gguf_tokenizer_pre = run_gguf_tokenizer_pre(source)  # the run's teacher's, also for older runs
    result = export_request(source, config, gguf_tokenizer_pre)
    for fmt, files in result.files.items():
        print(f"{fmt} ({result.outtypes[fmt]}): {', '.join(str(path) for path in files)}", flush=True)
    if result.card:
        print(f"model card: {result.card}", flush=True)
    if result.hub_url:
        print(f"pushed to the Hub: {result.hub_url}", flush=True)
    return 0


def eval_command(argv: list[str]) -> int:
    """``distily eval MODEL --tasks perplexity,hellaswag``: perplexity on local corpora, lm-eval tasks.

    ``distily eval --tasks humaneval --completions FILE --allow_code_execution true`` scores completions made
    elsewhere (no MODEL): :func:`distily.code_eval.score_completions`. ``distily eval MODEL --tasks humaneval
    --allow_code_execution true`` generates them with MODEL first: :func:`distily.code_eval.generate_and_score`.
    """
    from .evaluate import EvalConfig, evaluate_model

    usage = (
        "distily eval MODEL_OR_RUN_DIR --tasks perplexity[,lm-eval tasks] [--dataset ...], or "
        "distily eval --tasks humaneval --completions FILE --allow_code_execution true, or "
        "distily eval MODEL_OR_GGUF --tasks humaneval --allow_code_execution true [--num_samples N]"
    )
    if argv and argv[0].startswith("-") and any(arg.split("=", 1)[0] == "--completions" for arg in argv):
        return _score_completions(argv)
    model, rest = _positional(argv, "MODEL (a run folder or model folder)", usage)
    (config,) = parse_with_yaml(rest, classes=(EvalConfig,), prog="distily eval MODEL")
    if config.completions is not None:
        raise ConfigError("--completions scores completions made elsewhere: drop MODEL from the command line.")
    if config.code_tasks:
        from .code_eval import summary_table
        from .code_eval.score import generate_and_score

        print(summary_table(generate_and_score(model, config)), flush=True)
        return 0
    if model.endswith(".gguf"):
        return _evaluate_gguf(model, config)
    results = evaluate_model(model, config)
    for who, values in results.items():
        if who in ("student", "teacher"):
            print(f"{who}: {values}", flush=True)
    return 0


def _evaluate_gguf(model: str, config) -> int:
    """``distily eval FILE.gguf --tasks perplexity``: the file's perplexity in llama.cpp on its run's eval split."""
    from .evaluate_gguf import evaluate_gguf
    from .run_folder import RunFolder

    if config.task_list != ["perplexity"]:
        raise ConfigError(
            f"A .gguf MODEL is evaluated on --tasks perplexity (in llama.cpp) or humaneval; got {config.tasks!r}. "
            "Run lm-eval tasks on the run folder instead."
        )
    entry = evaluate_gguf(
        model,
        RunFolder(config.run_dir) if config.run_dir else None,
        output=config.output,
        seq_len=config.seq_len,
        max_eval_blocks=config.max_eval_blocks,
    )
    print(
        f"{Path(model).name}: eval perplexity {entry['eval_ppl']:.4f} in llama.cpp, "
        f"{entry['pytorch_ppl'] if entry['pytorch_ppl'] is None else round(entry['pytorch_ppl'], 4)} in PyTorch "
        f"({entry['eval_blocks']} blocks of {entry['seq_len']} tokens of {entry['dataset']}).",
        flush=True,
    )
    return 0


def _score_completions(argv: list[str]) -> int:
    """``distily eval --completions ...``: pass@k of a completions file, each sample run in a sandbox."""
    from .code_eval import score_completions, summary_table
    from .evaluate import EvalConfig

    (config,) = parse_with_yaml(argv, classes=(EvalConfig,), prog="distily eval --completions FILE")
    output = score_completions(
        config.completions, task=config.task_list[0], task_file_path=config.task_file,
        allow_code_execution=config.allow_code_execution, limit=config.limit, timeout=config.timeout,
        memory_mb=config.memory_limit_mb, ks=config.k_list, output_dir=config.output_dir,
    )  # fmt: skip
    print(summary_table(output), flush=True)
    return 0


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("distily").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distily`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from .version import __version__

        print(f"distily {__version__}")
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if argv[:1] in (["-h"], ["--help"]) and command == "train" and not argv[1:]:
        print(f"Subcommands: {', '.join(COMMANDS)} (default: train). Flags of `distily train`:\n")
    _setup_logging()
    module_name, function_name = COMMANDS[command].split(":")
    handler: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function_name)
    try:
        return handler(argv)
    except (DistilyError, FileNotFoundError) as err:
        # Bad input: one clear line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"distily {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
