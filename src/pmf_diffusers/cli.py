# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The `pmf` command line.

Layout (to add a subcommand: write `_add_<name>_parser(subparsers)` and `_cmd_<name>(args) -> int`, and register the
pair in `SUBCOMMANDS`):

* `build_parser()` builds the argparse tree; every subparser sets `func=_cmd_<name>`.
* `main(argv)` parses, runs `args.func(args)` and turns any exception into one `pmf: error: ...` line on stderr and
  exit code 2 (`--debug` shows the traceback instead). diffusers is imported inside the commands; building the
  `eval` parser imports torch (via `evaluation.py`), so `pmf --help` takes ~2 s.
"""

from __future__ import annotations

import argparse
import contextlib
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
# pmf generate
# --------------------------------------------------------------------------------------------------------------
GENERATE_EPILOG = """\
--model is one of
  * bundled (default): the small toy-shapes model shipped inside the package (10 classes, 32x32; works offline);
  * a local PMFPipeline folder (pipe.save_pretrained / pmf convert / train_pmf.py output);
  * an official size name (pMF-B/16 ... pMF-H/32): the released weights, downloaded and converted once, cached;
  * a Hub repo id (namespace/name) of a PMFPipeline.

examples:
  pmf generate                                             # every class of the bundled model, seed 0
  pmf generate --class-labels red_circle purple_star --images-per-class 4 --seed 7
  pmf generate --model pMF-B/16 --class-labels "golden retriever" 360 --dtype bf16 --device cuda
  pmf generate --model ./pmf-b-16 --class-labels 207 --guidance-scale 7.5 --guidance-interval 0.1 0.8
