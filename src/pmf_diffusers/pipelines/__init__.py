from .pipeline_pmf import PMFPipeline, check_guidance_settings, load_imagenet_id2label

__all__ = ["PMFPipeline", "check_guidance_settings", "load_imagenet_id2label"]
