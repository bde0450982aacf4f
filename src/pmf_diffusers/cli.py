# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The `pmf` command line.

Layout (to add a subcommand: write `_add_<name>_parser(subparsers)` and `_cmd_<name>(args) -> int`, and register the
pair in `SUBCOMMANDS`):

* `build_parser()` builds the argparse tree; every subparser sets `func=_cmd_<name>`.
* `main(argv)` parses, runs `args.func(args)` and turns any exception into one `pmf: error: ...` line on stderr and
  exit code 2 (`--debug` shows the traceback instead). Heavy imports (torch, diffusers) happen inside the commands,
  so `pmf --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 2
PROG = "pmf"


class CLIError(Exception):
    """An error with a message meant for the user (printed as one line, no traceback)."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `pmf: error: ...` line (exit 2) instead of usage + message."""

    def error(self, message: str):
        hint = f" (see `{self.prog} --help`)"
        raise CLIError(f"{message}{hint}")


# --------------------------------------------------------------------------------------------------------------
# pmf convert
# --------------------------------------------------------------------------------------------------------------
CONVERT_EPILOG = """\
CHECKPOINT is either
  * a local file: an official torch `.pt`/`.pth` (flat state dict, `net.` prefix, as released) or a `.safetensors`
    file (torch-branch names); loaded with torch.load(weights_only=True), so pickled code is refused; or
  * an official size name (pMF-B/16, pMF-B/32, pMF-L/16, pMF-L/32, pMF-H/16, pMF-H/32; also spelled B/16, pmf-b-16):
    the released file is downloaded from the Hub (repo Lyy0725/pMF, cached by huggingface_hub) and the size's
    preset is used.

The architecture is inferred from the tensor shapes; any missing, unexpected or mis-shaped key is an error that
names the keys. A preset supplies the noise scale and the recommended guidance (ω and interval) saved as the
pipeline defaults; --noise-scale / --guidance-scale / --guidance-interval set or override them. Without a preset
the defaults are noise scale 1.0, ω 1.0, interval [0, 1].

examples:
  pmf convert pMF-B/16 ./pmf-b-16                         # download from the Hub and convert
  pmf convert pMF-B-16.pt ./pmf-b-16 --preset pMF-B/16    # a local copy of the released file
  pmf convert my_finetune.pt ./out --noise-scale 1.0 --guidance-scale 4.0 --guidance-interval 0.1 0.8
  pmf convert pMF-L/32 ./pmf-l-32 --overwrite

then, in Python:
  from pmf_diffusers import PMFPipeline
  pipe = PMFPipeline.from_pretrained("./pmf-b-16")
  image = pipe(class_labels="golden retriever").images[0]
"""


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name too (`pmf convert ... --debug`)."""
    common = _ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    return common


def _add_convert_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        parents=[_common_options()],
        help="convert an official pMF checkpoint into a diffusers pipeline folder",
        description="Convert an official pixel MeanFlow checkpoint into a PMFPipeline folder (safetensors).",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file, or an official size name such as pMF-B/16")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--preset", metavar="SIZE", help="official size whose settings to use and whose shapes to check")
    parser.add_argument("--noise-scale", type=float, metavar="X", help="std of the initial noise (official: 1, 2 or 4)")
    parser.add_argument("--guidance-scale", type=float, metavar="W", help="default guidance scale ω ≥ 1")
    parser.add_argument(
        "--guidance-interval", type=float, nargs=2, metavar=("A", "B"), help="default guidance interval [t_min, t_max]"
    )
    parser.add_argument("--repo-id", default=None, help="Hub repository for size names (default: Lyy0725/pMF)")
    parser.add_argument("--revision", default=None, help="Hub revision for size names")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    parser.set_defaults(func=_cmd_convert)
    return parser


def _looks_like_size_name(text: str) -> bool:
    from .conversion import resolve_preset

    try:
        resolve_preset(text)
    except ValueError:
        return False
    return True


def _resolve_checkpoint(args):
    """(checkpoint path, preset or None) for `pmf convert`."""
    from .conversion import OFFICIAL_REPO_ID, resolve_preset

    preset = resolve_preset(args.preset) if args.preset else None
    path = Path(args.checkpoint).expanduser()
    if path.is_file():
        return path, preset
    if path.exists():
        raise CLIError(f"checkpoint {str(path)!r} is not a file")
    if not _looks_like_size_name(args.checkpoint):
        raise CLIError(
            f"checkpoint file not found: {args.checkpoint!r} (give a .pt/.safetensors file or an official size name: "
            "pMF-B/16, pMF-B/32, pMF-L/16, pMF-L/32, pMF-H/16, pMF-H/32)"
        )
    size = resolve_preset(args.checkpoint)
    if preset is not None and preset is not size:
        raise CLIError(f"CHECKPOINT is {size.name} but --preset is {preset.name}; drop --preset or make them agree")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id = args.repo_id or OFFICIAL_REPO_ID
    print(f"Fetching {size.filename} from the Hub ({repo_id}) ...", flush=True)
    try:
        downloaded = hf_hub_download(repo_id, size.filename, revision=args.revision)
    except LocalEntryNotFoundError:
        raise CLIError(
            f"could not download {repo_id}/{size.filename}: the Hub is unreachable or offline (HF_HUB_OFFLINE) and the "
            "file is not in the huggingface_hub cache; download it on a connected machine and pass the file path"
        ) from None
    return Path(downloaded), size


def _summary(pipe) -> str:
    config = pipe.transformer.config
    params = sum(parameter.numel() for parameter in pipe.transformer.parameters())
    hidden = config.num_attention_heads * config.attention_head_dim
    interval = pipe.config.default_guidance_interval
    return (
        f"{config.sample_size}x{config.sample_size} px, patch {config.patch_size}, hidden {hidden}, "
        f"{config.num_layers}+{config.num_head_layers} blocks{' + v-head' if config.with_v_head else ''}, "
        f"{params / 1e6:.1f}M params ({params:,}), {config.num_classes} classes, "
        f"noise scale {pipe.scheduler.config.noise_scale:g}, default ω {pipe.config.default_guidance_scale:g}, "
        f"interval [{interval[0]:g}, {interval[1]:g}]"
    )


def _cmd_convert(args) -> int:
    output_dir = args.output_dir.expanduser()
    # Check the cheap things before any download or conversion.
    if output_dir.exists() and not output_dir.is_dir():
        raise CLIError(f"output {str(output_dir)!r} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite:
        raise CLIError(f"output folder {str(output_dir)!r} exists and is not empty; pass --overwrite to replace it")
    if args.guidance_scale is not None and not args.guidance_scale >= 1.0:
        raise CLIError(f"--guidance-scale must be ≥ 1 (1 = no guidance), got {args.guidance_scale:g}")
    if args.guidance_interval is not None and not 0.0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1.0:
        raise CLIError("--guidance-interval A B must satisfy 0 ≤ A ≤ B ≤ 1, got {:g} {:g}".format(*args.guidance_interval))
    if args.noise_scale is not None and not args.noise_scale > 0:
        raise CLIError(f"--noise-scale must be > 0, got {args.noise_scale:g}")

    checkpoint, preset = _resolve_checkpoint(args)

    from .conversion import convert_checkpoint

    pipe = convert_checkpoint(
        checkpoint,
        output_dir,
        preset=preset,
        noise_scale=args.noise_scale,
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        overwrite=args.overwrite,
    )
    label = f" as {preset.name}" if preset else ""
    print(f"Wrote PMFPipeline{label} to {output_dir}")
    print(_summary(pipe))
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------------------------
SUBCOMMANDS: dict[str, Callable] = {
    "convert": _add_convert_parser,
}

MAIN_EPILOG = """\
examples:
  pmf convert pMF-B/16 ./pmf-b-16           # official checkpoint from the Hub -> diffusers folder
  pmf convert pMF-B-16.pt ./pmf-b-16 --preset pMF-B/16
  pmf convert --help

Errors are printed as one line (`pmf: error: ...`, exit code 2); add --debug for the traceback.
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _ArgumentParser(
        prog=PROG,
        description="pixel MeanFlow (pMF) for diffusers: one-step, latent-free image generation.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s (pmf-diffusers) {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    subparsers.required = True
    for add_parser in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, CLIError):
        return text
    if isinstance(error, KeyError):  # str(KeyError) is just the quoted key
        text = f"missing key {text}"
    kind = type(error).__name__
    # Expected, user-facing errors read best without their class name.
    if kind in ("FileNotFoundError", "FileExistsError", "ValueError", "CheckpointConversionError", "ConnectionError"):
        return text or kind
    return f"{kind}: {text}" if text else kind


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `pmf` command line; returns the exit code (0 ok, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI boundary: every failure becomes one line
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
