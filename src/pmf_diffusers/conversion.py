# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Official pMF checkpoints (torch `.pt`, training-mode state dicts, Flax parameter trees) → diffusers folders.

The official loader uses `load_state_dict(strict=False)` and silently loads nothing on a key mismatch; this module
infers the architecture from the tensor shapes and refuses any missing, unexpected or mis-shaped key by name.
"""

import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

# The facts about the released sizes live in `official.py`, `load_official` in `loading.py`; OFFICIAL_PRESETS,
# OFFICIAL_REPO_ID, default_cache_dir and load_official stay importable from here, where they used to live.
from .loading import load_official  # noqa: F401
from .models.transformer_pmf import PMFTransformer2DModel, get_2d_rope_freqs
from .official import (  # noqa: F401
    OFFICIAL_PRESETS,
    OFFICIAL_REPO_ID,
    CheckpointConversionError,
    OfficialPreset,
    check_preset,
    default_cache_dir,
    resolve_preset,
)
from .pipelines.pipeline_pmf import PMFPipeline, load_imagenet_id2label
from .schedulers.scheduling_pmf import PMFScheduler

__all__ = [
    "CheckpointConversionError",
    "official_key_to_diffusers",
    "flax_params_to_official_torch",
    "infer_config",
    "convert_official_state_dict",
    "load_official_checkpoint",
    "build_pipeline",
    "convert_checkpoint",
]


# Official torch names → ours. Applied in order with re.sub; every official key must match exactly one rule.
_BLOCK = r"(?P<group>shared_blocks|u_heads|v_heads)\.(?P<index>\d+)\."
_KEY_RULES: list[tuple[str, str]] = [
    (r"time_tokens", "delta_time_tokens"),
    (r"class_tokens", "class_tokens"),
    (r"omega_tokens", "guidance_tokens"),
    (r"t_min_tokens", "guidance_start_tokens"),
    (r"t_max_tokens", "guidance_end_tokens"),
    (r"pos_embed", "pos_embed"),
    (r"x_embedder\.proj1\.(weight|bias)", r"patch_embed.proj_in.\1"),
    (r"x_embedder\.proj2\.(weight|bias)", r"patch_embed.proj_out.\1"),
    (r"y_embedder\.embedding_table\._flax_embedding\.weight", "class_embedder.weight"),
    (r"h_embedder\.mlp\.0\._flax_linear\.(weight|bias)", r"delta_time_embedder.embedder.linear_1.\1"),
    (r"h_embedder\.mlp\.2\._flax_linear\.(weight|bias)", r"delta_time_embedder.embedder.linear_2.\1"),
    (r"omega_embedder\.mlp\.0\._flax_linear\.(weight|bias)", r"guidance_embedder.embedder.linear_1.\1"),
    (r"omega_embedder\.mlp\.2\._flax_linear\.(weight|bias)", r"guidance_embedder.embedder.linear_2.\1"),
    (r"cfg_t_start_embedder\.mlp\.0\._flax_linear\.(weight|bias)", r"guidance_start_embedder.embedder.linear_1.\1"),
    (r"cfg_t_start_embedder\.mlp\.2\._flax_linear\.(weight|bias)", r"guidance_start_embedder.embedder.linear_2.\1"),
    (r"cfg_t_end_embedder\.mlp\.0\._flax_linear\.(weight|bias)", r"guidance_end_embedder.embedder.linear_1.\1"),
    (r"cfg_t_end_embedder\.mlp\.2\._flax_linear\.(weight|bias)", r"guidance_end_embedder.embedder.linear_2.\1"),
    (_BLOCK + r"attn_scale", r"\g<group>.\g<index>.attn_gate"),
    (_BLOCK + r"mlp_scale", r"\g<group>.\g<index>.ff_gate"),
    (_BLOCK + r"norm(?P<n>[12])\.weight", r"\g<group>.\g<index>.norm\g<n>.weight"),
    (_BLOCK + r"attn\.(?P<p>[qkv])_proj\._flax_linear\.weight", r"\g<group>.\g<index>.attn.to_\g<p>.weight"),
    (_BLOCK + r"attn\.out_proj\._flax_linear\.weight", r"\g<group>.\g<index>.attn.to_out.weight"),
    (_BLOCK + r"attn\.(?P<p>[qk])_norm\.weight", r"\g<group>.\g<index>.attn.norm_\g<p>.weight"),
    (_BLOCK + r"mlp\.w1\._flax_linear\.weight", r"\g<group>.\g<index>.ff.gate_proj.weight"),
    (_BLOCK + r"mlp\.w3\._flax_linear\.weight", r"\g<group>.\g<index>.ff.up_proj.weight"),
    (_BLOCK + r"mlp\.w2\._flax_linear\.weight", r"\g<group>.\g<index>.ff.down_proj.weight"),
    (r"(?P<h>[uv])_final_layer\.norm\.weight", r"\g<h>_norm_out.weight"),
    (r"(?P<h>[uv])_final_layer\.linear\._flax_linear\.(?P<p>weight|bias)", r"\g<h>_proj_out.\g<p>"),
]
_BLOCK_GROUPS = {"shared_blocks": "transformer_blocks", "u_heads": "u_head_blocks", "v_heads": "v_head_blocks"}


def official_key_to_diffusers(key: str) -> str | None:
    """Our parameter name for an official torch key (no `net.` prefix), or `None` if it is not a pMF key."""
    for pattern, replacement in _KEY_RULES:
        if re.fullmatch(pattern, key):
            new_key = re.sub(pattern, replacement, key)
            for official, ours in _BLOCK_GROUPS.items():
                if new_key.startswith(official + "."):
                    new_key = ours + new_key[len(official) :]
            return new_key
    return None


def _flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten_tree(value, path))
        else:
            flat[path] = value
    return flat


def flax_params_to_official_torch(params: Mapping) -> dict[str, torch.Tensor]:
    """Flax parameter tree (nested or `/`-joined, optionally under `params/` and `net/`) → official torch names and
    layouts: Dense kernels (in, out) are transposed, conv kernels HWIO → OIHW, the (1, K+1, D) label table loses its
    leading axis, RMSNorm `kernel` becomes `weight`."""
    converted = {}
    for path, value in _flatten_tree(params).items():
        tensor = torch.as_tensor(value.copy() if hasattr(value, "copy") else value).float()
        parts = path.split("/")
        while parts and parts[0] in ("params", "net"):
            parts = parts[1:]
        name = ".".join(parts)
        name = re.sub(r"(shared_blocks|u_heads|v_heads)_(\d+)", r"\1.\2", name)
        name = re.sub(r"\.mlp\.layers_(\d+)\.", r".mlp.\1.", name)
        if name.endswith("embedding_table.embedding"):
            name = name[: -len("embedding")] + "_flax_embedding.weight"
            tensor = tensor.reshape(tensor.shape[-2], tensor.shape[-1])
        elif name.endswith(".kernel"):
            name = name[: -len("kernel")] + "weight"
            if tensor.ndim == 2:
                tensor = tensor.t()
            elif tensor.ndim == 4:
                tensor = tensor.permute(3, 2, 0, 1)
        converted[name] = tensor.contiguous()
    return converted


def _is_flax_layout(keys) -> bool:
    return any("/" in key for key in keys)


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Architecture of an official (torch-named, unprefixed) state dict, from tensor shapes alone."""
    required = ["pos_embed", "x_embedder.proj1.weight", "y_embedder.embedding_table._flax_embedding.weight",
                "shared_blocks.0.attn.q_norm.weight", "shared_blocks.0.mlp.w1._flax_linear.weight",
                "h_embedder.mlp.0._flax_linear.weight", "class_tokens", "omega_tokens", "t_min_tokens", "time_tokens"]
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise CheckpointConversionError(
            f"Not a pMF checkpoint: missing {', '.join(missing)} (found e.g. {', '.join(list(state_dict)[:5])})."
        )
    hidden_size = state_dict["pos_embed"].shape[-1]
    head_dim = state_dict["shared_blocks.0.attn.q_norm.weight"].shape[0]
    bottleneck_dim, in_channels, patch_size, _ = state_dict["x_embedder.proj1.weight"].shape
    num_class_tokens = state_dict["class_tokens"].shape[1]
    num_guidance_tokens = state_dict["omega_tokens"].shape[1]
    num_interval_tokens = state_dict["t_min_tokens"].shape[1]
    num_time_tokens = state_dict["time_tokens"].shape[1]
    num_prefix = num_class_tokens + num_guidance_tokens + 2 * num_interval_tokens + num_time_tokens
    num_patches = state_dict["pos_embed"].shape[1] - num_prefix
    grid_size = math.isqrt(max(num_patches, 0))
    if num_patches <= 0 or grid_size * grid_size != num_patches:
        raise CheckpointConversionError(
            f"pos_embed has {state_dict['pos_embed'].shape[1]} tokens; minus {num_prefix} condition tokens that is "
            f"not a square patch grid."
        )
    if hidden_size % head_dim != 0:
        raise CheckpointConversionError(f"Hidden size {hidden_size} is not a multiple of the QK-norm width {head_dim}.")

    def count_blocks(group: str) -> int:
        indices = {int(m.group(1)) for key in state_dict if (m := re.match(rf"{group}\.(\d+)\.", key))}
        return max(indices) + 1 if indices else 0

    return {
        "sample_size": grid_size * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "num_layers": count_blocks("shared_blocks"),
        "num_head_layers": count_blocks("u_heads"),
        "num_attention_heads": hidden_size // head_dim,
        "attention_head_dim": head_dim,
        "mlp_hidden_dim": state_dict["shared_blocks.0.mlp.w1._flax_linear.weight"].shape[0],
        "bottleneck_dim": bottleneck_dim,
        "num_classes": state_dict["y_embedder.embedding_table._flax_embedding.weight"].shape[0] - 1,
        "num_class_tokens": num_class_tokens,
        "num_guidance_tokens": num_guidance_tokens,
        "num_interval_tokens": num_interval_tokens,
        "num_time_tokens": num_time_tokens,
        "frequency_embedding_dim": state_dict["h_embedder.mlp.0._flax_linear.weight"].shape[1],
        "with_v_head": count_blocks("v_heads") > 0 or any(key.startswith("v_final_layer.") for key in state_dict),
    }


