# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The default model shipped inside the package: a small pMF trained by `examples/train_pmf.py` on the project's
procedurally generated toy dataset (10 classes of coloured shapes, 32×32). It makes `pmf generate` and the Space
work offline on a fresh machine; see the model card next to the weights for the command that reproduces it."""

import os
from pathlib import Path

BUNDLED_MODEL_NAME = "pmf-toy-shapes-32"
BUNDLED_MODEL_DIR = Path(__file__).parent / "bundled" / BUNDLED_MODEL_NAME


def bundled_model_path() -> Path:
    """Folder of the bundled `PMFPipeline` (override with the `PMF_BUNDLED_MODEL_DIR` environment variable)."""
    path = Path(os.environ.get("PMF_BUNDLED_MODEL_DIR", BUNDLED_MODEL_DIR))
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No bundled pMF model at {path}: reinstall pmf-diffusers, or point PMF_BUNDLED_MODEL_DIR to a "
            "PMFPipeline folder."
        )
    return path


def load_bundled_pipeline(**kwargs):
    """`PMFPipeline.from_pretrained(bundled_model_path(), **kwargs)`."""
    from .pipelines.pipeline_pmf import PMFPipeline

    return PMFPipeline.from_pretrained(bundled_model_path(), **kwargs)
