from .transformer_pmf import PMFTransformer2DModel, PMFTransformer2DModelOutput

__all__ = ["PMFTransformer2DModel", "PMFTransformer2DModelOutput"]
