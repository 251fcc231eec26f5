"""The ``distily`` command: thin wrappers that parse arguments and call the library.

``distily [train] --teacher ... --student_config '{...}' --dataset ... --output_dir ...`` trains (``train`` is
the default subcommand). Every field of the run's config dataclasses is a flag; ``--config run.yaml`` loads
defaults from a YAML file and flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from .config import RUN_ARGUMENT_CLASSES, ConfigError, check_known_keys, load_yaml_file, run_parser

logger = logging.getLogger("distily")

# Subcommand name -> "module:function" taking argv (imported lazily, so `distily --help` stays fast).
COMMANDS: dict[str, str] = {
    "train": "distily.cli:train_command",
    "synth": "distily.teacher.synth:synth_command",
}


def parse_with_yaml(argv: list[str], classes=RUN_ARGUMENT_CLASSES, prog: str = "distily"):
    """Parse ``argv`` into ``classes``; values from ``--config FILE`` are defaults that flags override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = run_parser(classes)
    parser.prog = prog
    parser.add_argument("--config", default=None, help="YAML file of flag: value defaults; flags override it.")
    if known.config:
        values = load_yaml_file(known.config)
        check_known_keys(values, f"Config file {known.config!r}", classes)
        parser.set_defaults(**values)
    namespace_objects = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False)
    return tuple(obj for obj in namespace_objects if not isinstance(obj, argparse.Namespace))


def train_command(argv: list[str]) -> int:
    from .run import main_command, train

    teacher_args, student_args, data_args, config = parse_with_yaml(argv)
    train(teacher_args, student_args, data_args, config, command=main_command())
    return 0


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("distily").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distily`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

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
    except (ConfigError, FileNotFoundError) as err:
        # Bad input: one clear line, no traceback.
        print(f"distily {command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if type(err).__module__.startswith("distily"):
            print(f"distily {command}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