def convert_official_state_dict(state_dict: Mapping) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert an official pMF checkpoint to `(config, state_dict)` for [`PMFTransformer2DModel`].

    Accepts the released torch `.pt` layout (`net.` prefix, `rope_freqs` present or not), training-mode state dicts
    with the v-head (prefixed or not) and Flax parameter trees. The architecture is inferred from the shapes; any
    missing, unexpected or mis-shaped key raises [`CheckpointConversionError`] naming all of them.
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointConversionError("Expected a non-empty mapping of parameter names to tensors.")
    if _is_flax_layout(_flatten_tree(state_dict).keys()):
        state_dict = flax_params_to_official_torch(state_dict)
    official = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointConversionError(f"{key!r} is a {type(value).__name__}, not a tensor.")
        official[key[len("net."):] if key.startswith("net.") else key] = value
    # The RoPE table is deterministic; we rebuild it rather than load it.
    rope_freqs = official.pop("rope_freqs", None)

    config = infer_config(official)
    converted, unexpected = {}, []
    for key, value in official.items():
        new_key = official_key_to_diffusers(key)
        if new_key is None:
            unexpected.append(key)
        else:
            converted[new_key] = value.float() if value.is_floating_point() else value

    with torch.device("meta"):
        reference = PMFTransformer2DModel(**config)
    expected = {key: tuple(tensor.shape) for key, tensor in reference.state_dict().items()}
    missing = sorted(key for key in expected if key not in converted)
    unexpected += sorted(key for key in converted if key not in expected)
    mis_shaped = sorted(
        f"{key} {tuple(tensor.shape)} (expected {expected[key]})"
        for key, tensor in converted.items()
        if key in expected and tuple(tensor.shape) != expected[key]
    )
    if rope_freqs is not None and tuple(rope_freqs.shape) != tuple(reference.rope_freqs.shape):
        mis_shaped.append(f"rope_freqs {tuple(rope_freqs.shape)} (expected {tuple(reference.rope_freqs.shape)})")
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys: {', '.join(mis_shaped)}")
    if problems:
        raise CheckpointConversionError("Checkpoint does not match a pMF network — " + "; ".join(problems) + ".")
    return config, converted


