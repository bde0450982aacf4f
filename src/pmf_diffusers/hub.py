# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Publish a `PMFPipeline` to the Hugging Face Hub: model card, sample grid and remote code included.

`push_pipeline_to_hub` stages a folder holding:

- the pipeline in safetensors only (pickle weights are never uploaded) and `model_index.json`;
- `README.md`, a model card rendered from the templates in `pmf_diffusers/model_cards/`;
- `samples.png`, one-step samples with fixed seeds;
- `pipeline_pmf.py` (at the root and in the component folders), remote code generated from the installed package
  (`pmf_diffusers.remote_code`), so that `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` works
  with only diffusers and torch installed.

It then creates the repo (and the branch), and uploads the folder in one `upload_folder` call. `pmf push`
(`pmf_diffusers.commands.push`) is the command-line face of the same function. A dry run stages the same files and
checks them for the token like a real push.

`push_space_to_hub` (`pmf push-space`) publishes the Gradio app of a source checkout (`spaces_app/`) to a Space, with
the package built as a wheel and unpacked inside it (pmf-diffusers is not on the package index).

This module imports torch, diffusers and huggingface_hub only inside its functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_KINDS = ("official", "trained")
TEMPLATE_DIR = Path(__file__).with_name("model_cards")
SAMPLES_FILENAME = "samples.png"
CARD_FILENAME = "README.md"
# Image i of the sample grid uses a CPU generator seeded with SAMPLE_SEED + i, as the official `evaluate.py` sample
# mode does for its classes (official.IMAGENET_SAMPLE_CLASSES).
SAMPLE_SEED = 0
SAMPLE_TILE_MAX = 256  # sample tiles larger than this are downscaled so that samples.png stays small
# Files copied from a pipeline folder; everything else (pickles above all) stays home.
UPLOADED_SUFFIXES = (".json", ".safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PIPELINE_COMPONENTS = {"transformer": "PMFTransformer2DModel", "scheduler": "PMFScheduler"}
OFFICIAL_DATASET = "ILSVRC/imagenet-1k"
BASE_TAGS = ["pmf", "meanflow", "one-step", "pixel-space", "class-conditional", "diffusers"]
PIPELINE_TAG = "unconditional-image-generation"  # the Hub has no class-conditional task
NOT_LOGGED_IN = "not logged in: run `hf auth login` or set HF_TOKEN"
CITATION = """@article{lu2026pmf,
  title   = {One-step Latent-free Image Generation with Pixel Mean Flows},
  author  = {Lu and Lu and Sun and Zhao and Jiang and Wang and Li and Geng and He},
  journal = {arXiv preprint arXiv:2601.22158},
  year    = {2026},
  url     = {https://arxiv.org/abs/2601.22158}
}"""

_COMMON_FIELDS = {
    "repo_id", "title", "description", "sample_grid", "sample_labels", "sample_seeds", "num_parameters",
    "num_classes", "resolution", "patch_size", "example_class", "example_label", "guidance_scale",
    "guidance_interval", "noise_scale", "steps", "tags",
}
_CARD_FIELDS = {
    "official": _COMMON_FIELDS | {"preset"},
    "trained": _COMMON_FIELDS
    | {"dataset", "datasets", "training_steps", "recipe", "command", "base_model", "license", "license_name",
       "license_link", "metrics", "adapter_base"},
}


class HubPushError(ValueError):
    """A push that cannot proceed; the message is one line that says why and what to do."""


@dataclass
class PushResult:
    """What `push_pipeline_to_hub` / `push_space_to_hub` uploaded (or, with `dry_run=True`, would upload)."""

    repo_id: str
    files: list[tuple[str, int]]  # (path in repo, size in bytes), sorted
    card_kind: str
    dry_run: bool
    revision: str | None = None
    create_pr: bool = False
    preset: str | None = None
    skipped: list[str] = field(default_factory=list)  # "path (reason)" for files of the folder left out
    repo_url: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    repo_type: str = "model"  # or "space"
    space_sdk: str | None = None  # a Space's SDK (from its README), used when the Space is created
    grouped: tuple[str, ...] = ()  # top-level folders listed as one line each in `summary()`

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def _listing(self) -> list[tuple[str, int]]:
        """The files, with those under a `grouped` folder summed up as one entry `folder/ (N files)`."""
        listing, groups = [], {}
        for path, size in self.files:
            top = path.split("/", 1)[0]
            if top in self.grouped and "/" in path:
                count, total = groups.get(top, (0, 0))
                groups[top] = (count + 1, total + size)
            else:
                listing.append((path, size))
        listing += [(f"{top}/ ({count} files)", total) for top, (count, total) in groups.items()]
        return sorted(listing)

    def summary(self) -> str:
        branch = f"branch {self.revision or 'main'}{', as a pull request' if self.create_pr else ''}"
        target = f"{'Space ' if self.repo_type == 'space' else ''}{self.repo_id} ({branch})"
        head = "would upload" if self.dry_run else "uploaded"
        lines = [f"{head} {len(self.files)} files, {_format_size(self.total_bytes)} to {target}:"]
        listing = self._listing()
        width = max((len(path) for path, _ in listing), default=0)
        lines += [f"  {path:<{width}}  {_format_size(size):>10}" for path, size in listing]
        if self.repo_type == "space":
            lines.append(f"Space SDK: {self.space_sdk}")
        else:
            lines.append(f"model card: {self.card_kind}" + (f" ({self.preset})" if self.preset else ""))
        lines += [f"not uploaded: {item}" for item in self.skipped]
        if self.dry_run:
            lines.append("dry run: nothing was sent to the Hub")
        if self.pr_url:
            lines.append(f"pull request: {self.pr_url}")
        elif self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- helpers


def _format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _format_count(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f}B ({count:,})"
    if count >= 1e6:
        return f"{count / 1e6:.1f}M ({count:,})"
    return f"{count:,}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_repo_id(repo_id: str) -> str:
    """A Hub model repo id `namespace/name`, or a one-line `HubPushError`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise HubPushError(f"malformed repo id {repo_id!r}: use 'namespace/name', e.g. 'your-username/pmf-b16'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPushError(f"malformed repo id {repo_id!r}: {_first_line(error)}") from None
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The explicit token, else huggingface_hub's usual sources (`HF_TOKEN`, the saved `hf auth login`, ...)."""
    import huggingface_hub

    if token is not None:
        token = token.strip()
        if not token:
            raise HubPushError("the given token is empty: " + NOT_LOGGED_IN)
        return token
    try:
        token = huggingface_hub.get_token()
    except Exception as error:  # e.g. a failed OIDC exchange when HF_OIDC_RESOURCE is set
        raise HubPushError(f"could not read the Hugging Face token: {_first_line(error)}") from None
    if not token:
        raise HubPushError(NOT_LOGGED_IN)
    return token


def _available_token(token: str | None = None) -> str | None:
    """The token a push would use, or None when there is none (a dry run needs no token, but checks for it)."""
    try:
        return resolve_token(token)
    except HubPushError:
        return None


def _push_endpoint_and_token(endpoint: str | None, token: str | None, *, dry_run: bool, dry_run_hint: str = ", or use a dry run"):
    """The endpoint and token of a push (or a dry run). `HF_ENDPOINT` is read now (huggingface_hub's own constant
    froze it at import time). A push refuses offline mode and needs a token; a dry run takes the token when one is
    available, to check the files for it exactly as a push would."""
    from .loading import hub_offline

    if endpoint is None:
        endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    if dry_run:
        return endpoint, _available_token(token)
    if hub_offline():
        raise HubPushError(f"offline mode is on (HF_HUB_OFFLINE=1): unset it to push{dry_run_hint}")
    return endpoint, resolve_token(token)


def _staging_folder(staging_dir: str | Path | None, stack: contextlib.ExitStack, prefix: str) -> Path:
    """`staging_dir` (new or empty, kept afterwards), else a temporary folder removed when `stack` closes."""
    if staging_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    staging_dir = Path(staging_dir)
    if staging_dir.exists() and any(staging_dir.iterdir()):
        raise HubPushError(f"staging folder {staging_dir} is not empty")
    staging_dir.mkdir(parents=True, exist_ok=True)
    return staging_dir


def _list_files(folder: Path) -> list[tuple[str, int]]:
    """(path relative to `folder`, size in bytes) of every file under `folder`, sorted."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def check_no_token_in_files(folder: str | Path, files, token: str | None) -> None:
    """Refuse (one-line `HubPushError`) when `token` appears in one of `files` (paths relative to `folder`, or
    `(path, size)` pairs): the one leak check of every push and dry run."""
    if not token:
        return
    needle = token.encode()
    for path in files:
        path = path[0] if isinstance(path, tuple) else path
        if needle in (Path(folder) / path).read_bytes():
            raise HubPushError(f"refusing to upload: the access token appears in {path}")


def read_token_file(path: str | Path) -> str:
    """A token stored alone in a file (e.g. a mounted secret)."""
    path = Path(path)
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise HubPushError(f"cannot read the token file {path}: {error.strerror or _first_line(error)}") from None
    if not token:
        raise HubPushError(f"the token file {path} is empty")
    return token


def check_pipeline_folder(folder: str | Path) -> dict:
    """Check that `folder` is a saved `PMFPipeline` (package format) with safetensors weights; returns its
    `model_index.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(f"{folder} is not a folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise HubPushError(
            f"{folder} is not a PMFPipeline folder: no model_index.json (create one with pipe.save_pretrained(folder))"
        )
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HubPushError(f"{index_path} is not valid JSON: {_first_line(error)}") from None
    from .remote_code import pipeline_class_name

    class_name = pipeline_class_name(index)  # plain, or the list form of folders with remote code
    if class_name != "PMFPipeline":
        raise HubPushError(
            f"{folder} is not a PMFPipeline folder: model_index.json has _class_name {class_name!r}, "
            "expected 'PMFPipeline'"
        )
    for component, class_name in PIPELINE_COMPONENTS.items():
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == class_name):
            raise HubPushError(
                f"{folder} is not a PMFPipeline folder: model_index.json component {component!r} is {entry!r}, "
                f"expected a {class_name}"
            )
        if not (folder / component).is_dir():
            raise HubPushError(f"{folder} is not a complete PMFPipeline folder: the {component}/ subfolder is missing")
    weights = list((folder / "transformer").glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in (folder / "transformer").iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" (found {', '.join(pickles)}: pickle weights are never uploaded)" if pickles else ""
        raise HubPushError(
            f"{folder}/transformer has no safetensors weights{found}; re-save with "
            "pipe.save_pretrained(folder, safe_serialization=True)"
        )
    return index


def _pipeline_and_folder(pipeline_or_folder):
    """The pipeline to push, and the folder it was loaded from (`None` for an in-memory pipeline)."""
    from .pipelines.pipeline_pmf import PMFPipeline

    if isinstance(pipeline_or_folder, PMFPipeline):
        return pipeline_or_folder, None
    if not isinstance(pipeline_or_folder, (str, Path)):
        raise HubPushError(
            f"expected a PMFPipeline or the path of a saved one, got {type(pipeline_or_folder).__name__}"
        )
    folder = Path(pipeline_or_folder)
    check_pipeline_folder(folder)
    from diffusers.utils import logging as diffusers_logging

    from .loading import load_pipeline

    bar_was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" is noise here
    try:
        pipeline = load_pipeline(folder)
    except Exception as error:
        raise HubPushError(f"cannot load the PMFPipeline in {folder}: {_first_line(error)}") from None
    finally:
        if bar_was_enabled:
            diffusers_logging.enable_progress_bar()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, folder


def _stage_pipeline(pipeline, folder: Path | None, stage: Path) -> list[str]:
    """Write the pipeline into `stage`: copies a folder's JSON + safetensors files (byte for byte), or saves an
    in-memory pipeline with safetensors. Returns the files left out, with the reason."""
    from .remote_code import REMOTE_CODE_FILENAME, write_remote_code

    skipped, skipped_dirs = [], set()
    if folder is None:
        pipeline.save_pretrained(stage, safe_serialization=True)
    else:
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            relative = path.relative_to(folder)
            top = relative.parts[0]
            if len(relative.parts) == 1 and relative.name == "model_index.json":
                keep = True
            elif top in PIPELINE_COMPONENTS and len(relative.parts) > 1:
                keep = path.suffix in UPLOADED_SUFFIXES and not any(part.startswith(".") for part in relative.parts)
            else:
                keep = False
            if keep:
                target = stage / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            elif path.suffix in PICKLE_SUFFIXES:
                skipped.append(f"{relative.as_posix()} (pickle weights are never uploaded)")
            elif relative.name == REMOTE_CODE_FILENAME and (len(relative.parts) == 1 or top in PIPELINE_COMPONENTS):
                continue  # remote code: generated afresh from the installed package below
            elif relative.as_posix() in (CARD_FILENAME, SAMPLES_FILENAME):
                skipped.append(f"{relative.as_posix()} (regenerated)")
            elif len(relative.parts) > 1 and top not in PIPELINE_COMPONENTS:
                if top not in skipped_dirs:
                    skipped_dirs.add(top)
                    skipped.append(f"{top}/ (not part of the pipeline)")
            else:
                skipped.append(f"{relative.as_posix()} (not part of the pipeline)")
    for path in stage.rglob("*"):  # save_pretrained never writes pickles with safe_serialization; be certain
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            path.unlink()
            skipped.append(f"{path.relative_to(stage).as_posix()} (pickle weights are never uploaded)")
    if not list((stage / "transformer").glob("*.safetensors")):
        raise HubPushError("the staged pipeline has no safetensors weights in transformer/")
    write_remote_code(stage)  # also brings model_index.json of folders from earlier versions to the list form
    return skipped


def _resolve_preset(preset):
    from .official import OfficialPreset, resolve_preset

    if isinstance(preset, OfficialPreset):
        return preset
    try:
        return resolve_preset(str(preset))
    except ValueError as error:
        raise HubPushError(_first_line(error)) from None


def _class_name(id2label: dict, class_id: int) -> str | None:
    name = id2label.get(class_id)
    return name.split(",")[0].strip() if name else None


def default_sample_classes(pipeline) -> list[int]:
    """The official sample classes for an ImageNet model, else the first (up to) 8 classes."""
    from .official import IMAGENET_SAMPLE_CLASSES, OFFICIAL_NUM_CLASSES

    num_classes = pipeline.transformer.config.num_classes
    if num_classes >= OFFICIAL_NUM_CLASSES:
        return list(IMAGENET_SAMPLE_CLASSES)
    return list(range(min(num_classes, 8)))


def render_sample_grid(pipeline, class_labels=None, seed: int = SAMPLE_SEED, columns: int = 4, max_tile: int = SAMPLE_TILE_MAX):
    """One-step samples, image i seeded with `seed + i` (CPU generators, so the grid does not depend on the
    device), tiled into one PIL image `columns` wide (tiles larger than `max_tile` are downscaled)."""
    import torch

    from .image_grid import image_grid

    labels = list(class_labels) if class_labels is not None else default_sample_classes(pipeline)
    generators = [torch.Generator(device="cpu").manual_seed(seed + index) for index in range(len(labels))]
    with torch.no_grad():
        images = pipeline(class_labels=labels, num_inference_steps=1, generator=generators, output_type="pil").images
    return image_grid(images, columns=columns, max_tile=max_tile)


# ------------------------------------------------------------------------------------------------- model cards


def _markdown_cell(value: Any) -> str:
    if isinstance(value, float):
        text = format(value, "g")
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_markdown_cell(item) for item in value)
    elif isinstance(value, bool) or value is None:
        text = str(value).lower() if isinstance(value, bool) else "none"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, prefix=f"{name}.")
        else:
            rows.append((name, value))
    return rows


def markdown_table(mapping: dict, header: tuple[str, str] = ("setting", "value")) -> str:
    """A two-column Markdown table from a (possibly nested) dict; nested keys are joined with dots."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{_markdown_cell(key)}` | {_markdown_cell(value)} |" for key, value in _flatten(mapping)]
    return "\n".join(lines)


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def render_model_card(kind: str, **info):
    """Render the model card of a pMF pipeline as a `huggingface_hub.ModelCard`.

    `kind="official"` (converted released weights; needs `preset`, e.g. `"pMF-B/16"`) or `"trained"` (your own
    training run or fine-tune; needs `resolution` and `num_classes`, and takes `dataset`, `datasets` (Hub ids),
    `training_steps`, `recipe` (dict, rendered as a table), `command`, `base_model`, `license` (default `"mit"`),
    `metrics` (dict of measured values) and `adapter_base` (for a LoRA adapter: the base pipeline, Hub id or folder,
    that the usage snippet loads before `pipe.load_lora_weights(repo_id)`)). Both take `repo_id` (required: it goes into the usage snippet) and,
    optionally, `title`, `description`, `sample_grid` (file name of the grid image), `sample_labels`, `sample_seeds`,
    `num_parameters`, `patch_size`, `example_class`, `example_label`, `guidance_scale`, `guidance_interval`,
    `noise_scale`, `steps` and extra `tags`. `push_pipeline_to_hub` fills these from the pipeline.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .loading import looks_like_repo_id

    if kind not in CARD_KINDS:
        raise HubPushError(f"unknown model-card kind {kind!r}: choose 'official' or 'trained'")
    unknown = sorted(set(info) - _CARD_FIELDS[kind])
    if unknown:
        raise HubPushError(
            f"unknown model-card field(s) for kind {kind!r}: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_CARD_FIELDS[kind]))})"
        )
    if not info.get("repo_id"):
        raise HubPushError("render_model_card needs repo_id (it goes into the usage snippet)")
    context = dict(info)
    context.setdefault("steps", 1)
    context.setdefault("citation", CITATION)
    context.setdefault("sample_seeds", f"{SAMPLE_SEED}, {SAMPLE_SEED + 1}, …")
    if context.get("sample_grid") is True:
        context["sample_grid"] = SAMPLES_FILENAME
    extra_tags = _as_list(context.pop("tags", None))

    if kind == "official":
        from .official import IMAGENET_SAMPLE_CLASSES, OFFICIAL_NUM_CLASSES, OFFICIAL_REPO_ID

        if not context.get("preset"):
            raise HubPushError("an official model card needs preset (one of pMF-B/16 … pMF-H/32)")
        preset = _resolve_preset(context.pop("preset"))
        context.setdefault("title", f"{preset.name}: pixel MeanFlow, ImageNet {preset.sample_size}×{preset.sample_size}, one step")
        context.update(preset_name=preset.name, source_file=preset.filename, source_repo=OFFICIAL_REPO_ID, fid=preset.fid)
        context["inception_score"] = preset.inception_score
        context.setdefault("resolution", preset.sample_size)
        context.setdefault("patch_size", preset.patch_size)
        context.setdefault("num_classes", OFFICIAL_NUM_CLASSES)
        context.setdefault("guidance_scale", preset.guidance_scale)
        context.setdefault("guidance_interval", list(preset.guidance_interval))
        context.setdefault("noise_scale", preset.noise_scale)
        if context["resolution"] != preset.sample_size:
            raise HubPushError(
                f"resolution {context['resolution']} contradicts preset {preset.name} ({preset.sample_size})"
            )
        if "example_class" not in context:
            from .labels import load_imagenet_id2label

            context["example_class"] = IMAGENET_SAMPLE_CLASSES[0]
            context.setdefault("example_label", _class_name(load_imagenet_id2label(), context["example_class"]))
        stored = (float(context["guidance_scale"]), [float(v) for v in context["guidance_interval"]])
        paper = (preset.guidance_scale, [float(v) for v in preset.guidance_interval])
        notes = []
        if stored != paper:
            notes.append(
                f"The paper's setting for {preset.name} is ω = {paper[0]:g}, interval [{paper[1][0]:g}, {paper[1][1]:g}] "
                "(pass `guidance_scale=` / `guidance_interval=`)."
            )
        if preset.name == "pMF-B/16":
            notes.append(
                "The official PyTorch README evaluates B/16 with its CLI defaults ω = 7.5, interval [0.1, 0.8]; "
                "the setting above is the JAX evaluation config behind the paper's FID."
            )
        context["settings_note"] = " ".join(notes)
        card_data = ModelCardData(
            library_name="diffusers",
            pipeline_tag=PIPELINE_TAG,
            license="mit",
            datasets=[OFFICIAL_DATASET],
            tags=BASE_TAGS + ["imagenet"] + [tag for tag in extra_tags if tag not in BASE_TAGS + ["imagenet"]],
        )
    else:
        missing = [name for name in ("resolution", "num_classes") if context.get(name) is None]
        if missing:
            raise HubPushError(f"a trained-model card needs {' and '.join(missing)} (push_pipeline_to_hub fills them)")
        license_id = str(context.pop("license", None) or "mit").strip()
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license_id):
            raise HubPushError(f"license {license_id!r} is not a Hub license id (e.g. mit, apache-2.0, cc-by-4.0, other)")
        if license_id == "other" and not context.get("license_name"):
            raise HubPushError("license 'other' needs license_name (and license_link)")
        base_model = context.get("base_model")
        if base_model is not None and not looks_like_repo_id(base_model):
            raise HubPushError(f"base_model {base_model!r} is not a Hub repo id ('namespace/name')")
        datasets = _as_list(context.pop("datasets", None))
        if not datasets and looks_like_repo_id(context.get("dataset") or ""):
            datasets = [context["dataset"]]
        if context.get("dataset") is None and datasets:
            context["dataset"] = ", ".join(datasets)
        context.setdefault("title", str(context["repo_id"]).split("/")[-1])
        context.setdefault("example_class", 0)
        context.setdefault("guidance_scale", 1.0)
        context.setdefault("guidance_interval", [0.0, 1.0])
        context.setdefault("noise_scale", 1.0)
        context.setdefault("training_steps", None)
        recipe = context.pop("recipe", None)
        if recipe is not None and not isinstance(recipe, dict):
            raise HubPushError(f"recipe must be a dict of settings, got {type(recipe).__name__}")
        context["recipe_table"] = markdown_table(recipe) if recipe else ""
        metrics = context.pop("metrics", None)
        context["metrics_table"] = markdown_table(metrics, header=("metric", "value")) if metrics else ""
        if license_id == "other":
            link = context.get("license_link")
            context["license_text"] = f"{context['license_name']}" + (f" ({link})" if link else "")
        else:
            context["license_text"] = f"`{license_id}`"
            if base_model:
                context["license_text"] += f"; check that it is compatible with the license of {base_model}"
            context["license_text"] += "."
        card_data = ModelCardData(
            library_name="diffusers",
            pipeline_tag=PIPELINE_TAG,
            license=license_id,
            license_name=context.get("license_name"),
            license_link=context.get("license_link"),
            datasets=datasets or None,
            base_model=base_model,
            tags=BASE_TAGS + [tag for tag in extra_tags if tag not in BASE_TAGS],
        )
        if base_model:
            card_data.base_model_relation = "adapter" if context.get("adapter_base") else "finetune"
    for key in ("guidance_scale", "noise_scale"):
        context[key] = format(float(context[key]), "g")
    context["guidance_interval"] = [format(float(v), "g") for v in context["guidance_interval"]]
    if isinstance(context.get("num_parameters"), int):
        context["num_parameters"] = _format_count(context["num_parameters"])

    template = TEMPLATE_DIR / f"{kind}.md"
    if not template.is_file():
        raise HubPushError(f"model-card template {template} is missing (broken install of pmf-diffusers)")
    card = ModelCard.from_template(card_data, template_path=str(template), **context)
    content = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"
    return ModelCard(content)


def check_model_card(card) -> None:
    """Offline check of a card's metadata (`ModelCard.validate()` needs the Hub): it parses, and the fields the
    Hub uses for pMF repos are there."""
    from huggingface_hub import ModelCard

    try:
        data = ModelCard(str(card)).data
    except Exception as error:
        raise HubPushError(f"the model card metadata does not parse: {_first_line(error)}") from None
    if data.library_name != "diffusers":
        raise HubPushError(f"the model card must say library_name: diffusers (found {data.library_name!r})")
    if not data.pipeline_tag:
        raise HubPushError("the model card has no pipeline_tag")
    if not data.license:
        raise HubPushError("the model card has no license")
    if "pmf" not in (data.tags or []):
        raise HubPushError("the model card is missing the 'pmf' tag")


def _card_context(pipeline, repo_id: str, card_kind: str | None, card_info: dict | None):
    """The card kind, the official preset (or None) and the `render_model_card` fields, filled from the pipeline."""
    from .official import IMAGENET_SAMPLE_CLASSES, OFFICIAL_NUM_CLASSES, check_preset, match_preset

    info = dict(card_info or {})
    preset = info.pop("preset", None)
    preset = _resolve_preset(preset) if preset else None
    transformer_config = dict(pipeline.transformer.config)
    # A released size has its shapes, its noise scale and the 1000 ImageNet classes.
    matched = match_preset(
        transformer_config,
        noise_scale=pipeline.scheduler.config.noise_scale,
        num_classes=transformer_config["num_classes"],
    )
    training_keys = {"base_model", "recipe", "training_steps", "command", "dataset", "datasets", "metrics", "license"}
    if card_kind is None:
        card_kind = "official" if (preset or matched) and not training_keys & set(info) else "trained"
    if card_kind not in CARD_KINDS:
        raise HubPushError(f"unknown card kind {card_kind!r}: choose 'official' or 'trained'")
    if card_kind == "official":
        preset = preset or matched
        if preset is None:
            raise HubPushError(
                "card kind 'official' needs a released size: the pipeline matches none of pMF-B/16 … pMF-H/32; "
                "pass card_info={'preset': 'pMF-B/16'} or use card kind 'trained'"
            )
        try:
            check_preset(transformer_config, preset)
        except ValueError as error:
            raise HubPushError(f"card kind 'official' does not fit this pipeline: {_first_line(error)}") from None
    else:
        preset = None

    transformer, id2label = pipeline.transformer, pipeline.id2label
    fields = {
        "repo_id": repo_id,
        "resolution": transformer.config.sample_size,
        "patch_size": transformer.config.patch_size,
        "num_classes": transformer.config.num_classes,
        "num_parameters": sum(p.numel() for p in transformer.parameters()),
        "guidance_scale": pipeline.config.default_guidance_scale,
        "guidance_interval": list(pipeline.config.default_guidance_interval),
        "noise_scale": pipeline.scheduler.config.noise_scale,
    }
    example_class = IMAGENET_SAMPLE_CLASSES[0] if transformer.config.num_classes >= OFFICIAL_NUM_CLASSES else 0
    fields["example_class"] = example_class
    fields["example_label"] = _class_name(id2label, example_class)
    if preset is not None:
        fields["preset"] = preset
    fields.update(info)  # explicit card_info wins
    return card_kind, preset, fields


def _sample_labels_text(pipeline, labels: list[int]) -> str:
    return ", ".join(
        f"{name} ({label})" if (name := _class_name(pipeline.id2label, label)) else str(label) for label in labels
    )


# ---------------------------------------------------------------------------------------------------- push


def push_pipeline_to_hub(
    pipeline_or_folder,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    card_kind: str | None = None,
    card_info: dict | None = None,
    sample_grid: bool = True,
    dry_run: bool = False,
    endpoint: str | None = None,
    staging_dir: str | Path | None = None,
) -> PushResult:
    """Publish a `PMFPipeline` (object or saved folder) to the Hub repo `repo_id`.

    Args:
        pipeline_or_folder: A `PMFPipeline`, or the folder `save_pretrained` wrote.
        repo_id: `namespace/name`.
        private: Create the repo private (ignored when the repo exists; `None` follows the namespace default).
        token: A Hub token; by default huggingface_hub's usual sources (`HF_TOKEN`, `hf auth login`). Never
            printed or written anywhere.
        revision: Branch to push to; created from `main` when it does not exist.
        create_pr: Open a pull request against `main` instead of committing to it.
        commit_message: Defaults to a message naming the card kind and the package version.
        card_kind: `"official"` (converted released weights), `"trained"`, or `None` to decide: official when the
            pipeline has the shapes and noise scale of a released size and `card_info` holds no training fields.
        card_info: Extra `render_model_card` fields (`preset`, `dataset`, `training_steps`, `recipe`, `command`,
            `base_model`, `license`, `metrics`, `title`, `description`, ...).
        sample_grid: Render `samples.png` (one step, fixed seeds) and show it in the card.
        dry_run: Stage everything and report the files, but send nothing. No token is needed; when one is
            available, the files are checked for it as a real push would.
        endpoint: Hub endpoint; defaults to `HF_ENDPOINT` (read at call time), else https://huggingface.co.
        staging_dir: Stage into this (new or empty) folder and keep it, e.g. to inspect a dry run.

    Returns:
        A `PushResult` listing the files (and, after a real push, the repo, commit and pull-request URLs).
    """
    from . import __version__

    repo_id = check_repo_id(repo_id)
    if card_kind is not None and card_kind not in CARD_KINDS:
        raise HubPushError(f"unknown card kind {card_kind!r}: choose 'official' or 'trained'")
    if revision is not None and (not revision.strip() or any(ch.isspace() for ch in revision)):
        raise HubPushError(f"invalid revision {revision!r}")
    if create_pr and revision not in (None, "main"):
        raise HubPushError("a pull request is opened against main: drop the revision, or push to the branch without create_pr")
    endpoint, token = _push_endpoint_and_token(endpoint, token, dry_run=dry_run)

    pipeline, folder = _pipeline_and_folder(pipeline_or_folder)
    kind, preset, fields = _card_context(pipeline, repo_id, card_kind, card_info)

    with contextlib.ExitStack() as stack:
        stage = _staging_folder(staging_dir, stack, prefix="pmf-push-")
        skipped = _stage_pipeline(pipeline, folder, stage)
        _stage_card_and_samples(pipeline, stage, kind, fields, sample_grid)
        files = _list_files(stage)
        check_no_token_in_files(stage, files, token)
        result = PushResult(
            repo_id=repo_id, files=files, card_kind=kind, dry_run=dry_run, revision=revision, create_pr=create_pr,
            preset=preset.name if preset else None, skipped=skipped,
        )
        if not dry_run:
            _upload(
                stage, result, endpoint=endpoint, token=token, private=private,
                commit_message=commit_message or f"Upload pMF pipeline ({kind}) with pmf-diffusers {__version__}",
            )
        return result


def _stage_card_and_samples(pipeline, stage: Path, kind: str, fields: dict, sample_grid: bool) -> None:
    """Write the sample grid (optional) and the model card into `stage`."""
    if sample_grid:
        labels = default_sample_classes(pipeline)
        render_sample_grid(pipeline, labels).save(stage / SAMPLES_FILENAME)
        fields.setdefault("sample_grid", SAMPLES_FILENAME)
        fields.setdefault("sample_labels", _sample_labels_text(pipeline, labels))
        fields.setdefault("sample_seeds", f"{SAMPLE_SEED}…{SAMPLE_SEED + len(labels) - 1} (image i uses seed {SAMPLE_SEED} + i)")
    card = render_model_card(kind, **fields)
    check_model_card(card)
    card.save(stage / CARD_FILENAME)


def _upload(stage: Path, result: PushResult, *, endpoint, token, private, commit_message, delete_patterns=None) -> None:
    """Create the repo (and branch) and upload `stage` in one commit (which also deletes the repo's files matching
    `delete_patterns` that `stage` does not hold); fills the URLs of `result`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, revision = result.repo_id, result.revision
    # A model repo is created with the client's defaults (no repo type sent); a Space with its SDK.
    repo_type = result.repo_type if result.repo_type != "model" else None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        result.repo_url = str(
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, space_sdk=result.space_sdk)
        )
        if revision is not None and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=stage, revision=revision, create_pr=result.create_pr,
            commit_message=commit_message, repo_type=repo_type, delete_patterns=delete_patterns,
        )
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " (is the token valid and allowed to write there? check `hf auth whoami`)" if status in (401, 403) else ""
        raise HubPushError(f"the Hub refused the push to {repo_id}: {_first_line(error)}{hint}") from error
    except (OSError, RuntimeError) as error:
        raise HubPushError(f"the push to {repo_id} failed: {type(error).__name__}: {_first_line(error)}") from error
    except Exception as error:
        if type(error).__module__.split(".")[0] not in ("httpx", "httpx2", "huggingface_hub"):
            raise
        raise HubPushError(f"the push to {repo_id} failed: {type(error).__name__}: {_first_line(error)}") from error
    result.commit_url = commit.commit_url
    result.pr_url = commit.pr_url


