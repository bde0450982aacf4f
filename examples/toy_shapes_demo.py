"""Proof that pMF training learns, end to end on a CPU: toy data → `train_pmf.py` → one-step samples → an
independent classifier judges them.

1. writes the project's procedurally generated toy dataset (10 classes of coloured shapes, 32×32);
2. trains a small CNN judge on a *separately seeded* set of real toy images (never on generated ones);
3. runs `accelerate launch examples/train_pmf.py --preset toy-cpu` on the toy dataset (CPU, time-capped);
4. samples `--samples-per-class` one-step images per class from the exported EMA pipeline (fixed seeds) and reports
   the judge's per-class accuracy (argmax, and counting only confident predictions ≥ `--min-confidence`);
5. saves a sample grid (one row per class) and a JSON report; with `--export-bundled DIR` also writes the
   pipeline (u-head only) plus its model card as the package's bundled default model.

Examples:
    python examples/toy_shapes_demo.py --output-dir runs/toy --max-train-minutes 25
    python examples/toy_shapes_demo.py --output-dir runs/toy --skip-training --export-bundled \\
        src/pmf_diffusers/bundled/pmf-toy-shapes-32
"""

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from cpu_launch import REPO_ROOT, process_count, run_cpu_training  # noqa: E402  (examples/ is on sys.path when run as a script)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--images-per-class", type=int, default=400, help="toy training images per class")
    parser.add_argument("--max-train-minutes", type=float, default=25.0)
    parser.add_argument("--max-train-steps", type=int, default=None)
    parser.add_argument("--num-processes", type=process_count, default=1,
                        help="training processes (2: DDP over gloo, one thread each, as examples/train_digits.py does)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--min-confidence", type=float, default=0.5)
    parser.add_argument("--skip-training", action="store_true", help="reuse OUTPUT_DIR/train/pipeline")
    parser.add_argument("--export-bundled", type=Path, default=None, help="write the bundled-model folder here")
    parser.add_argument("--grid", type=Path, default=REPO_ROOT / "docs" / "images" / "toy_samples_grid.png")
    parser.add_argument("--card-command", default=None, help="the reproduction command written into the bundled card")
    parser.add_argument("--extra-train-args", default="", help="appended to the train_pmf.py command line")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from pmf_diffusers import PMFPipeline
    from pmf_diffusers.image_grid import save_image_grid
    from pmf_diffusers.toy.classes import TOY_CLASS_NAMES
    from pmf_diffusers.toy.judge import evaluate_per_class_accuracy, train_toy_classifier
    from pmf_diffusers.toy.shapes import generate_toy_arrays, make_toy_dataset

    output_dir = args.output_dir
    data_dir, train_dir = output_dir / "data", output_dir / "train"
    report = {"command": " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}

    if not (data_dir / "metadata.json").is_file():
        make_toy_dataset(data_dir, images_per_class=args.images_per_class, seed=args.seed)

    start = time.perf_counter()
    judge_images, judge_labels = generate_toy_arrays(images_per_class=200, seed=args.seed + 1000)
    judge = train_toy_classifier((judge_images, judge_labels), seed=args.seed, num_threads=1)
    held_out_images, held_out_labels = generate_toy_arrays(images_per_class=50, seed=args.seed + 2000)
    report["judge_accuracy_on_real_images"] = evaluate_per_class_accuracy(
        judge, held_out_images, held_out_labels, min_confidence=args.min_confidence
    )
    report["judge_training_seconds"] = time.perf_counter() - start

    if not args.skip_training:
        report.update(run_cpu_training(
            "toy-cpu", data_dir, train_dir, args.seed, num_processes=args.num_processes, max_train_steps=args.max_train_steps,
            max_train_minutes=args.max_train_minutes, extra_args=args.extra_train_args,
        ))
    pipeline_dir = train_dir / "pipeline"
    pipe = PMFPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)

    num_classes = pipe.transformer.config.num_classes
    labels = [c for c in range(num_classes) for _ in range(args.samples_per_class)]
    generators = [torch.Generator().manual_seed(10_000 + i) for i in range(len(labels))]
    with torch.inference_mode():
        samples = torch.cat([
            pipe(class_labels=labels[i : i + 100], generator=generators[i : i + 100], output_type="pt").images
            for i in range(0, len(labels), 100)
        ])
    samples = samples * 2 - 1  # the judge takes [-1, 1]
    report["sample_accuracy_argmax"] = evaluate_per_class_accuracy(judge, samples, labels)
    report["sample_accuracy_confident"] = evaluate_per_class_accuracy(
        judge, samples, labels, min_confidence=args.min_confidence
    )
    report["min_per_class_accuracy_confident"] = min(report["sample_accuracy_confident"].values())
    report["guidance_scale"] = pipe.config.default_guidance_scale
    report["guidance_interval"] = pipe.config.default_guidance_interval
    report["num_parameters"] = sum(p.numel() for p in pipe.transformer.parameters())

    grid_rows = torch.stack([samples[c * args.samples_per_class : c * args.samples_per_class + 10]
                             for c in range(num_classes)]).flatten(0, 1)
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(grid_rows, args.grid, nrow=10, scale=2)
    report["grid"] = str(args.grid)

    print("class | confident accuracy | argmax accuracy")
    for class_id in range(num_classes):
        print(f"{TOY_CLASS_NAMES[class_id]:>16} | {report['sample_accuracy_confident'][class_id]:.3f} | "
              f"{report['sample_accuracy_argmax'][class_id]:.3f}")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))

    if args.export_bundled:
        report["card_command"] = args.card_command or report.get("train_command")
        export_bundled(pipe, pipeline_dir, train_dir, args.export_bundled, report)
    return report


