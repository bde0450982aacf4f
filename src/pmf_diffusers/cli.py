# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The `pmf` command line: registers the subcommands of `pmf_diffusers.commands` and applies one error policy.

Each subcommand lives in its own module, `pmf_diffusers/commands/<name>.py`, with `add_parser(subparsers)` and
`run(args) -> int` (see `pmf_diffusers.commands`); to add one, write the module and list it in
`commands.COMMAND_MODULES`. Building the parsers imports no torch or diffusers, so `pmf --help` is quick.

Every failure ends as one `pmf: error: ...` line on stderr and exit code 2: usage errors, the commands' `CLIError`s
and the library's own errors (`ValueError`, `OSError`, ...), whose messages are written for users. `--debug`
(before or after the command name) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .commands import COMMAND_MODULES, EXIT_OK, CLIError, option_names, parser_options

__all__ = ["CLIError", "build_parser", "main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
PROG = "pmf"

MAIN_EPILOG = """\
also:
  training:  accelerate launch examples/train_pmf.py --help   (full objective, LoRA, presets)
  demo:      python spaces_app/app.py                         (Gradio Space)

examples:
  pmf generate --class-labels 0 1 2 --output samples/
  pmf generate --model pMF-B/16 --class-labels "golden retriever" --device cuda --dtype bf16
  pmf convert pMF-B/16 ./pmf-b-16           # official checkpoint from the Hub -> diffusers folder
  pmf push ./pmf-b-16 me/pmf-b16 --dry-run
  pmf eval --model ./pmf-b-16 --reference-stats jit_in256_stats.npz --num-images 50000
  pmf toy-data data/toy                     # the toy dataset the bundled model was trained on
  pmf COMMAND --help                        # options and more examples of one command

Errors are printed as one line (`pmf: error: ...`, exit code 2); add --debug for the traceback.
"""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `pmf: error: ...` line (exit 2) instead of usage + message."""

    def error(self, message: str):
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The `pmf` parser with every command of `commands.COMMAND_MODULES` registered."""
    from . import __version__

    parser = _ArgumentParser(
        prog=PROG,
        description="pixel MeanFlow (pMF) for diffusers: one-step, latent-free image generation.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s (pmf-diffusers) {__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", parser_class=_ArgumentParser, required=True
    )
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").add_parser(subparsers)
    # `--debug` is accepted after the command name too (`pmf convert ... --debug`). SUPPRESS keeps a subcommand from
    # resetting a `--debug` given before the name.
    for command_parser in {id(p): p for p in subparsers.choices.values()}.values():
        if "--debug" not in command_parser._option_string_actions:
            command_parser.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors"
            )
        # Library errors name API parameters (`per_class=N`); the error line names this command's options.
        command_parser.set_defaults(_option_names=parser_options(command_parser))
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, CLIError):
        return text
    if isinstance(error, KeyError):  # str(KeyError) is just the quoted key
        text = f"missing key {text}"
    # The library's expected errors (bad input, missing files, the Hub) are written for users: no class name.
    if isinstance(error, (ValueError, OSError)) and not isinstance(error, UnicodeError):
        return text or type(error).__name__
    kind = type(error).__name__
    return f"{kind}: {text}" if text else kind


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `pmf` command line; returns the exit code (0 ok, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    options = {}
    try:
        args = build_parser().parse_args(argv)
        debug, options = args.debug, args._option_names
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the CLI boundary: every failure becomes one line
        if debug:
            raise
        print(f"{PROG}: error: {option_names(_one_line(error), options)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