def push_adapter_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a LoRA adapter folder as it is (adapter files, `README.md` card, `samples.png`; what
    `examples/train_pmf.py --lora_rank` writes), with the safeguards of [`push_pipeline_to_hub`]: repo-id check,
    offline mode refused, token from huggingface_hub's usual sources (never printed), no file holding the token
    uploaded, Hub errors as one-line [`HubPushError`]s."""
    from . import __version__

    repo_id = check_repo_id(repo_id)
    endpoint, token = _push_endpoint_and_token(endpoint, token, dry_run=False, dry_run_hint="")
    folder = Path(folder)
    files = _list_files(folder)
    check_no_token_in_files(folder, files, token)
    result = PushResult(repo_id=repo_id, files=files, card_kind="adapter", dry_run=False)
    _upload(str(folder), result, endpoint=endpoint, token=token, private=private,
            commit_message=commit_message or f"Upload pMF LoRA adapter with pmf-diffusers {__version__}")
    return result


# ---------------------------------------------------------------------------------------------------- Spaces

SPACE_APP_DIRNAME = "spaces_app"  # the Gradio app of a source checkout
REQUIREMENTS_FILENAME = "requirements.txt"
DISTRIBUTION_NAME = "pmf-diffusers"
PACKAGE_NAME = "pmf_diffusers"
# Files of the app folder that are never uploaded (`requirements.txt` is regenerated).
SPACE_IGNORED = ("__pycache__", "*.pyc", ".*", "flagged", REQUIREMENTS_FILENAME)


def source_checkout() -> Path | None:
    """The source checkout this package is imported from (an editable install of the repository), or None."""
    import tomllib

    root = Path(__file__).resolve().parents[2]  # src/pmf_diffusers/hub.py -> the repository root
    try:
        name = tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return None
    return root if name == DISTRIBUTION_NAME else None


def build_wheel(project_dir: str | Path, wheel_dir: str | Path) -> Path:
    """Build the pmf-diffusers wheel of a source checkout into `wheel_dir` and return its path.

    Runs `pip wheel --no-deps` on a clean copy of the sources (pip builds in place and would leave `build/` and
    `*.egg-info` in the checkout); with setuptools installed it builds without network (`--no-build-isolation
    --no-index`), otherwise pip fetches the build backend from the index.
    """
    import importlib.util
    import subprocess
    import sys

    project_dir, wheel_dir = Path(project_dir), Path(wheel_dir)
    if not (project_dir / "pyproject.toml").is_file():
        raise HubPushError(f"{project_dir} is not a source checkout of pmf-diffusers: no pyproject.toml")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pmf-wheel-") as tmp:
        source = Path(tmp) / "source"
        # The project uses the src layout: pyproject.toml, its readme/license and src/ are all a build reads.
        shutil.copytree(
            project_dir / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        )
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (project_dir / name).is_file():
                shutil.copyfile(project_dir / name, source / name)
        offline = importlib.util.find_spec("setuptools") is not None
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheel_dir)]
        command += ["--no-build-isolation", "--no-index"] if offline else []
        completed = subprocess.run([*command, str(source)], capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob(f"{PACKAGE_NAME}-*.whl"))
    if completed.returncode != 0 or not wheels:
        output = (completed.stderr or completed.stdout).strip().splitlines()
        reason = output[-1] if output else f"pip exited with {completed.returncode}"
        raise HubPushError(
            f"building the pmf-diffusers wheel failed: {reason} (build it with `pip wheel --no-deps -w dist .` and "
            "pass it as `wheel`)"
        )
    return wheels[-1]


def _unpack_wheel(wheel: Path, stage: Path):
    """Unpack a pmf-diffusers wheel into `stage` (the package and its `.dist-info`); returns its METADATA and the
    name of the `.dist-info` folder."""
    import email.parser
    import zipfile
    from pathlib import PurePosixPath

    if not (wheel.is_file() and wheel.name.startswith(f"{PACKAGE_NAME}-") and wheel.suffix == ".whl"):
        raise HubPushError(f"{wheel} is not a pmf-diffusers wheel (expected a file {PACKAGE_NAME}-VERSION-....whl)")
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            for name in names:
                parts = PurePosixPath(name).parts
                top = parts[0] if parts else ""
                ours = top == PACKAGE_NAME or (top.startswith(f"{PACKAGE_NAME}-") and top.endswith(".dist-info"))
                if name.startswith("/") or ".." in parts or not ours:
                    raise HubPushError(f"{wheel.name} is not a pmf-diffusers wheel: it holds {name!r}")
            metadata_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
            if metadata_name is None:
                raise HubPushError(f"{wheel.name} is not a pmf-diffusers wheel: no .dist-info/METADATA")
            archive.extractall(stage)
            metadata = email.parser.BytesParser().parsebytes(archive.read(metadata_name))
            return metadata, metadata_name.split("/", 1)[0]
    except zipfile.BadZipFile as error:
        raise HubPushError(f"{wheel} is not a wheel: {_first_line(error)}") from None


def space_requirements(metadata) -> str:
    """`requirements.txt` of a Space running the unpacked package: its runtime dependencies (`Requires-Dist` without
    extras), read from the wheel's METADATA, so the list has one home (pyproject.toml)."""
    from packaging.requirements import Requirement

    version = metadata["Version"]
    lines = [
        f"# Written by `pmf push-space` from the metadata of {DISTRIBUTION_NAME} {version}: its runtime dependencies.",
        f"# The package itself is not on the package index; its wheel is unpacked next to app.py ({PACKAGE_NAME}/),",
        "# where `python app.py` imports it. Gradio comes from `sdk_version` in README.md.",
    ]
    for text in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(text)
        if requirement.marker is None or "extra" not in str(requirement.marker):
            lines.append(str(requirement))
    return "\n".join(lines) + "\n"