def load_official_checkpoint(path: str | Path) -> dict:
    """Read an official checkpoint file: `.pt`/`.pth` with `torch.load(weights_only=True)` (no arbitrary pickles),
    or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError (or others) for anything that is not plain weights
        raise CheckpointConversionError(
            f"{path} is not a plain weights file (refused by torch.load(weights_only=True): "
            f"{str(error).splitlines()[0]}). Only state dicts of tensors are accepted."
        ) from None
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        checkpoint = checkpoint["state_dict"]
    return checkpoint


def build_pipeline(
    config: dict,
    state_dict: dict[str, torch.Tensor],
    noise_scale: float = 1.0,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    id2label: dict[int, str] | None = None,
) -> PMFPipeline:
    """Assemble a [`PMFPipeline`] from converted weights (strict load)."""
    with torch.device("meta"):
        transformer = PMFTransformer2DModel(**config)
    transformer.load_state_dict(state_dict, strict=True, assign=True)
    # The RoPE table is a non-persistent buffer, so it is still on the meta device: rebuild it.
    transformer.rope_freqs = get_2d_rope_freqs(
        config["sample_size"] // config["patch_size"], config["attention_head_dim"], transformer.config.rope_theta
    )
    if id2label is None and config["num_classes"] == 1000:
        id2label = load_imagenet_id2label()
    return PMFPipeline(
        transformer=transformer.eval(),
        scheduler=PMFScheduler(noise_scale=noise_scale),
        id2label=id2label,
        default_guidance_scale=guidance_scale,
        default_guidance_interval=guidance_interval,
    )


def convert_checkpoint(
    checkpoint: str | Path | Mapping,
    output_dir: str | Path | None = None,
    preset: str | OfficialPreset | None = None,
    noise_scale: float | None = None,
    guidance_scale: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    overwrite: bool = False,
) -> PMFPipeline:
    """Convert an official checkpoint (path or loaded mapping) into a [`PMFPipeline`], saved to `output_dir` (safetensors)
    when given. A preset supplies the per-size noise scale and guidance defaults; explicit values override it."""
    if output_dir is not None:
        output_dir = Path(output_dir)
        if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"Output folder {output_dir} exists and is not empty; pass overwrite=True to replace it.")
    state_dict = load_official_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    config, converted = convert_official_state_dict(state_dict)
    if isinstance(preset, str):
        preset = resolve_preset(preset)
    if preset is not None:
        check_preset(config, preset)
    pipeline = build_pipeline(
        config,
        converted,
        noise_scale=noise_scale if noise_scale is not None else (preset.noise_scale if preset else 1.0),
        guidance_scale=guidance_scale if guidance_scale is not None else (preset.guidance_scale if preset else 1.0),
        guidance_interval=guidance_interval or (preset.guidance_interval if preset else (0.0, 1.0)),
    )
    if output_dir is not None:
        if output_dir.exists():
            shutil.rmtree(output_dir)
        pipeline.save_pretrained(output_dir, safe_serialization=True)
    return pipeline
