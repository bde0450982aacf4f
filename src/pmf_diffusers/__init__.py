"""pmf-diffusers: pixel MeanFlow (one-step, latent-free image generation) for the Hugging Face stack.

Public names are imported lazily so that `pmf --help` does not pay for importing diffusers; importing any of them
(e.g. `from pmf_diffusers import PMFPipeline`) loads the model, scheduler and pipeline modules together, which is
what diffusers needs to resolve the components named in a saved `model_index.json`.
"""

import importlib
import logging

__version__ = "0.1.0"

# Our modules log through `diffusers.utils.logging.get_logger(__name__)`. Hanging the package logger under diffusers'
# library logger makes `diffusers.utils.logging.set_verbosity_*()` (and diffusers' handler/format) apply to us too.
logging.getLogger(__name__).parent = logging.getLogger("diffusers")

_EXPORTS = {
    "PMFPipeline": "pipelines.pipeline_pmf",
    "load_imagenet_id2label": "pipelines.pipeline_pmf",
    "PMFScheduler": "schedulers.scheduling_pmf",
    "PMFSchedulerOutput": "schedulers.scheduling_pmf",
    "PMFTransformer2DModel": "models.transformer_pmf",
    "PMFTransformer2DModelOutput": "models.transformer_pmf",
    "convert_official_state_dict": "conversion",
    "load_official": "loading",
    "load_pipeline": "loading",
    "load_bundled_pipeline": "bundled",
    "bundled_model_path": "bundled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pmf_diffusers' has no attribute {name!r}")
    # The pipeline module imports the model and scheduler modules, so all three land in sys.modules.
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    return getattr(module, name)


def __dir__():
    return __all__ + ["__version__"]
