"""Loader mixins for pMF pipelines (diffusers' `loaders` counterpart): the LoRA adapter format and loader."""

from .lora_pmf import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_FORMAT,
    ADAPTER_FORMAT_VERSION,
    CLASS_EMBEDDINGS_KEY,
    CLASS_EMBEDDINGS_NAME,
    PMFLoraLoaderMixin,
    pmf_base_model_info,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_FORMAT",
    "ADAPTER_FORMAT_VERSION",
    "CLASS_EMBEDDINGS_KEY",
    "CLASS_EMBEDDINGS_NAME",
    "PMFLoraLoaderMixin",
    "pmf_base_model_info",
]
