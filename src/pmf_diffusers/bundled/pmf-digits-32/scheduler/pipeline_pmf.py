# Loader code of a model bundled with pmf-diffusers: it ships inside the installed package, so diffusers'
# generic loader gets the package's own classes (DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)).
from pmf_diffusers.pipelines.pipeline_pmf import PMFPipeline  # noqa: F401
from pmf_diffusers.models.transformer_pmf import PMFTransformer2DModel  # noqa: F401
from pmf_diffusers.schedulers.scheduling_pmf import PMFScheduler  # noqa: F401
