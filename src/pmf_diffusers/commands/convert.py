# Copyright 2026 The pmf-diffusers developers. MIT License.
"""`pmf convert`: an official pMF checkpoint (local file or released size name) -> a PMFPipeline folder."""

from __future__ import annotations

from pathlib import Path

from ..official import OFFICIAL_PRESETS, OFFICIAL_REPO_ID, resolve_preset
from . import EXIT_OK, CLIError, add_command_parser, check_guidance_options

SIZE_NAMES = ", ".join(OFFICIAL_PRESETS)

EPILOG = f"""\
CHECKPOINT is either
  * a local file: an official torch `.pt`/`.pth` (flat state dict, `net.` prefix, as released) or a `.safetensors`
    file (torch-branch names); loaded with torch.load(weights_only=True), so pickled code is refused; or
  * an official size name ({SIZE_NAMES}; also spelled B/16, pmf-b-16):
    the released file is downloaded from the Hub (repo {OFFICIAL_REPO_ID}, cached by huggingface_hub) and the size's
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


def add_parser(subparsers):
    parser = add_command_parser(
        subparsers,
        "convert",
        help="convert an official pMF checkpoint into a diffusers pipeline folder",
        description="Convert an official pixel MeanFlow checkpoint into a PMFPipeline folder (safetensors).",
        epilog=EPILOG,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file, or an official size name such as pMF-B/16")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--preset", metavar="SIZE", help="official size whose settings to use and whose shapes to check")
    parser.add_argument("--noise-scale", type=float, metavar="X", help="std of the initial noise (official: 1, 2 or 4)")
    parser.add_argument("--guidance-scale", type=float, metavar="W", help="default guidance scale ω ≥ 1")
    parser.add_argument(
        "--guidance-interval", type=float, nargs=2, metavar=("A", "B"), help="default guidance interval [t_min, t_max]"
    )
    parser.add_argument("--repo-id", default=None, help=f"Hub repository for size names (default: {OFFICIAL_REPO_ID})")
    parser.add_argument("--revision", default=None, help="Hub revision for size names")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="write into a non-empty OUTPUT_DIR, replacing the files of an earlier conversion (model_index.json, "
        "component configs and weights); other files are kept, and a folder holding CHECKPOINT is refused",
    )
    parser.set_defaults(func=run)
    return parser


def _size_or_none(text: str):
    try:
        return resolve_preset(text)
    except ValueError:
        return None


def _resolve_checkpoint(args):
    """(checkpoint path, preset or None): a local file, or the released file of a size name fetched from the Hub."""
    preset = resolve_preset(args.preset) if args.preset else None
    path = Path(args.checkpoint).expanduser()
    if path.is_file():
        return path, preset
    if path.exists():
        raise CLIError(f"checkpoint {str(path)!r} is not a file")
    size = _size_or_none(args.checkpoint)
    if size is None:
        raise CLIError(
            f"checkpoint file not found: {args.checkpoint!r} (give a .pt/.safetensors file or an official size name: "
            f"{SIZE_NAMES})"
        )
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


def _check_output_folder(output_dir: Path, overwrite: bool, checkpoint: Path | None = None) -> None:
    from ..conversion import OutputFolderNotEmptyError, check_output_folder

    try:
        check_output_folder(output_dir, overwrite=overwrite, checkpoint=checkpoint)
    except OutputFolderNotEmptyError:
        raise CLIError(
            f"output folder {str(output_dir)!r} exists and is not empty; pass --overwrite to replace the pipeline "
            "files in it (other files are kept)"
        ) from None


def run(args) -> int:
    from ..schedulers.scheduling_pmf import check_noise_scale

    output_dir = args.output_dir.expanduser()
    # Check the cheap things before any download or conversion.
    _check_output_folder(output_dir, args.overwrite)
    check_guidance_options(args.guidance_scale, args.guidance_interval)
    if args.noise_scale is not None:
        try:
            check_noise_scale(args.noise_scale)
        except ValueError:
            raise CLIError(f"--noise-scale must be a finite number > 0, got {args.noise_scale:g}") from None

    checkpoint, preset = _resolve_checkpoint(args)
    _check_output_folder(output_dir, args.overwrite, checkpoint)  # now that the checkpoint's path is known

    from ..conversion import convert_checkpoint

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
