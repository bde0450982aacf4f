"""pmf-diffusers: pixel MeanFlow (one-step, latent-free image generation) for the Hugging Face stack."""

from .models import PMFTransformer2DModel, PMFTransformer2DModelOutput
from .pipelines import PMFPipeline, load_imagenet_id2label
from .schedulers import PMFScheduler, PMFSchedulerOutput

__version__ = "0.1.0"

__all__ = [
    "PMFPipeline",
    "PMFScheduler",
    "PMFSchedulerOutput",
    "PMFTransformer2DModel",
    "PMFTransformer2DModelOutput",
    "load_imagenet_id2label",
]
