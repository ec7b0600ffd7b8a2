"""The `ercflow` command line: thin subcommands, one module each.

A command module exposes `add_arguments(parser)` and `run(args) -> int` (the exit status). Only the module
of the command being run is imported, so a command whose module is missing or broken does not take the
others down.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "check": ("ercflow.check", "validate params.yaml: every problem at once, one per line"),
    "schema": ("ercflow.schema", "write the JSON Schema of params.yaml"),
    "inspect": ("ercflow.inspect", "what each feature/media store holds, and whether it is stale"),
    "predict": ("ercflow.predict", "a trained model on new conversations (transcript table + media)"),
    "recipe": ("ercflow.recipe", "apply a paper's settings (recipes/) to params.yaml"),
}


def _global_flags(parser: argparse.ArgumentParser, default) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=default, help="log warnings and errors only")
    g.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug messages too")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of `command` (only) are added by its module."""
    from pipeline import __version__

    parser = argparse.ArgumentParser(prog="ercflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"ercflow {__version__}")
    _global_flags(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _global_flags(p, argparse.SUPPRESS)   # -q/-v after the command too; SUPPRESS keeps the global value
        if name == command:
            mod = importlib.import_module(module)
            if mod.__doc__:
                p.description = mod.__doc__
                p.formatter_class = argparse.RawDescriptionHelpFormatter
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    return parser


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    from pipeline.logs import quiet_libraries, setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    try:
        parser = build_parser(command)
    except ImportError as e:
        print(f"ercflow {command}: not available ({e})", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        level = setup_logging("WARNING" if args.quiet else "DEBUG" if args.verbose else None)
    except ValueError as e:   # a bad $ERCFLOW_LOG_LEVEL
        parser.error(str(e))
    quiet_libraries(level)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
