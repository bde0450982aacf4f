# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Train pMF on real images — scikit-learn's handwritten digits — and evaluate it on held-out real digits.

1. ``load_digits()`` (1,797 real 8×8 digits, 10 classes, shipped inside the scikit-learn wheel) is written as an image
   folder: 32×32 greyscale PNGs (bicubic upscale), one sub-folder per digit, with a fixed stratified held-out split
   (``--heldout-fraction``, chosen by ``--seed``): ``data/train/<digit>/`` is trained on, ``data/heldout/<digit>/``
   is only used by the evaluation.
2. ``examples/train_pmf.py --preset digits-cpu`` trains on ``data/train`` (``--extra-train-args`` appends flags).
3. :mod:`pmf_diffusers.evaluation.heldout` scores one-step samples, per class and for each ``--guidance-scales``
   value: accuracy of an SVM fit on the real training digits only, k-NN precision/recall against the held-out
   digits, a Fréchet distance in a PCA space of the training digits next to its real-vs-real floor, and a
   memorisation check. ``OUTPUT_DIR/report.json`` holds everything, ``OUTPUT_DIR/report.md`` the tables and
   ``OUTPUT_DIR/samples_vs_heldout.png`` a sample grid next to real held-out digits.
4. ``--export-bundled DIR`` copies the evaluated pipeline (named classes, package loader shim) with a model card
   holding the command and the scores: that is how ``src/pmf_diffusers/bundled/pmf-digits-32`` was made.

```bash
OMP_NUM_THREADS=2 python examples/train_digits.py --output-dir runs/digits   # 1 thread if other jobs share the CPU
python examples/train_digits.py --output-dir runs/digits --skip-training      # re-evaluate runs/digits/train/pipeline
```
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image


from cpu_launch import process_count, run_cpu_training  # noqa: E402  (examples/ is on sys.path when run as a script)
DIGITS_RESOLUTION = 32
SPLIT_FILE = "split.json"


def prepare_digits_folder(data_dir: Path, seed: int = 0, heldout_fraction: float = 0.3,
                          resolution: int = DIGITS_RESOLUTION) -> dict:
    """Write scikit-learn's digits as ``data_dir/{train,heldout}/<digit>/<index>.png``; return the split record.

    The split is stratified by class and fixed by ``seed``; an existing folder written with the same settings is
    reused as it is (``split.json`` records the settings and the indices of each split).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    settings = {"seed": seed, "heldout_fraction": heldout_fraction, "resolution": resolution}
    split_file = data_dir / SPLIT_FILE
    if split_file.is_file():
        record = json.loads(split_file.read_text())
        if record["settings"] == settings:
            return record
        raise ValueError(
            f"{data_dir} holds a digits split made with {record['settings']}, not {settings}: "
            "pass another --output-dir or the same --seed / --heldout-fraction."
        )
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_indices, heldout_indices = train_test_split(
        indices, test_size=heldout_fraction, random_state=seed, stratify=digits.target
    )
    for split, split_indices in (("train", train_indices), ("heldout", heldout_indices)):
        for index in sorted(split_indices.tolist()):
            # Ink values 0..16 → 0..255 (white ink on black, as the data set stores it), then a bicubic upscale.
            pixels = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(pixels).resize((resolution, resolution), Image.BICUBIC)
            folder = data_dir / split / str(int(digits.target[index]))
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:04d}.png")
    record = {
        "settings": settings,
        "train_indices": sorted(train_indices.tolist()),
        "heldout_indices": sorted(heldout_indices.tolist()),
    }
    split_file.write_text(json.dumps(record))
    return record


def read_digit_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """All ``folder/<digit>/*.png`` as uint8 (N, H, W) greyscale images and int labels, in file order."""
    images, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("L")))
            labels.append(int(class_dir.name))
    return np.stack(images), np.asarray(labels)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("```bash")[1].split("```")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/digits"),
                        help="run folder: data/, train/ (the train_pmf.py run), report.json, report.md")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split, the training run and the samples")
    parser.add_argument("--heldout-fraction", type=float, default=0.3, help="share of each class kept out of training")
    parser.add_argument("--preset", default="digits-cpu", help="train_pmf.py preset (default: digits-cpu)")
    parser.add_argument("--num-processes", type=process_count, default=2,
                        help="training processes (DDP over gloo, one thread each; 1 = a single process)")
    parser.add_argument("--max-train-steps", type=int, default=None, help="default: the preset's step budget")
    parser.add_argument("--max-train-minutes", type=float, default=None, help="wall-clock cap of the training run")
    parser.add_argument("--extra-train-args", default="", help="appended to the train_pmf.py command line")
    parser.add_argument("--skip-training", action="store_true", help="evaluate OUTPUT_DIR/train/pipeline as it is")
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="evaluate this PMFPipeline folder instead of OUTPUT_DIR/train/pipeline (implies --skip-training)")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0],
                        help="ω values to evaluate (one-step samples)")
    parser.add_argument("--sample-seed", type=int, default=None,
                        help="seed of the evaluated samples (default: --seed); other values show the sampling spread")
    parser.add_argument("--grid-columns", type=int, default=8, help="samples (and real digits) per class in the grid")
    parser.add_argument("--default-guidance-scale", type=float, default=None,
                        help="set the pipeline's default ω before evaluating it (written into --export-bundled)")
    parser.add_argument("--export-bundled", type=Path, default=None,
                        help="also write the evaluated pipeline and its model card here (a bundled-model folder)")
    parser.add_argument("--card-command", default=None,
                        help="the reproduction command written into the --export-bundled card (default: this run's)")
    return parser.parse_args(argv)


def trained_steps(pipeline_dir: Path) -> int | None:
    """The training step a train_pmf.py export was made at: its checkpoint's step (``checkpoint-N/pipeline``), or the
    last checkpoint's next to ``OUTPUT_DIR/pipeline`` (train_pmf.py checkpoints the final step); None if unknown."""
    records = [pipeline_dir.parent / "pmf_checkpoint.json"]
    if not records[0].is_file():
        records = list(pipeline_dir.parent.glob("checkpoint-*/pmf_checkpoint.json"))
    steps = [json.loads(path.read_text())["global_step"] for path in records if path.is_file()]
    return max(steps) if steps else None


