"""The bundled models: the default toy-shapes model and the real-digits model load offline from the package, their
cards state their folders' real settings, and their one-step samples are recognised by independent classifiers
(the toy judge, trained here on real toy images only; an SVM fitted on scikit-learn's real digits)."""

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pmf_diffusers import PMFPipeline, bundled_model_path, load_bundled_pipeline
from pmf_diffusers.bundled import BUNDLED_MODELS, bundled_model_names
from pmf_diffusers.loading import load_pipeline
from pmf_diffusers.toy.judge import evaluate_per_class_accuracy, train_toy_classifier
from pmf_diffusers.toy.shapes import TOY_CLASS_NAMES, generate_toy_arrays


DIGITS_EVAL_REPORT = Path(__file__).resolve().parents[1] / "docs" / "results" / "digits_eval.json"


@pytest.mark.parametrize("name", bundled_model_names())
def test_each_bundled_model_is_small_safetensors_that_loads_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = bundled_model_path(name)
    assert folder.parent.name == "bundled" and folder.name == BUNDLED_MODELS[name]
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 10 * 1024 * 1024
    assert not [path for path in files if path.suffix in (".bin", ".pt", ".pth", ".pkl")]
    # the package shim, not a generated copy (which would go stale with every source change)
    assert "from pmf_diffusers.pipelines.pipeline_pmf import PMFPipeline" in (folder / "pipeline_pmf.py").read_text()
    pipe = load_pipeline(name)
    assert isinstance(pipe, PMFPipeline) and pipe.transformer.config.sample_size == 32
    assert pipe.transformer.config.num_classes == 10 and pipe.transformer.config.with_v_head is False  # u-head only


def test_bundled_names_and_the_default():
    assert bundled_model_names()[0] == "toy-shapes"
    assert bundled_model_path() == bundled_model_path("toy-shapes") == bundled_model_path("pmf-toy-shapes-32")
    assert load_pipeline("bundled").transformer.config == load_bundled_pipeline("toy-shapes").transformer.config
    with pytest.raises(ValueError, match="unknown bundled model 'mnist'.*toy-shapes, digits"):
        bundled_model_path("mnist")
    with pytest.raises(ValueError, match="bundled model \\(toy-shapes, digits\\)"):
        load_pipeline("mnist")


def test_bundled_model_is_small_safetensors_with_a_card():
    folder = bundled_model_path()
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


@pytest.mark.parametrize("name", bundled_model_names())
def test_bundled_card_states_the_folders_real_settings(name):
    """The card's tables say what the folder's configs and weights are (the card once said ω 1 while
    model_index.json said 2.0)."""
    folder = bundled_model_path(name)
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
    pipe = load_bundled_pipeline(name)
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


def test_digits_card_has_the_command_and_the_recorded_held_out_scores():
    """The digits card's evaluation table is the shipped model's evaluation (docs/results/digits_eval.json)."""
    folder = bundled_model_path("digits")
    card = (folder / "README.md").read_text()
    assert "examples/train_digits.py" in card and "--export-bundled src/pmf_diffusers/bundled/pmf-digits-32" in card
    report = json.loads(DIGITS_EVAL_REPORT.read_text())
    pipeline_config = json.loads((folder / "model_index.json").read_text())
    assert report["default_guidance_scale"] == pipeline_config["default_guidance_scale"]
    scores = report["guidance"][str(report["default_guidance_scale"])]
    metrics = {key.strip("`"): value for key, value in _card_table_rows(card, "Evaluation")}
    expected = {
        "classifier accuracy": f"{scores['accuracy']:.3f}",
        "precision": f"{scores['precision']:.3f}",
        "recall": f"{scores['recall']:.3f}",
        "Fréchet distance / real-vs-real floor": f"{scores['fd_ratio']:.2f}",
        "memorisation ratio": f"{scores['memorisation']['ratio']:.2f}",
    }
    for prefix, value in expected.items():
        [row] = [row for row in metrics if row.startswith(prefix)]
        assert metrics[row] == value, (row, metrics[row], value)
    training = dict(_card_table_rows(card, "Training"))
    assert int(training["training steps"]) == report["training_steps"]


def test_digits_samples_are_recognised_by_an_svm_fitted_on_real_digits():
    """One-step samples of every digit, area-downsampled to the digits' own 8×8, are classified as the digit they
    were generated for by an RBF SVM fitted on all of scikit-learn's real digits (no network of this project)."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from pmf_diffusers.evaluation.heldout import pixel_features

    digits = load_digits()
    classifier = SVC(C=10.0).fit(digits.images.reshape(len(digits.images), -1) / 16.0, digits.target)
    pipe = load_bundled_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_label_ids(["seven", "digit 3", "0"]) == [7, 3, 0]
    labels = [digit for digit in range(10) for _ in range(20)]
    generators = [torch.Generator().manual_seed(70_000 + i) for i in range(len(labels))]
    samples = pipe(class_labels=labels, generator=generators, output_type="pt").images
    predicted = classifier.predict(pixel_features(samples, 8))
    accuracy = float(np.mean(predicted == np.asarray(labels)))
    assert accuracy >= 0.85, accuracy