def export_bundled(pipe, pipeline_dir: Path, train_dir: Path, target: Path, report: dict):
    """Copy the exported pipeline into the package with a model card naming the exact reproduction command."""
    from pmf_diffusers.hub import render_model_card
    from pmf_diffusers.toy.classes import TOY_CLASS_NAMES

    if target.exists():
        shutil.rmtree(target)
    # Readable names (the training folders carry a sort prefix, e.g. "00_red_circle"); every form stays accepted.
    pipe.set_id2label({
        class_id: f"{name.replace('_', ' ')}, {name}, {pipe.id2label[class_id]}"
        for class_id, name in enumerate(TOY_CLASS_NAMES)
    })
    pipe.save_pretrained(target, safe_serialization=True)
    training_args = json.loads((train_dir / "training_args.json").read_text())
    accuracy = report["sample_accuracy_confident"]
    card = render_model_card(
        "trained",
        repo_id=str(target),
        title="pMF toy shapes 32×32 (bundled default model)",
        description="The default model shipped inside pmf-diffusers. Load it with "
        "`from pmf_diffusers import load_bundled_pipeline; pipe = load_bundled_pipeline()` "
        "or run `pmf generate`.",
        dataset="pmf-diffusers toy shapes: 10 classes of coloured shapes, procedurally generated by "
        "`pmf toy-data`",
        resolution=pipe.transformer.config.sample_size,
        num_classes=pipe.transformer.config.num_classes,
        num_parameters=report["num_parameters"],
        # the sampling-settings table states what the saved pipeline really uses
        guidance_scale=pipe.config.default_guidance_scale,
        guidance_interval=list(pipe.config.default_guidance_interval),
        noise_scale=pipe.scheduler.config.noise_scale,
        training_steps=training_args.get("max_train_steps"),
        recipe={key: value for key, value in training_args.items() if not isinstance(value, (dict, list))},
        command=report["card_command"] or training_args.get("command", ""),
        metrics={
            "min per-class judge accuracy (confidence ≥ 0.5)": f"{min(accuracy.values()):.3f}",
            "mean per-class judge accuracy (confidence ≥ 0.5)": f"{sum(accuracy.values()) / len(accuracy):.3f}",
        },
    )
    card.save(target / "README.md")


if __name__ == "__main__":
    main()
