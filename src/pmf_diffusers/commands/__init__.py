# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The subcommands of `pmf`, one module each.

Every module `commands/<name>.py` defines

* `add_parser(subparsers) -> argparse.ArgumentParser`: adds its subparser (with an epilog of examples) and calls
  `parser.set_defaults(func=run)`;
* `run(args) -> int`: runs the command and returns the exit status.

A module's top level imports only the standard library and torch-free pmf modules, so that `pmf --help` stays fast;
torch and diffusers are imported inside `run`. User errors are raised as `CLIError`; library errors (`ValueError`,
`OSError`, ...) are left to `pmf_diffusers.cli.main`, which prints every error as one line.
"""

from __future__ import annotations

import argparse

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