"""

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def _add_generate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        parents=[_common_options()],
        help="generate images (bundled model by default)",
        description="Generate class-conditional images in one step with a PMFPipeline.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="bundled", help="bundled | FOLDER | pMF-B/16 ... | namespace/name")
    parser.add_argument(
        "--class-labels", nargs="+", metavar="LABEL", default=None,
        help="class ids or names (quote names with spaces); default: up to the first 10 classes",
    )
    parser.add_argument("--images-per-class", type=int, default=1, metavar="N")
    parser.add_argument("--seed", type=int, default=0, help="image i uses a CPU generator seeded with SEED + i")
    parser.add_argument("--guidance-scale", type=float, default=None, metavar="W", help="ω ≥ 1 (default: the model's)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("A", "B"))
    parser.add_argument("--steps", type=int, default=1, help="sampling steps (pMF is a one-step model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="transformer dtype")
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the transformer (fused QKV, inductor freezing): the first batch of each size compiles "
             "(~20 s for pMF-B/16 on a CPU), later batches run 1.1-1.3x faster on CPU; worth it for many images",
    )
    parser.add_argument("--output", type=Path, default=Path("samples"), help="folder for the PNGs")
    parser.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    parser.add_argument("--no-images", action="store_true", help="only write grid.png")
    parser.set_defaults(func=_cmd_generate)
    return parser


def _load_pipeline(model: str, device: str, dtype_name: str):
    import torch
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .bundled import load_bundled_pipeline
    from .conversion import load_official
    from .pipelines.pipeline_pmf import PMFPipeline

    from diffusers.utils import logging as diffusers_logging

    # The command prints its own one-line summary; loading bars would bury it (and the one-line errors).
    diffusers_logging.disable_progress_bar()
    dtype = getattr(torch, DTYPES[dtype_name])
    if model == "bundled":
        pipe = load_bundled_pipeline(dtype=dtype)
    elif Path(model).expanduser().is_dir():
        pipe = PMFPipeline.from_pretrained(Path(model).expanduser(), dtype=dtype)
    elif _looks_like_size_name(model):
        pipe = load_official(model, dtype=dtype)
    else:
        try:
            validate_repo_id(model)
        except HFValidationError:
            raise CLIError(
                f"unknown model {model!r}: use 'bundled', a PMFPipeline folder, an official size "
                "(pMF-B/16, pMF-B/32, pMF-L/16, pMF-L/32, pMF-H/16, pMF-H/32) or a Hub repo id namespace/name"
            ) from None
        if "/" not in model:
            raise CLIError(f"unknown model {model!r}: not a folder, an official size or a Hub repo id (namespace/name)")
        try:
            pipe = PMFPipeline.from_pretrained(model, dtype=dtype)
        except OSError as error:
            raise CLIError(f"could not load {model!r} from the Hub: {' '.join(str(error).split())[:300]}") from None
    try:
        return pipe.to(device)
    except (RuntimeError, AssertionError) as error:
        raise CLIError(f"cannot use --device {device}: {' '.join(str(error).split())[:200]}") from None


def _parse_labels(labels: list[str] | None, num_classes: int) -> list[int | str]:
    if labels is None:
        return list(range(min(num_classes, 10)))
    return [int(label) if label.strip().isdigit() else label for label in labels]


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _cmd_generate(args) -> int:
    import re
    import time

    import torch

    from .training.toy_data import save_image_grid

    for name in ("images_per_class", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    if torch.device(args.device).type == "cpu":
        # Sub-batches of 4 keep the activations cache-sized on a CPU: same images, faster at --batch-size 16.
        pipe.transformer.enable_batch_chunking(4)
    compile_context = contextlib.nullcontext()
    if args.compile:
        import torch._inductor.config as inductor_config

        pipe.transformer.fuse_qkv_projections()
        pipe.transformer.compile(dynamic=False)
        # Sampling only: constant weights let inductor pre-pack them and fold what depends on them alone.
        compile_context = inductor_config.patch(freezing=True)
    label_ids = pipe.get_label_ids(_parse_labels(args.class_labels, pipe.num_classes))
    label_ids = [label for label in label_ids for _ in range(args.images_per_class)]
    if not args.no_images or not args.no_grid:
        args.output.mkdir(parents=True, exist_ok=True)

    images, start = [], time.perf_counter()
    with compile_context:
        for first in range(0, len(label_ids), args.batch_size):
            batch = label_ids[first : first + args.batch_size]
            generators = [torch.Generator().manual_seed(args.seed + first + i) for i in range(len(batch))]
            try:
                images += pipe(
                    class_labels=batch,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    guidance_interval=args.guidance_interval,
                    generator=generators,
                ).images
            except (RuntimeError, MemoryError) as error:
                if _is_out_of_memory(error):
                    raise CLIError(
                        f"a batch of {len(batch)} images does not fit in memory on {args.device}: "
                        f"try a smaller --batch-size (e.g. {max(1, len(batch) // 4)})"
                    ) from None
                raise
    seconds_per_image = (time.perf_counter() - start) / len(label_ids)

    written = []
    if not args.no_images:
        for index, (label, image) in enumerate(zip(label_ids, images)):
            name = pipe.id2label.get(label, "unconditional" if label == pipe.num_classes else str(label))
            slug = re.sub(r"[^a-z0-9]+", "_", name.split(",")[0].lower()).strip("_")
            path = args.output / f"{index:04d}_class{label}_{slug}.png"
            image.save(path)
            written.append(path)
    if not args.no_grid:
        grid = save_image_grid(images, args.output / "grid.png", nrow=max(args.images_per_class, min(len(images), 10)))
        written.append(grid)
    where = f"{len(written)} file(s) in {args.output}" if written else "nothing (both --no-images and --no-grid)"
    print(f"Generated {len(images)} image(s) with {args.model}; wrote {where}")
    compiled = ", compiled: includes the compile time" if args.compile else ""
    print(f"{seconds_per_image * 1000:.1f} ms per image ({args.steps} step(s), {args.device}, {args.dtype}{compiled})")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# pmf push / pmf eval (implemented next to the code they drive)
# --------------------------------------------------------------------------------------------------------------
def _add_push_parser(subparsers) -> argparse.ArgumentParser:
    from .hub import add_push_arguments

    parser = subparsers.add_parser(
        "push",
        parents=[_common_options()],
        help="publish a PMFPipeline folder to the Hub (weights, card, sample grid, loader shim)",
        description="Push a PMFPipeline folder to a Hub model repo with its model card and sample grid.",
        epilog="examples:\n  pmf push runs/toy-cpu/pipeline me/pmf-toy --dry-run\n"
        "  pmf push ./pmf-b-16 me/pmf-b16 --private --card-kind official",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_push_arguments(parser)
    parser.set_defaults(func=_cmd_push)
    return parser


def _cmd_push(args) -> int:
    from .hub import run_push

    return EXIT_ERROR if run_push(args) else EXIT_OK


def _add_eval_parser(subparsers) -> argparse.ArgumentParser:
    from .evaluation import add_eval_arguments

    parser = subparsers.add_parser(
        "eval",
        parents=[_common_options()],
        help="FID / IS / precision-recall of a pipeline (official pMF protocol)",
        description="Evaluate a PMFPipeline with the official protocol (class-balanced, per-image seeds). "
        "Multi-GPU: accelerate launch -m pmf_diffusers.cli eval ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_arguments(parser)
    parser.set_defaults(func=_cmd_eval)
    return parser


def _cmd_eval(args) -> int:
    from .evaluation import run_eval

    return run_eval(args)


# --------------------------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------------------------
SUBCOMMANDS: dict[str, Callable] = {
    "generate": _add_generate_parser,
    "convert": _add_convert_parser,
    "push": _add_push_parser,
    "eval": _add_eval_parser,
}

MAIN_EPILOG = """\
what it does:
  generate   sample images (the bundled toy model offline, official sizes, your folders or Hub repos)
  convert    official pMF checkpoints (.pt / Flax) -> diffusers PMFPipeline folders
  push       publish a pipeline folder to the Hub with a model card and a sample grid
  eval       FID / IS / precision-recall with the official protocol
  training:  accelerate launch examples/train_pmf.py --help   (full objective, LoRA, presets)
  demo:      python spaces_app/app.py                         (Gradio Space)

examples:
  pmf generate --class-labels 0 1 2 --output samples/
  pmf generate --model pMF-B/16 --class-labels "golden retriever" --device cuda --dtype bf16
  pmf convert pMF-B/16 ./pmf-b-16           # official checkpoint from the Hub -> diffusers folder
  pmf push ./pmf-b-16 me/pmf-b16 --dry-run
  pmf eval --model ./pmf-b-16 --reference-stats jit_in256_stats.npz --num-images 50000

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