def generate_samples(pipe, labels: np.ndarray, guidance_scale: float, seed: int, batch_size: int = 100):
    """One-step samples (N, 3, H, W) in [0, 1] for ``labels``; image i uses seed ``seed · 100_000 + i``."""
    import torch

    generators = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(len(labels))]
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            chunks.append(pipe(
                class_labels=labels[start : start + batch_size].tolist(),
                generator=generators[start : start + batch_size],
                guidance_scale=guidance_scale,
                num_inference_steps=1,
                output_type="pt",
            ).images)
    return torch.cat(chunks)


def save_comparison_grid(samples, sample_labels: np.ndarray, real_images: np.ndarray, real_labels: np.ndarray,
                         path: Path, columns: int, scale: int = 2) -> None:
    """Rows = classes: ``columns`` samples, a grey separator, then ``columns`` real held-out digits."""
    from diffusers.utils import make_image_grid

    size = real_images.shape[-1] + 2
    separator = Image.new("RGB", (size, size), (128, 128, 128))

    def framed(image: Image.Image) -> Image.Image:  # a 1-pixel dark frame keeps neighbouring digits apart
        tile = Image.new("RGB", (size, size), (48, 48, 48))
        tile.paste(image.convert("RGB"), (1, 1))
        return tile

    tiles = []
    for class_id in np.unique(real_labels):
        for image in samples[np.flatnonzero(sample_labels == class_id)[:columns]]:
            array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tiles.append(framed(Image.fromarray(array)))
        tiles.append(separator)
        tiles += [framed(Image.fromarray(real)) for real in real_images[np.flatnonzero(real_labels == class_id)[:columns]]]
    rows = len(np.unique(real_labels))
    grid = make_image_grid(tiles, rows=rows, cols=2 * columns + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def format_report(report: dict) -> str:
    """Markdown tables of a report: one row per ω, then per class at the pipeline's default ω."""
    def number(value, digits=3):
        return "—" if value is None else f"{value:.{digits}f}"

    lines = [
        "| ω | classifier accuracy | precision | recall | FD | FD floor | FD / floor | memorisation ratio | "
        "near-copy excess | memorisation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for guidance, scores in report["guidance"].items():
        memo = scores["memorisation"]
        lines.append(
            f"| {guidance} | {number(scores['accuracy'])} | {number(scores['precision'])} | {number(scores['recall'])} | "
            f"{number(scores['fd'], 4)} | {number(scores['fd_floor'], 4)} | {number(scores['fd_ratio'], 2)} | "
            f"{number(memo['ratio'], 2)} | {number(memo['near_copy_excess'], 3)} | {'FLAGGED' if memo['flagged'] else 'no'} |"
        )
    first = next(iter(report["guidance"].values()))
    lines += [
        "",
        f"Real-vs-real reference (real training digits, same size and class mix, vs held-out): precision "
        f"{number(first['real_precision'])}, recall {number(first['real_recall'])}, FD floor {number(first['fd_floor'], 4)}; "
        f"the classifier scores {number(first['classifier_heldout_accuracy'])} on real held-out digits.",
        "",
        f"Per class at ω = {report['default_guidance_scale']}:",
        "",
        "| class | accuracy | precision | recall | FD / floor | memorisation ratio |",
        "|---|---|---|---|---|---|",
    ]
    for class_id, scores in report["guidance"][str(report["default_guidance_scale"])]["per_class"].items():
        lines.append(
            f"| {class_id} | {number(scores['accuracy'])} | {number(scores['precision'])} | {number(scores['recall'])} | "
            f"{number(scores['fd_ratio'], 2)} | {number(scores['memorisation']['ratio'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pmf_diffusers import PMFPipeline
    from pmf_diffusers.evaluation.heldout import HeldOutEvaluator

    output_dir = args.output_dir
    data_dir, train_dir = output_dir / "data", output_dir / "train"
    report = {"command": " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])}
    split = prepare_digits_folder(data_dir, seed=args.seed, heldout_fraction=args.heldout_fraction)
    report["split"] = {"train": len(split["train_indices"]), "heldout": len(split["heldout_indices"]), **split["settings"]}

    if not (args.skip_training or args.pipeline):
        report.update(run_cpu_training(
            args.preset, data_dir / "train", train_dir, args.seed, num_processes=args.num_processes,
            max_train_steps=args.max_train_steps, max_train_minutes=args.max_train_minutes,
            extra_args=f"--report_to none {args.extra_train_args}",
        ))
    pipeline_dir = args.pipeline or train_dir / "pipeline"
    pipe = PMFPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    if args.default_guidance_scale is not None:
        pipe.register_to_config(default_guidance_scale=args.default_guidance_scale)
    report["pipeline"] = str(pipeline_dir)
    report["default_guidance_scale"] = float(pipe.config.default_guidance_scale)
    report["training_steps"] = trained_steps(Path(pipeline_dir))

    train_images, train_labels = read_digit_folder(data_dir / "train")
    heldout_images, heldout_labels = read_digit_folder(data_dir / "heldout")
    evaluator = HeldOutEvaluator(train_images, train_labels, heldout_images, heldout_labels, seed=args.seed)
    # As many samples per class as held-out digits, so the real-vs-real floor uses the same sample size and class mix.
    sample_labels = heldout_labels.copy()
    sample_seed = report["sample_seed"] = args.seed if args.sample_seed is None else args.sample_seed
    guidance_scales = sorted({*args.guidance_scales, report["default_guidance_scale"]})
    report["guidance"] = {}
    for guidance_scale in guidance_scales:
        samples = generate_samples(pipe, sample_labels, guidance_scale, seed=sample_seed)
        report["guidance"][str(guidance_scale)] = evaluator.evaluate(samples, sample_labels)
        if guidance_scale == report["default_guidance_scale"]:
            save_comparison_grid(samples, sample_labels, heldout_images, heldout_labels,
                                 output_dir / "samples_vs_heldout.png", columns=args.grid_columns)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    markdown = format_report(report)
    (output_dir / "report.md").write_text(markdown)
    print(markdown)
    if args.export_bundled:
        export_bundled(pipe, report, args.export_bundled, args.card_command or report["command"])
    return report


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def export_bundled(pipe, report: dict, target: Path, command: str) -> None:
    """Save ``pipe`` into ``target`` as a bundled model: class names, the package's loader shim and a model card with
    the command and the held-out scores at the pipeline's default ω."""
    from pmf_diffusers.hub import render_model_card
    from pmf_diffusers.remote_code import write_remote_code

    if target.exists():
        shutil.rmtree(target)
    # The training folders are named 0..9: keep that name, add "digit N" and the word as synonyms.
    pipe.set_id2label({class_id: f"digit {class_id}, {DIGIT_NAMES[class_id]}, {pipe.id2label.get(class_id, class_id)}"
                       for class_id in range(pipe.num_classes)})
    for component in (pipe, pipe.transformer, pipe.scheduler):  # record the folder, not the training run's path
        component.register_to_config(_name_or_path=str(target))
    pipe.save_pretrained(target, safe_serialization=True)
    write_remote_code(target, self_contained=False)  # bundled folders load the installed package's classes
    omega = str(report["default_guidance_scale"])
    scores = report["guidance"][omega]
    card = render_model_card(
        "trained",
        repo_id=str(target),
        title="pMF handwritten digits 32×32 (bundled, real data)",
        description="A second model shipped inside pmf-diffusers, trained on real images. Load it with "
        "`from pmf_diffusers import load_bundled_pipeline; pipe = load_bundled_pipeline(\"digits\")` or run "
        "`pmf generate --model digits`. Scores on held-out real digits: docs/real_data.md.",
        dataset=f"scikit-learn's handwritten digits (`sklearn.datasets.load_digits`), 8×8 upscaled to 32×32, "
        f"{report['split']['train']} training digits (held out: {report['split']['heldout']}, seed {report['split']['seed']})",
        resolution=pipe.transformer.config.sample_size,
        num_classes=pipe.num_classes,
        num_parameters=sum(parameter.numel() for parameter in pipe.transformer.parameters()),
        guidance_scale=pipe.config.default_guidance_scale,
        guidance_interval=list(pipe.config.default_guidance_interval),
        noise_scale=pipe.scheduler.config.noise_scale,
        training_steps=report.get("training_steps"),
        command=command,
        metrics={
            f"classifier accuracy (ω {omega}; real held-out digits: {scores['classifier_heldout_accuracy']:.3f})":
                f"{scores['accuracy']:.3f}",
            f"precision (k = 3; real digits: {scores['real_precision']:.3f})": f"{scores['precision']:.3f}",
            f"recall (k = 3; real digits: {scores['real_recall']:.3f})": f"{scores['recall']:.3f}",
            "Fréchet distance / real-vs-real floor": f"{scores['fd_ratio']:.2f}",
            "memorisation ratio (≈ 1: as novel as unseen real digits)": f"{scores['memorisation']['ratio']:.2f}",
        },
    )
    card.save(target / "README.md")


if __name__ == "__main__":
    main()
