# Copyright 2026 The pmf-diffusers developers. MIT License.
"""`pmf generate`: class-conditional images in one step, from any model string `load_pipeline` accepts."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

from ..official import OFFICIAL_PRESETS
from . import EXIT_OK, CLIError, add_command_parser

# The sample grid `pmf generate` writes next to the images (`pmf eval --images` skips files of this name).
GRID_FILENAME = "grid.png"

EPILOG = f"""\
--model is one of
  * bundled (default): the small toy-shapes model shipped inside the package (10 classes, 32x32; works offline);
  * digits: the second bundled model, trained on real handwritten digits (10 classes, 32x32; works offline);
  * a local PMFPipeline folder (pipe.save_pretrained / pmf convert / train_pmf.py output);
  * an official size name ({", ".join(OFFICIAL_PRESETS)}; also b16, pmf-b-16, ...):
    the released weights, downloaded and converted once, cached;
  * a Hub repo id (namespace/name) of a PMFPipeline.
Every pmf command reads --model the same way.

examples:
  pmf generate                                             # every class of the bundled model, seed 0
  pmf generate --class-labels red_circle purple_star --images-per-class 4 --seed 7
  pmf generate --model digits --images-per-class 4       # real handwritten digits 0-9
  pmf generate --model pMF-B/16 --class-labels "golden retriever" 360 --dtype bf16 --device cuda
  pmf generate --model ./pmf-b-16 --class-labels 207 --guidance-scale 7.5 --guidance-interval 0.1 0.8
  pmf generate --class-labels 0 --images-per-class 64 --compile   # many images on a CPU
  pmf generate --output samples/ --overwrite               # into a folder that already holds images

A non-empty --output folder needs --overwrite. pmf eval --images skips the {GRID_FILENAME} written here.
"""

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
# Sub-batches that keep the activations cache-sized on a CPU (same images, faster for large batches).
CPU_CHUNK_SIZE = 4


def add_parser(subparsers):
    parser = add_command_parser(
        subparsers,
        "generate",
        help="generate images (bundled model by default)",
        description="Generate class-conditional images in one step with a PMFPipeline.",
        epilog=EPILOG,
    )
    parser.add_argument("--model", default="bundled", help="bundled | digits | FOLDER | pMF-B/16 ... | namespace/name")
    parser.add_argument(
        "--class-labels", nargs="+", metavar="LABEL", default=None,
        help="class ids or names (quote names with spaces); default: up to the first 10 classes",
    )
    parser.add_argument("--images-per-class", type=int, default=1, metavar="N")
    parser.add_argument("--seed", type=int, default=0, help="image i uses a CPU generator seeded with SEED + i")
    parser.add_argument("--guidance-scale", type=float, default=None, metavar="W", help="ω ≥ 1 (default: the model's)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("A", "B"))
    parser.add_argument("--steps", type=int, default=1, help="sampling steps (pMF is a one-step model)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="most images per network call (bounds memory; image i keeps seed + i)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="transformer dtype")
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the transformer (fused QKV, inductor freezing): the first batch of each size pays the "
             "compile time, later batches run faster; worth it for many images (docs/benchmarks.md)",
    )
    parser.add_argument("--output", type=Path, default=Path("samples"), help="folder for the PNGs")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="write into a non-empty --output folder (PNGs with the same names are replaced, other files kept)",
    )
    parser.add_argument("--no-grid", action="store_true", help=f"do not write {GRID_FILENAME}")
    parser.add_argument("--no-images", action="store_true", help=f"only write {GRID_FILENAME}")
    parser.set_defaults(func=run)
    return parser


def _default_labels(num_classes: int) -> list[int]:
    return list(range(min(num_classes, 10)))


def _check_output_folder(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {str(output)!r} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CLIError(
            f"output folder {str(output)!r} is not empty; pass --overwrite to write into it (PNGs with the same names "
            "are replaced) or choose another --output"
        )


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _file_name(pipe, index: int, label: int) -> str:
    name = pipe.id2label.get(label, "unconditional" if label == pipe.num_classes else str(label))
    slug = re.sub(r"[^a-z0-9]+", "_", name.split(",")[0].lower()).strip("_")
    return f"{index:04d}_class{label}_{slug}.png"


def run(args) -> int:
    import torch
    from diffusers.utils import logging as diffusers_logging

    from ..image_grid import save_image_grid
    from ..loading import load_pipeline
    from ..pipelines.pipeline_pmf import check_guidance_settings

    for name in ("images_per_class", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    check_guidance_settings(args.guidance_scale, args.guidance_interval)  # before any download
    writes_files = not (args.no_images and args.no_grid)
    if writes_files:
        _check_output_folder(args.output, args.overwrite)

    # The command prints its own one-line summary; loading bars would bury it (and the one-line errors).
    diffusers_logging.disable_progress_bar()
    pipe = load_pipeline(args.model, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device)
    pipe.set_progress_bar_config(disable=True)
    if torch.device(args.device).type == "cpu":
        pipe.transformer.enable_batch_chunking(CPU_CHUNK_SIZE)
    compile_context = contextlib.nullcontext()
    if args.compile:
        import torch._inductor.config as inductor_config

        pipe.transformer.fuse_qkv_projections()
        pipe.transformer.compile(dynamic=False)
        # Sampling only: constant weights let inductor pre-pack them and fold what depends on them alone.
        compile_context = inductor_config.patch(freezing=True)
    # Ids ("207", "-1") and names are read by the pipeline's own rule (labels.resolve_class_labels).
    label_ids = pipe.get_label_ids(args.class_labels or _default_labels(pipe.num_classes))
    label_ids = [label for label in label_ids for _ in range(args.images_per_class)]
    if writes_files:
        args.output.mkdir(parents=True, exist_ok=True)

    # One pipeline call: image i has its own generator (seed + i), and the transformer runs at most --batch-size
    # images at a time, so the memory stays bounded (the same network calls as one pipeline call per batch).
    generators = [torch.Generator().manual_seed(args.seed + index) for index in range(len(label_ids))]
    start = time.perf_counter()
    try:
        with compile_context:
            images = pipe(
                class_labels=label_ids,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                guidance_interval=args.guidance_interval,
                generator=generators,
                max_batch_size=args.batch_size,
            ).images
    except (RuntimeError, MemoryError) as error:
        if _is_out_of_memory(error):
            batch = min(args.batch_size, len(label_ids))
            raise CLIError(
                f"a batch of {batch} images does not fit in memory on {args.device}: "
                f"try a smaller --batch-size (e.g. {max(1, batch // 4)})"
            ) from None
        raise
    seconds_per_image = (time.perf_counter() - start) / len(label_ids)

    written = []
    if not args.no_images:
        for index, (label, image) in enumerate(zip(label_ids, images)):
            path = args.output / _file_name(pipe, index, label)
            image.save(path)
            written.append(path)
    if not args.no_grid:
        columns = max(args.images_per_class, min(len(images), 10))
        written.append(save_image_grid(images, args.output / GRID_FILENAME, nrow=columns))
    where = f"{len(written)} file(s) in {args.output}" if written else "nothing (both --no-images and --no-grid)"
    print(f"Generated {len(images)} image(s) with {args.model}; wrote {where}")
    compiled = ", compiled: includes the compile time" if args.compile else ""
    print(f"{seconds_per_image * 1000:.1f} ms per image ({args.steps} step(s), {args.device}, {args.dtype}{compiled})")
    return EXIT_OK
