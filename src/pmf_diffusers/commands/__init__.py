# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The subcommands of `pmf`, one module each.

Every module `commands/<name>.py` defines

* `add_parser(subparsers) -> argparse.ArgumentParser`: adds its subparser (with an epilog of examples) and calls
  `parser.set_defaults(func=run)`;
* `run(args) -> int`: runs the command and returns the exit status.

A module's top level imports only the standard library and torch-free pmf modules, so that `pmf --help` stays fast;
torch and diffusers are imported inside `run`. User errors are raised as `CLIError`; library errors (`ValueError`,
`OSError`, ...) are left to `pmf_diffusers.cli.main`, which prints every error as one line. Library errors name API
parameters in backticks (`per_class=N`); the command line shows them as its options (`--per-class N`, see
`option_names`).
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Mapping

# Modules registered by `pmf_diffusers.cli`, in the order `pmf --help` lists them.
COMMAND_MODULES = ("generate", "convert", "push", "push_space", "eval", "toy")

EXIT_OK = 0


class CLIError(Exception):
    """An error with a message meant for the user (printed as one line, no traceback)."""


def add_command_parser(subparsers, name: str, *, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A subparser laid out like every other `pmf` command: the help text, and the epilog printed as written."""
    return subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


# An API parameter as library errors write it: `name`, `name=VALUE` (e.g. `per_class=N`) or `name=True` (a switch).
_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`\s]+))?`")


def option_names(text: str, options: Mapping[str, str]) -> str:
    """`text` (a library error) with the API parameters that `options` maps (name -> option) written as options:
    `name` and `name=True` -> `--option`, `name=VALUE` -> `--option VALUE`. Other backticked text is kept."""

    def as_option(match: re.Match) -> str:
        name, value = match.groups()
        option = options.get(name)
        if option is None:
            return match.group(0)
        return option if value in (None, "True") else f"{option} {value}"

    return _PARAMETER.sub(as_option, text)


def parser_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """API parameter (the option's `dest`) -> long option string, for every option of `parser`."""
    options = {}
    for action in parser._actions:
        long_options = [string for string in action.option_strings if string.startswith("--")]
        if long_options and action.dest not in (argparse.SUPPRESS, "help"):
            options.setdefault(action.dest, long_options[0])
    return options


@contextlib.contextmanager
def options_in_errors(options: Mapping[str, str]):
    """Re-raise the library's `ValueError`s and `OSError`s raised inside with the API parameters they name written
    as command-line options (`option_names`); type and traceback stay."""
    try:
        yield
    except (ValueError, OSError) as error:
        if len(error.args) == 1 and isinstance(error.args[0], str):
            error.args = (option_names(error.args[0], options),)
        raise


def check_guidance_options(guidance_scale: float | None, guidance_interval: list[float] | None) -> None:
    """`--guidance-scale` / `--guidance-interval` checked by the pipeline's own rule
    (`pipelines.pipeline_pmf.check_guidance_settings`), reported with the option names."""
    from ..pipelines.pipeline_pmf import check_guidance_settings

    try:
        check_guidance_settings(guidance_scale=guidance_scale)
    except ValueError:
        raise CLIError(f"--guidance-scale must be a finite number ≥ 1 (1 = no guidance), got {guidance_scale:g}") from None
    try:
        check_guidance_settings(guidance_interval=guidance_interval)
    except ValueError:
        raise CLIError(
            "--guidance-interval A B must satisfy 0 ≤ A ≤ B ≤ 1, got {:g} {:g}".format(*guidance_interval)
        ) from None
