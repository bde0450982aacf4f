# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Official pMF checkpoints (torch `.pt`, training-mode state dicts, Flax parameter trees) → diffusers folders.

The official loader uses `load_state_dict(strict=False)` and silently loads nothing on a key mismatch; this module
infers the architecture from the tensor shapes and refuses any missing, unexpected or mis-shaped key by name.
"""

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from .loaders.safe_weights import non_finite_tensor_names

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
from .pipelines.pipeline_pmf import PMFPipeline, check_guidance_settings, load_imagenet_id2label
from .schedulers.scheduling_pmf import PMFScheduler, check_noise_scale

__all__ = [
    "CheckpointConversionError",
    "official_key_to_diffusers",
    "diffusers_key_to_official",
    "flax_params_to_official_torch",
    "infer_config",
    "convert_official_state_dict",
    "load_official_checkpoint",
    "build_transformer",
    "build_pipeline",
    "convert_checkpoint",
    "check_output_folder",
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


# A group of a rule's official pattern: `(?P<name>body)` or `(body)`. The rules use literal names, `\.` and
# un-nested groups only, which is what lets `_reverse_rule` read them backwards.
_RULE_GROUP = re.compile(r"\((?:\?P<(?P<name>\w+)>)?(?P<body>[^()]*)\)")


def _reverse_rule(pattern: str, replacement: str) -> tuple[str, str]:
    """A key rule read backwards: (pattern matching our name, template giving the official name)."""
    bodies = {}

    def group_to_reference(match: re.Match) -> str:
        name = match["name"] or f"g{len(bodies) + 1}"  # an unnamed group is referred to by its number
        bodies[name] = match["body"]
        return rf"\g<{name}>"

    official_template = _RULE_GROUP.sub(group_to_reference, pattern).replace(r"\.", ".")

    def reference_to_group(match: re.Match) -> str:
        name = match[1] or f"g{match[2]}"
        return f"(?P<{name}>{bodies[name]})"

    our_pattern = re.sub(r"\\g<(\w+)>|\\(\d+)", reference_to_group, replacement.replace(".", r"\."))
    return our_pattern, official_template


_REVERSE_KEY_RULES = [_reverse_rule(pattern, replacement) for pattern, replacement in _KEY_RULES]


def diffusers_key_to_official(key: str) -> str | None:
    """The official torch key (no `net.` prefix) that [`official_key_to_diffusers`] maps to our parameter `key`, or
    `None`. Used to name a missing key the way the user's checkpoint would spell it."""
    for official, ours in _BLOCK_GROUPS.items():
        if key.startswith(ours + "."):
            key = official + key[len(ours) :]
    for pattern, template in _REVERSE_KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
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