def _space_sdk(readme: Path, stage: Path) -> str:
    """The SDK of a Space README's YAML header; checks that its `app_file` is staged."""
    from huggingface_hub import SpaceCard, constants

    if not readme.is_file():
        raise HubPushError(f"the Space app has no README.md (the Space configuration): {readme} is missing")
    try:
        data = SpaceCard(readme.read_text()).data
    except Exception as error:
        raise HubPushError(f"the YAML header of {readme} does not parse: {_first_line(error)}") from None
    sdk = data.get("sdk")
    if sdk not in constants.SPACES_SDK_TYPES:
        sdks = ", ".join(constants.SPACES_SDK_TYPES)
        raise HubPushError(f"{readme} must set `sdk:` to one of {sdks} (found {sdk!r})")
    app_file = data.get("app_file")
    if sdk != "static" and not (app_file and (stage / app_file).is_file()):
        raise HubPushError(f"{readme} names app_file {app_file!r}, which is not in the Space app folder")
    return sdk


def push_space_to_hub(
    repo_id: str,
    *,
    app_dir: str | Path | None = None,
    wheel: str | Path | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
    staging_dir: str | Path | None = None,
) -> PushResult:
    """Publish the Gradio app (`spaces_app/` of the source checkout) to the Space `repo_id`, with the package inside.

    pmf-diffusers is not on the package index, so the Space carries it: the package is built as a wheel (or `wheel`
    is used) and unpacked next to `app.py` (`pmf_diffusers/` and its `.dist-info`), which `python app.py` imports;
    `requirements.txt` is written from the wheel's runtime dependencies. The Space README (its YAML configuration)
    and the app files are uploaded as they are. Everything is staged in a folder and uploaded in one commit.

    Args:
        repo_id: `namespace/name` of the Space (created with the README's SDK when it does not exist).
        app_dir: The app folder; defaults to `spaces_app/` of the checkout this package is imported from.
        wheel: A built pmf-diffusers wheel to ship; by default one is built from the checkout ([`build_wheel`]).
        private: Create the Space private (ignored when it exists).
        token: A Hub token; by default huggingface_hub's usual sources. Never printed or uploaded.
        commit_message: Defaults to a message naming the package version.
        dry_run: Stage everything and report the files, but send nothing (the files are still checked for a token).
        endpoint: Hub endpoint; defaults to `HF_ENDPOINT` (read at call time), else https://huggingface.co.
        staging_dir: Stage into this (new or empty) folder and keep it, e.g. to inspect a dry run.
    """
    repo_id = check_repo_id(repo_id)
    endpoint, token = _push_endpoint_and_token(endpoint, token, dry_run=dry_run)
    checkout = source_checkout()
    if app_dir is None:
        if checkout is None:
            raise HubPushError(
                f"no Space app given and pmf_diffusers is not imported from a source checkout: pass the app folder "
                f"({SPACE_APP_DIRNAME}/ of a clone of the repository)"
            )
        app_dir = checkout / SPACE_APP_DIRNAME
    app_dir = Path(app_dir)
    if not app_dir.is_dir():
        raise HubPushError(f"the Space app folder {app_dir} does not exist")
    if wheel is None and checkout is None:
        raise HubPushError(
            "pmf_diffusers is not imported from a source checkout: pass a built wheel as `wheel`"
        )

    with contextlib.ExitStack() as stack:
        stage = _staging_folder(staging_dir, stack, prefix="pmf-space-")
        shutil.copytree(app_dir, stage, ignore=shutil.ignore_patterns(*SPACE_IGNORED), dirs_exist_ok=True)
        sdk = _space_sdk(stage / CARD_FILENAME, stage)
        if wheel is None:
            wheel = build_wheel(checkout, stack.enter_context(tempfile.TemporaryDirectory(prefix="pmf-wheel-")))
        metadata, dist_info = _unpack_wheel(Path(wheel), stage)
        (stage / REQUIREMENTS_FILENAME).write_text(space_requirements(metadata))
        files = _list_files(stage)
        check_no_token_in_files(stage, files, token)
        result = PushResult(
            repo_id=repo_id, files=files, card_kind="space", dry_run=dry_run, repo_type="space", space_sdk=sdk,
            grouped=(PACKAGE_NAME, dist_info),
        )
        if not dry_run:
            version = metadata["Version"]
            _upload(
                stage, result, endpoint=endpoint, token=token, private=private,
                commit_message=commit_message or f"Publish the pMF Space with {DISTRIBUTION_NAME} {version}",
                # The package of an earlier push goes: no stale module or second .dist-info next to the new one.
                delete_patterns=[f"{PACKAGE_NAME}/*", f"{PACKAGE_NAME}-*.dist-info/*"],
            )
        return result
