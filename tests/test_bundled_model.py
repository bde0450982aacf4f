"""The bundled default model: loads offline from the package and its one-step samples are recognised by the
independent toy classifier (trained here on real toy images only)."""

import inspect
import json
import re

import torch

from pmf_diffusers import PMFPipeline, bundled_model_path, load_bundled_pipeline
from pmf_diffusers.toy.judge import evaluate_per_class_accuracy, train_toy_classifier
from pmf_diffusers.toy.shapes import TOY_CLASS_NAMES, generate_toy_arrays


def test_bundled_model_is_small_safetensors_with_a_card():
    folder = bundled_model_path()
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 10 * 1024 * 1024
    assert not [path for path in files if path.suffix in (".bin", ".pt", ".pth", ".pkl")]
    card = (folder / "README.md").read_text()
    assert "examples/train_pmf.py" in card and "--preset toy-cpu" in card
    pipe = load_bundled_pipeline()
    assert isinstance(pipe, PMFPipeline) and pipe.transformer.config.num_classes == len(TOY_CLASS_NAMES)
    assert pipe.get_label_ids(["red circle", "purple_star"]) == [0, 9]


def _card_table_rows(card: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table under `## heading`, as lists of cell texts."""
    section = card.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # skip the header and the |---| line


def test_bundled_card_states_the_folders_real_settings():
    """The card's tables say what the folder's configs and weights are (the card once said ω 1 while
    model_index.json said 2.0)."""
    folder = bundled_model_path()
    card = (folder / "README.md").read_text()
    pipeline_config = json.loads((folder / "model_index.json").read_text())
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())

    [[steps, omega, interval, noise_scale]] = _card_table_rows(card, "Sampling settings")
    t_min, t_max = (float(value) for value in re.fullmatch(r"\[(.+), (.+)\]", interval).groups())
    assert int(steps) == inspect.signature(PMFPipeline.__call__).parameters["num_inference_steps"].default
    assert float(omega) == pipeline_config["default_guidance_scale"]
    assert [t_min, t_max] == pipeline_config["default_guidance_interval"]
    assert float(noise_scale) == scheduler_config["noise_scale"]

    training = dict(_card_table_rows(card, "Training"))
    pipe = load_bundled_pipeline()
    num_parameters = sum(parameter.numel() for parameter in pipe.transformer.parameters())
    assert f"({num_parameters:,})" in training["parameters (inference)"]


def test_bundled_samples_are_recognised_by_the_independent_judge():
    judge_images, judge_labels = generate_toy_arrays(images_per_class=100, seed=1000)
    judge = train_toy_classifier((judge_images, judge_labels), seed=0, num_threads=1)
    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    per_class = 40
    labels = [c for c in range(len(TOY_CLASS_NAMES)) for _ in range(per_class)]
    generators = [torch.Generator().manual_seed(50_000 + i) for i in range(len(labels))]
    samples = pipe(class_labels=labels, generator=generators, output_type="pt").images * 2 - 1
    accuracy = evaluate_per_class_accuracy(judge, samples, labels)
    assert min(accuracy.values()) >= 0.95, accuracy