def infer_config(state_dict: Mapping[str, torch.Tensor], key_prefix: str = "") -> dict:
    """Architecture of an official (torch-named, unprefixed) state dict, from tensor shapes alone. `key_prefix` (e.g.
    `net.`) is only used to name keys in errors the way the user's file spells them."""
    required = ["pos_embed", "x_embedder.proj1.weight", "y_embedder.embedding_table._flax_embedding.weight",
                "shared_blocks.0.attn.q_norm.weight", "shared_blocks.0.mlp.w1._flax_linear.weight",
                "h_embedder.mlp.0._flax_linear.weight", "class_tokens", "omega_tokens", "t_min_tokens", "time_tokens"]
    missing = [key for key in required if key not in state_dict]
    if missing:
        found = ", ".join(key_prefix + key for key in list(state_dict)[:5])
        raise CheckpointConversionError(
            f"Not a pMF checkpoint: missing {', '.join(key_prefix + key for key in missing)} (found e.g. {found})."
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


def _name_some(names: list[str], limit: int = 10) -> str:
    """The first `limit` names, then how many more, so that an error stays one readable line."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _missing_key_name(key: str, key_prefix: str) -> str:
    official = diffusers_key_to_official(key)
    return f"{key} [file key: {key_prefix}{official}]" if official else key


def convert_official_state_dict(state_dict: Mapping) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert an official pMF checkpoint to `(config, state_dict)` for [`PMFTransformer2DModel`].

    Accepts the released torch `.pt` layout (`net.` prefix, `rope_freqs` present or not), training-mode state dicts
    with the v-head (prefixed or not) and Flax parameter trees. The architecture is inferred from the shapes; missing,
    unexpected or mis-shaped keys, and NaN or infinite weights, raise [`CheckpointConversionError`] naming the keys
    (up to ten of each kind, with the count) both as we name them and as the checkpoint spells them (Flax trees are
    named by their torch-branch keys).
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointConversionError("Expected a non-empty mapping of parameter names to tensors.")
    if _is_flax_layout(_flatten_tree(state_dict).keys()):
        state_dict = flax_params_to_official_torch(state_dict)
    official, file_keys = {}, {}  # file_keys: official unprefixed key -> the key as written in the checkpoint
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointConversionError(f"{key!r} is a {type(value).__name__}, not a tensor.")
        official_key = key[len("net."):] if key.startswith("net.") else key
        official[official_key] = value
        file_keys[official_key] = key
    # Keys the file lacks are named with the prefix most of its keys carry.
    key_prefix = "net." if 2 * sum(key.startswith("net.") for key in state_dict) > len(state_dict) else ""
    # The RoPE table is deterministic; we rebuild it rather than load it.
    rope_freqs = official.pop("rope_freqs", None)

    config = infer_config(official, key_prefix)
    converted, file_key_of, unexpected = {}, {}, []
    for key, value in official.items():
        new_key = official_key_to_diffusers(key)
        if new_key is None:
            unexpected.append(file_keys[key])
        else:
            converted[new_key] = value.float() if value.is_floating_point() else value
            file_key_of[new_key] = file_keys[key]

    with torch.device("meta"):
        reference = PMFTransformer2DModel(**config)
    expected = {key: tuple(tensor.shape) for key, tensor in reference.state_dict().items()}
    missing = sorted(_missing_key_name(key, key_prefix) for key in expected if key not in converted)
    unexpected += sorted(file_key_of[key] for key in converted if key not in expected)
    mis_shaped = sorted(
        f"{key} {tuple(tensor.shape)} (expected {expected[key]}) [file key: {file_key_of[key]}]"
        for key, tensor in converted.items()
        if key in expected and tuple(tensor.shape) != expected[key]
    )
    if rope_freqs is not None and tuple(rope_freqs.shape) != tuple(reference.rope_freqs.shape):
        mis_shaped.append(
            f"rope_freqs {tuple(rope_freqs.shape)} (expected {tuple(reference.rope_freqs.shape)}) "
            f"[file key: {file_keys['rope_freqs']}]"
        )
    problems = []
    if missing:
        problems.append(f"missing keys: {_name_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_name_some(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys: {_name_some(mis_shaped)}")
    if problems:
        raise CheckpointConversionError("Checkpoint does not match a pMF network — " + "; ".join(problems) + ".")

    # A NaN or inf weight would give black or noise images without a word; meta tensors (key checks only) hold none.
    non_finite = [file_key_of[key] for key in non_finite_tensor_names(converted.items())]
    if non_finite:
        raise CheckpointConversionError(
            f"Checkpoint has NaN or infinite weights in {len(non_finite)} tensor(s): {_name_some(non_finite)}; the file "
            "is corrupt or comes from a diverged run — use another checkpoint."
        )
    return config, converted


def _weights_only_refusal(error: Exception) -> str:
    """What `torch.load(weights_only=True)` refused, from its error (whose first lines only suggest turning the
    safety off, which we never do)."""
    for line in str(error).splitlines():
        line = line.split("WeightsUnpickler error:")[-1].strip()
        if line and not line.startswith(("Weights only load failed", "Please file an issue", "Check the documentation")):
            return line.rstrip(".")
    return type(error).__name__


def load_official_checkpoint(path: str | Path) -> dict:
    """Read an official checkpoint file: `.pt`/`.pth` with `torch.load(weights_only=True)` (no arbitrary pickles),
    or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError for a broken header or data
            raise CheckpointConversionError(f"{path} is not a readable .safetensors file ({error}).") from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError (or others) for anything that is not plain weights
        raise CheckpointConversionError(
            f"{path} is not a plain weights file: torch.load(weights_only=True) refused it "
            f"({_weights_only_refusal(error)}). Only state dicts of tensors are accepted; code in a pickle is never run."
        ) from None
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        checkpoint = checkpoint["state_dict"]
    return checkpoint


def build_transformer(config: dict, state_dict: dict[str, torch.Tensor]) -> PMFTransformer2DModel:
    """A [`PMFTransformer2DModel`] in eval mode holding converted weights (strict load; the tensors are used as they
    are, not copied)."""
    with torch.device("meta"):
        transformer = PMFTransformer2DModel(**config)
    transformer.load_state_dict(state_dict, strict=True, assign=True)
    # The RoPE table is a non-persistent buffer, so it is still on the meta device: rebuild it.
    transformer.rope_freqs = get_2d_rope_freqs(
        config["sample_size"] // config["patch_size"], config["attention_head_dim"], transformer.config.rope_theta
    )
    return transformer.eval()


def build_pipeline(
    config: dict,
    state_dict: dict[str, torch.Tensor],
    noise_scale: float = 1.0,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    id2label: dict[int, str] | None = None,
) -> PMFPipeline:
    """Assemble a [`PMFPipeline`] from converted weights (strict load)."""
    transformer = build_transformer(config, state_dict)
    if id2label is None and config["num_classes"] == 1000:
        id2label = load_imagenet_id2label()
    return PMFPipeline(
        transformer=transformer,
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
    when given. A preset supplies the per-size noise scale and guidance defaults; explicit values override it.

    A non-empty `output_dir` needs `overwrite=True`, which replaces only the files a conversion writes (see
    [`check_output_folder`]); other files in the folder are kept, and a folder that contains the checkpoint is refused.
    The pipeline is saved next to `output_dir` first and moved in with `model_index.json` last, so an interrupted
    conversion never leaves a folder that looks complete.
    """
    checkpoint_path = Path(checkpoint) if isinstance(checkpoint, (str, Path)) else None
    if output_dir is not None:
        output_dir = check_output_folder(output_dir, overwrite=overwrite, checkpoint=checkpoint_path)
    if noise_scale is not None:
        check_noise_scale(noise_scale)
    check_guidance_settings(guidance_scale, guidance_interval)
    state_dict = load_official_checkpoint(checkpoint_path) if checkpoint_path is not None else checkpoint
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
        # A sibling folder (same filesystem: the moves are renames), made by mkdir so that it gets the usual
        # permissions when it becomes the output folder (tempfile.mkdtemp would make it private).
        stage = output_dir.parent / f".{output_dir.name}.converting-{os.getpid()}-{secrets.token_hex(4)}"
        stage.mkdir(parents=True)
        try:
            pipeline.save_pretrained(stage, safe_serialization=True)
            _move_pipeline_files(stage, output_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return pipeline


# What a conversion (`PMFPipeline.save_pretrained`) writes inside each component folder: its config and its weights
# (safetensors, possibly sharded with an index). With `model_index.json` these are the only files `overwrite=True`
# replaces or removes; anything else in the output folder is the user's and stays.
PIPELINE_COMPONENT_FOLDERS = ("transformer", "scheduler")
_COMPONENT_FILE_PATTERNS = (
    "config.json",
    "scheduler_config.json",
    "diffusion_pytorch_model*.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)


class OutputFolderNotEmptyError(FileExistsError):
    """The output folder of a conversion is not empty and `overwrite` was not given."""


def _is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies under `folder`, by its written path or after following symlinks."""
    written = Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
    return written or path.resolve().is_relative_to(folder.resolve())


def _pipeline_class_name(index_path: Path) -> str | None:
    """The pipeline class a `model_index.json` names (plain or diffusers' list form), or None if unreadable."""
    from .remote_code import pipeline_class_name

    try:
        return pipeline_class_name(json.loads(index_path.read_text()))
    except (OSError, ValueError):
        return None


def check_output_folder(output_dir: str | Path, overwrite: bool = False, checkpoint: str | Path | None = None) -> Path:
    """Check that a conversion may write into `output_dir`; returns it as a `Path`.

    Refused: a path that is a file; a folder that contains `checkpoint` (the input is never touched); a non-empty
    folder without `overwrite`; with `overwrite`, a folder whose `model_index.json` belongs to another pipeline.
    `overwrite` replaces only `model_index.json` and the component configs and weights a conversion writes.
    """
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"Output {str(output_dir)!r} exists and is not a folder.")
    if checkpoint is not None and output_dir.is_dir() and _is_inside(Path(checkpoint).expanduser(), output_dir):
        raise ValueError(
            f"Output folder {str(output_dir)!r} contains the checkpoint {str(checkpoint)!r}: write the pipeline to "
            "another folder."
        )
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise OutputFolderNotEmptyError(
                f"Output folder {str(output_dir)!r} exists and is not empty; pass overwrite=True to replace the "
                "pipeline files in it (other files are kept)."
            )
        index_path = output_dir / "model_index.json"
        if index_path.exists() and _pipeline_class_name(index_path) != "PMFPipeline":
            raise FileExistsError(
                f"Output folder {str(output_dir)!r} holds a model_index.json that is not a PMFPipeline's; "
                "write the pipeline to another folder."
            )
    return output_dir


def _previous_pipeline_files(output_dir: Path) -> list[Path]:
    """The files of `output_dir` (relative paths) that an earlier conversion wrote."""
    files = [Path("model_index.json")] if (output_dir / "model_index.json").is_file() else []
    for component in PIPELINE_COMPONENT_FOLDERS:
        for pattern in _COMPONENT_FILE_PATTERNS:
            files += [path.relative_to(output_dir) for path in (output_dir / component).glob(pattern) if path.is_file()]
    return files


def _move_pipeline_files(stage: Path, output_dir: Path) -> None:
    """Move the saved pipeline in `stage` into `output_dir`, replacing an earlier conversion's files only."""
    if not output_dir.exists():
        stage.rename(output_dir)  # atomic on one filesystem
        return
    index = Path("model_index.json")
    new_files = sorted(path.relative_to(stage) for path in stage.rglob("*") if path.is_file())
    # Without model_index.json the folder no longer looks like a complete pipeline while its files are swapped.
    (output_dir / index).unlink(missing_ok=True)
    for old in _previous_pipeline_files(output_dir):
        if old not in new_files:  # e.g. the shards of an earlier, sharded save
            (output_dir / old).unlink()
    for relative in sorted(new_files, key=lambda path: path == index):  # model_index.json last
        target = output_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / relative, target)
