from .pipeline_pmf import PMFPipeline, load_imagenet_id2label

__all__ = ["PMFPipeline", "load_imagenet_id2label"]
