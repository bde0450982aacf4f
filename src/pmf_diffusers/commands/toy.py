# Copyright 2026 The pmf-diffusers developers. MIT License.
"""`pmf toy-data` (write the toy-shapes dataset) and `pmf train-judge` (train the toy judge classifier).

The old module entry points `python -m pmf_diffusers.training.toy_data ...` and
`python -m pmf_diffusers.training.toy_classifier ...` run these commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..toy.classes import NUM_TOY_CLASSES, TOY_CLASS_FOLDERS, TOY_DATASET_NAME
from . import EXIT_OK, add_command_parser

__all__ = ["add_parser", "run_toy_data", "run_train_judge"]

# Preview grid of `pmf toy-data --grid`: this many samples per class, one row per class.
GRID_PER_CLASS = 8

TOY_DATA_EPILOG = """\
classes (folder name = label id):
  {classes}

examples:
  # 2000 images (200 per class) at 32x32, seed 0
  pmf toy-data data/toy

  # a larger 64x64 set with another seed, replacing an earlier one
  pmf toy-data data/toy64 --images-per-class 1000 --size 64 --seed 1 --overwrite

  # also save a preview grid (8 samples per class, one row per class)
  pmf toy-data data/toy --grid docs/images/toy_dataset_grid.png

  # load it with datasets:  load_dataset("imagefolder", data_dir="data/toy")
"""

TRAIN_JUDGE_EPILOG = """\
The judge is a small CNN trained on real toy images (with augmentation and images of no class), so that it can
score generated samples per class. Written as model.safetensors + config.json.

examples:
  pmf toy-data data/toy
  pmf train-judge data/toy checkpoints/toy_classifier
  pmf train-judge data/toy ckpt --eval-folder data/toy_test --epochs 8
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `toy-data` and `train-judge`; returns the `toy-data` parser."""
    toy_data = add_command_parser(
        subparsers,
        "toy-data",
        help="write the toy-shapes image-folder dataset (10 classes of coloured shapes)",
        description=f"Generate the {TOY_DATASET_NAME} toy image-folder dataset (10 classes of coloured shapes).",
        epilog=TOY_DATA_EPILOG.format(classes="\n  ".join(TOY_CLASS_FOLDERS)),
    )
    toy_data.add_argument("output_dir", type=Path, help="folder to create (must be empty or absent unless --overwrite)")
    toy_data.add_argument("--images-per-class", type=int, default=200, help="images per class (default: 200)")
    toy_data.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    toy_data.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    toy_data.add_argument("--overwrite", action="store_true", help="replace an existing toy dataset in output_dir")
    toy_data.add_argument(
        "--grid", type=Path, default=None, help=f"also save a preview grid PNG ({GRID_PER_CLASS} per class) here"
    )
    toy_data.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    toy_data.set_defaults(func=run_toy_data)

    train_judge = add_command_parser(
        subparsers,
        "train-judge",
        help="train the toy-dataset judge classifier on a real image folder",
        description="Train the toy-dataset judge classifier on a real image folder and save it.",
        epilog=TRAIN_JUDGE_EPILOG,
    )
    train_judge.add_argument("image_folder", type=Path, help="training image folder (folder/<class>/*.png)")
    train_judge.add_argument("output_dir", type=Path, help="where to write model.safetensors + config.json")
    train_judge.add_argument("--epochs", type=int, default=6)
    train_judge.add_argument("--seed", type=int, default=0)
    train_judge.add_argument("--device", default="cpu")
    train_judge.add_argument(
        "--eval-folder", type=Path, default=None, help="held-out image folder to report per-class accuracy"
    )
    train_judge.set_defaults(func=run_train_judge)
    return toy_data


def run_toy_data(args: argparse.Namespace) -> int:
    from ..image_grid import save_image_grid
    from ..toy.shapes import generate_toy_arrays, make_toy_dataset

    out = make_toy_dataset(
        args.output_dir,
        images_per_class=args.images_per_class,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    print(f"wrote {NUM_TOY_CLASSES * args.images_per_class} images to {out}")
    if args.grid is not None:
        per_class = min(GRID_PER_CLASS, args.images_per_class)
        images, _ = generate_toy_arrays(per_class, args.size, args.seed)
        save_image_grid(images, args.grid, nrow=per_class, scale=2 if args.size <= 32 else 1)
        print(f"wrote preview grid to {args.grid}")
    return EXIT_OK


def run_train_judge(args: argparse.Namespace) -> int:
    import numpy as np

    from ..toy.judge import evaluate_per_class_accuracy, load_image_folder, save_toy_classifier, train_toy_classifier

    judge = train_toy_classifier(
        args.image_folder, epochs=args.epochs, seed=args.seed, device=args.device, progress=True
    )
    if args.eval_folder is not None:
        images, labels, _ = load_image_folder(args.eval_folder)
        accuracy = evaluate_per_class_accuracy(judge, images, labels)
        judge.training_summary["heldout_per_class_accuracy"] = accuracy
        judge.training_summary["heldout_accuracy"] = float(np.mean([accuracy[c] for c in accuracy]))
        print("held-out per-class accuracy:", {c: round(a, 4) for c, a in accuracy.items()})
    save_toy_classifier(judge, args.output_dir)
    print(f"saved classifier to {args.output_dir} ({judge.training_summary['train_seconds']} s training)")
    return EXIT_OK
