# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Gradio Space: one-step, class-conditional, pixel-space image generation with pixel MeanFlow (pMF).

Run locally with `python spaces_app/app.py` (or `build_demo().launch()`). The bundled models — toy shapes (10 classes of
coloured shapes, 32×32, the default) and handwritten digits (real, 10 classes, 32×32) — work offline; the official ImageNet sizes (`pMF-B/16` … `pMF-H/32`) are offered when the Hub is
reachable or their converted folders are already cached, and are downloaded and converted once on first use.

API (e.g. through `gradio_client.Client(url)`):
* `/generate(classes, seed, randomize_seed, guidance_scale, guidance_min, guidance_max, num_steps, images_per_class,
  model)` → (gallery, grid PNG, timing text, seed used). Every argument is checked on the server; a bad request raises
  a `gr.Error` whose message says what to change.
* `/load_model(model, active_model)` → (status, active model, …): loads (or reuses) a model; on failure the status
  says why and the active model stays the previous one.
"""

from __future__ import annotations

import gc
import math
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import gradio as gr
import torch

from pmf_diffusers import PMFPipeline, load_imagenet_id2label
from pmf_diffusers.bundled import BUNDLED_MODEL_TITLES, BUNDLED_MODELS, DEFAULT_BUNDLED_MODEL, bundled_model_names
from pmf_diffusers.image_grid import image_grid
from pmf_diffusers.loading import (
    BUNDLED,
    converted_official_folder,
    hub_offline,
    is_official_size_name,
    load_pipeline,
    looks_like_repo_id,
)
from pmf_diffusers.official import IMAGENET_SAMPLE_CLASSES, OFFICIAL_NUM_CLASSES, OFFICIAL_PRESETS, OFFICIAL_REPO_ID
from pmf_diffusers.pipelines.pipeline_pmf import check_guidance_settings

try:  # ZeroGPU: `@spaces.GPU` attaches a GPU slice for the duration of the call; a no-op elsewhere.
    import spaces

    GPU = spaces.GPU
except ImportError:  # local runs and CI do not need the `spaces` package

    def GPU(fn=None, **_kwargs):
        return fn if fn is not None else (lambda inner: inner)


# --- request limits (checked on the server inside `generate`, not only by the sliders) ---
MAX_CLASSES = 8
MAX_IMAGES_PER_CLASS = 4
MAX_STEPS = 4
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 20.0  # the slider's range; ω ≥ 1 is the pipeline's rule (check_guidance_settings)
MAX_SEED = 2**31 - 1
GRID_MIN_TILE = 128  # small models (32×32) are upscaled (nearest) in the downloadable grid so they stay visible
# Generated PNGs (gallery images and grids) kept on disk for the browser and API clients to fetch; the oldest
# requests' files are deleted first. A full request (32 images and their grid) of a 256×256 model is ~10 MB.
MAX_OUTPUT_BYTES = 256 * 1024**2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Example rows for the official sizes: the classes the official evaluation samples (golden retriever, otter, …).
OFFICIAL_EXAMPLE_IDS = [
    IMAGENET_SAMPLE_CLASSES[:1],
    IMAGENET_SAMPLE_CLASSES[1:3],
    IMAGENET_SAMPLE_CLASSES[3:5],
    IMAGENET_SAMPLE_CLASSES[:5],
]
CSS = "#gallery img { image-rendering: pixelated; }"  # crisp upscaling of the 32×32 toy samples

ModelSource = str | os.PathLike | Callable[[], PMFPipeline]


class GenerateRequestError(gr.Error):
    """A request outside the Space's limits (shown in the UI and returned to API clients; no server traceback)."""

    def __init__(self, message: str):
        super().__init__(message, print_exception=False)


def _official_converted(name: str) -> bool:
    return (converted_official_folder(name) / "model_index.json").is_file()


def _official_cached(name: str) -> bool:
    """Whether an official size loads without the Hub: converted already, or its checkpoint is downloaded."""
    if _official_converted(name):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(OFFICIAL_REPO_ID, OFFICIAL_PRESETS[name].filename), str)
    except Exception:
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hub endpoint accepts a TCP connection (False at once in offline mode, `HF_HUB_OFFLINE`)."""
    if hub_offline():
        return False
    try:
        from urllib.parse import urlparse

        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except Exception:  # noqa: BLE001 — DNS failure, refused, timeout: offline
        return False


def default_models() -> dict[str, ModelSource]:
    """The bundled models (the default one as "bundled", then e.g. "digits"), plus the official sizes that can be
    loaded here: all of them when the Hub is reachable, else only those already cached (converted folder or
    downloaded checkpoint)."""
    models: dict[str, ModelSource] = {BUNDLED: BUNDLED}
    models.update({name: name for name in bundled_model_names() if name != DEFAULT_BUNDLED_MODEL})
    online = hub_reachable()
    for name in OFFICIAL_PRESETS:
        if online or _official_cached(name):
            models[name] = name
    return models


class ModelRegistry:
    """Thread-safe, shared cache of loaded pipelines (the bundled model stays; at most `max_loaded` others)."""

    def __init__(self, sources: Mapping[str, ModelSource], max_loaded: int = 2):
        self.sources = dict(sources)
        self.max_loaded = max_loaded
        self._pipes: OrderedDict[str, PMFPipeline] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {name: threading.Lock() for name in self.sources}

    def label(self, name: str) -> str:
        bundled_name = DEFAULT_BUNDLED_MODEL if name == BUNDLED else name
        if bundled_name in BUNDLED_MODELS:
            return f"{BUNDLED_MODEL_TITLES[bundled_name]} — bundled ({BUNDLED_MODELS[bundled_name]}, offline)"
        if name in OFFICIAL_PRESETS:
            preset = OFFICIAL_PRESETS[name]
            size = preset.sample_size
            return f"{name} — ImageNet {size}×{size} (FID {preset.fid:g}; downloaded + converted on first use)"
        return name

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._pipes

    def is_local(self, name: str) -> bool:
        """Loadable without a download (so `generate` may load it on demand)."""
        source = self.sources[name]
        if callable(source) or source == BUNDLED or source in bundled_model_names():
            return True
        if is_official_size_name(source):
            return _official_converted(source)
        return not looks_like_repo_id(source)  # a local folder

    def peek(self, name: str) -> PMFPipeline | None:
        """The loaded pipeline without taking a lock (safe in a forked ZeroGPU worker)."""
        return self._pipes.get(name)

    def get(self, name: str) -> PMFPipeline:
        """The pipeline for `name`, loading it on first use; raises with the reason when it cannot be loaded."""
        if name not in self.sources:
            raise KeyError(f"Unknown model {name!r}; choose one of: {', '.join(self.sources)}.")
        with self._lock:
            if name in self._pipes:
                self._pipes.move_to_end(name)
                return self._pipes[name]
        with self._load_locks[name]:  # two sessions asking for the same model wait for one load
            with self._lock:
                if name in self._pipes:
                    return self._pipes[name]
            pipe = self._load(name)
            with self._lock:
                self._pipes[name] = pipe
                evictable = [key for key in self._pipes if key != BUNDLED and key != name]
                while len(self._pipes) - (BUNDLED in self._pipes) > self.max_loaded and evictable:
                    del self._pipes[evictable.pop(0)]
            gc.collect()
            return pipe

    def _load(self, name: str) -> PMFPipeline:
        source = self.sources[name]
        pipe = source() if callable(source) else load_pipeline(source)
        if not isinstance(pipe, PMFPipeline):
            raise TypeError(f"{name!r} did not load as a PMFPipeline (got {type(pipe).__name__}).")
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.eval()
        return pipe.to(DEVICE)  # on ZeroGPU `spaces` defers the move until a GPU slice is attached


# --- class choices ---
def class_choices(pipe: PMFPipeline) -> list[str]:
    return [f"{class_id}: {names}" for class_id, names in sorted(pipe.id2label.items())] or [
        str(class_id) for class_id in range(pipe.num_classes)
    ]


def _example_label(choices: list[str], seed: int) -> str:
    names = [choice.split(":", 1)[-1].split(",")[0].strip() for choice in choices]
    return f"{' + '.join(names) if len(names) <= 3 else f'{len(names)} classes'} (seed {seed})"


def toy_example_rows(pipe: PMFPipeline) -> tuple[list[list], list[str]]:
    """Examples for a small model: a few single classes, then several at once (inputs: classes, seed, randomize)."""
    choices = class_choices(pipe)
    rows = [[[choice], 0] for choice in choices[:3]] + [[choices[: min(MAX_CLASSES, 6)], 1]]
    return [[classes, seed, False] for classes, seed in rows], [_example_label(c, seed) for c, seed in rows]


def official_example_rows() -> tuple[list[list], list[str]]:
    """Classic ImageNet classes for the official sizes (those the official evaluation samples: golden retriever,
    otter, red panda, …)."""
    id2label = load_imagenet_id2label()
    rows = [([f"{i}: {id2label[i]}" for i in ids], seed) for seed, ids in enumerate(OFFICIAL_EXAMPLE_IDS)]
    return [[classes, seed, False] for classes, seed in rows], [_example_label(c, seed) for c, seed in rows]


def default_classes(pipe: PMFPipeline) -> list[str]:
    choices = class_choices(pipe)
    if pipe.num_classes == OFFICIAL_NUM_CLASSES and pipe.id2label:
        return [choices[i] for i in IMAGENET_SAMPLE_CLASSES[:3]]
    return choices[: min(4, len(choices))]


_CHOICE = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")


def parse_classes(classes, pipe: PMFPipeline, model: str) -> list[int]:
    """Dropdown values ("207: golden retriever"), bare ids ("207" or 207) or names → class ids, with clear errors."""
    if classes is None or classes == "" or classes == []:
        raise GenerateRequestError("No class selected: pick at least one class (by name or index) and try again.")
    if isinstance(classes, (str, int)) and not isinstance(classes, bool):
        classes = [classes]
    if not isinstance(classes, (list, tuple)):
        raise GenerateRequestError(f"`classes` must be a list of class names or ids, got {type(classes).__name__}.")
    classes = [item for item in classes if not (isinstance(item, str) and not item.strip())]
    if not classes:
        raise GenerateRequestError("No class selected: pick at least one class (by name or index) and try again.")
    if len(classes) > MAX_CLASSES:
        raise GenerateRequestError(f"Too many classes ({len(classes)}): at most {MAX_CLASSES} per request.")
    ids = []
    for item in classes:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise GenerateRequestError(f"Class {item!r} is neither a class name nor an id.")
        if isinstance(item, float):
            if not item.is_integer():
                raise GenerateRequestError(f"Class id {item!r} is not an integer.")
            item = int(item)
        match = _CHOICE.match(item) if isinstance(item, str) else None
        try:
            if match:  # "id: name" from the dropdown — the id decides, the name must belong to it
                class_id = pipe.get_label_ids(int(match.group(1)))[0]
                expected = pipe.id2label.get(class_id, "")
                if match.group(2) and expected and match.group(2).lower() != expected.lower():
                    raise ValueError(
                        f"class {class_id} of this model is {expected!r}, not {match.group(2)!r} "
                        "(was it chosen for another model?)"
                    )
            else:
                class_id = pipe.get_label_ids(item)[0]
        except (ValueError, TypeError) as error:
            raise GenerateRequestError(f"Unknown class {item!r} for model {model}: {error}") from None
        ids.append(class_id)
    return ids


def _number(value, name: str, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GenerateRequestError(f"`{name}` must be a finite number, got {value!r}.")
    if integer:
        if not float(value).is_integer():
            raise GenerateRequestError(f"`{name}` must be a whole number, got {value!r}.")
        return int(value)
    return float(value)


def _passes(check: Callable, **kwargs) -> bool:
    """Whether `check(**kwargs)` accepts the values (it raises ValueError otherwise)."""
    try:
        check(**kwargs)
    except ValueError:
        return False
    return True


def validate_request(seed, randomize_seed, guidance_scale, guidance_min, guidance_max, num_steps, images_per_class):
    """Server-side limits; returns normalised values or raises `gr.Error` naming the offending argument."""
    if not isinstance(randomize_seed, bool):
        raise GenerateRequestError(f"`randomize_seed` must be true or false, got {randomize_seed!r}.")
    if randomize_seed:
        seed = random.randint(0, MAX_SEED)
    seed = _number(seed, "seed", integer=True)
    if not 0 <= seed <= MAX_SEED:
        raise GenerateRequestError(f"`seed` must be between 0 and {MAX_SEED}, got {seed}.")
    num_steps = _number(num_steps, "num_steps", integer=True)
    if not 1 <= num_steps <= MAX_STEPS:
        raise GenerateRequestError(f"`num_steps` must be 1 to {MAX_STEPS} (pMF is a one-step model), got {num_steps}.")
    images_per_class = _number(images_per_class, "images_per_class", integer=True)
    if not 1 <= images_per_class <= MAX_IMAGES_PER_CLASS:
        raise GenerateRequestError(
            f"`images_per_class` must be 1 to {MAX_IMAGES_PER_CLASS}, got {images_per_class}."
        )
    # The pipeline's rules (check_guidance_settings), plus the Space's upper limit on ω; the messages name the
    # request's arguments.
    guidance_scale = _number(guidance_scale, "guidance_scale")
    if guidance_scale > MAX_GUIDANCE or not _passes(check_guidance_settings, guidance_scale=guidance_scale):
        raise GenerateRequestError(
            f"`guidance_scale` (ω) must be between {MIN_GUIDANCE:g} (no guidance) and {MAX_GUIDANCE:g}, "
            f"got {guidance_scale:g}."
        )
    guidance_interval = (_number(guidance_min, "guidance_min"), _number(guidance_max, "guidance_max"))
    if not _passes(check_guidance_settings, guidance_interval=guidance_interval):
        raise GenerateRequestError(
            "The guidance interval must lie within [0, 1] with t_min ≤ t_max (`guidance_min` ≤ `guidance_max`), "
            "got [{:g}, {:g}].".format(*guidance_interval)
        )
    return seed, guidance_scale, guidance_interval, num_steps, images_per_class


class OutputStore:
    """The Space's generated files, capped at `max_bytes` on disk.

    Each request's gallery images and grid go into one sub-folder of a per-process folder inside Gradio's cache
    (`GRADIO_TEMP_DIR`); Gradio serves files that already lie in its cache in place, without a second copy. After
    each request the oldest requests' folders are deleted until the total fits `max_bytes` (the newest request is
    always kept, even if it alone is larger). The folder is removed when the demo is garbage-collected or the
    process exits. Gradio's own `delete_cache=(frequency, age)` deletes by age only, which bounds nothing under a
    burst of requests.
    """

    def __init__(self, max_bytes: int = MAX_OUTPUT_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        from gradio.utils import get_upload_folder  # the cache folder Gradio's components serve from

        parent = Path(get_upload_folder())
        parent.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix="pmf_space_", dir=parent))
        self.max_bytes = max_bytes
        self._sizes: OrderedDict[Path, int] = OrderedDict()  # request folder -> bytes, oldest first
        self._count = 0
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def save(self, images, grid, stem: str) -> tuple[list[str], str]:
        """Write the images and the grid as PNGs; returns (image paths, grid path)."""
        with self._lock:
            self._count += 1
            folder = self.directory / f"{self._count:08d}"
        folder.mkdir()
        paths = []
        for index, image in enumerate(images):
            paths.append(folder / f"{index:02d}.png")
            image.save(paths[-1], format="PNG")
        grid_path = folder / f"{stem}.png"
        grid.save(grid_path, format="PNG")
        size = sum(path.stat().st_size for path in (*paths, grid_path))
        with self._lock:
            self._sizes[folder] = size
            while self.total_bytes > self.max_bytes and len(self._sizes) > 1:
                oldest = next(iter(self._sizes))
                if oldest == folder:
                    break
                del self._sizes[oldest]
                shutil.rmtree(oldest, ignore_errors=True)
        return [str(path) for path in paths], str(grid_path)


_REGISTRIES: dict[int, ModelRegistry] = {}  # module level: a ZeroGPU worker (a fork) finds the loaded pipelines here


@GPU(duration=30)
def run_pipeline(registry_id: int, model: str, labels, seeds, num_steps, guidance_scale, guidance_interval):
    """The only GPU work (`@spaces.GPU` on ZeroGPU). Takes plain, picklable arguments — ZeroGPU ships them to its
    worker — and returns (PIL images, seconds)."""
    registry = _REGISTRIES[registry_id]
    pipe = registry.peek(model) or registry.get(model)
    device = pipe.device
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipe(
        class_labels=labels,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        guidance_interval=guidance_interval,
        generator=generators,
        output_type="pil",
    ).images
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


def build_demo(
    default_model: str = BUNDLED,
    models: Mapping[str, ModelSource] | None = None,
    max_loaded: int = 2,
    registry: ModelRegistry | None = None,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> gr.Blocks:
    """The Space UI. `models` maps a model name to a source of `pmf_diffusers.loading.load_pipeline` ("bundled", an
    official size name, a pipeline folder, a Hub repo id) or a loader callable (default: `default_models()`);
    `default_model` is loaded before the UI is built. Pass `registry` instead of `models` / `max_loaded` to serve
    the pipelines of an existing [`ModelRegistry`] (e.g. one shared by several demos). Generated files take at most
    `max_output_bytes` of disk (see [`OutputStore`])."""
    if registry is None:
        registry = ModelRegistry(models if models is not None else default_models(), max_loaded=max_loaded)
    elif models is not None:
        raise ValueError("Pass either `models` or `registry`, not both.")
    if default_model not in registry.sources:
        raise ValueError(f"default_model {default_model!r} is not one of {list(registry.sources)}.")
    first = registry.get(default_model)
    _REGISTRIES[id(registry)] = registry
    outputs = OutputStore(max_output_bytes)
    is_imagenet = lambda pipe: pipe.num_classes == OFFICIAL_NUM_CLASSES and bool(pipe.id2label)  # noqa: E731

    def model_facts(name: str, pipe: PMFPipeline) -> str:
        config = pipe.transformer.config
        return (
            f"**{name}** on `{DEVICE}`: {pipe.num_classes} classes, {config.sample_size}×{config.sample_size} px, "
            f"recommended ω = {pipe.config.default_guidance_scale:g}, interval "
            f"[{pipe.config.default_guidance_interval[0]:g}, {pipe.config.default_guidance_interval[1]:g}]."
        )

    def generate(
        classes,
        seed,
        randomize_seed,
        guidance_scale,
        guidance_min,
        guidance_max,
        num_steps,
        images_per_class,
        model=default_model,
    ):
        seed, omega, interval, num_steps, per_class = validate_request(
            seed, randomize_seed, guidance_scale, guidance_min, guidance_max, num_steps, images_per_class
        )
        if not isinstance(model, str) or model not in registry.sources:
            raise GenerateRequestError(f"Unknown model {model!r}; choose one of: {', '.join(registry.sources)}.")
        if not registry.is_loaded(model) and not registry.is_local(model):
            raise GenerateRequestError(
                f"{model} is not loaded yet: select it in the Model box (or call /load_model) and wait until it is "
                "ready; the first use downloads and converts it."
            )
        try:
            pipe = registry.get(model)
        except Exception as error:  # noqa: BLE001 — show the reason instead of a generic failure
            raise GenerateRequestError(f"Could not load {model}: {type(error).__name__}: {error}") from None
        ids = parse_classes(classes, pipe, model)
        labels = [class_id for class_id in ids for _ in range(per_class)]
        seeds = [seed + index for index in range(len(labels))]
        try:
            images, seconds = run_pipeline(id(registry), model, labels, seeds, num_steps, omega, interval)
        except Exception as error:  # noqa: BLE001
            raise gr.Error(f"Generation failed: {type(error).__name__}: {error}") from None
        names = {class_id: pipe.id2label.get(class_id, "unconditional").split(",")[0] for class_id in ids}
        image_paths, grid_path = outputs.save(
            images,
            image_grid(images, columns=per_class, min_tile=GRID_MIN_TILE),
            stem=f"pmf_{re.sub(r'[^A-Za-z0-9]+', '-', model)}_seed{seed}",
        )
        gallery = [(path, f"{label}: {names[label]} · seed {s}") for path, label, s in zip(image_paths, labels, seeds)]
        timing = (
            f"{len(images)} image(s) in {seconds:.3f} s → {1000 * seconds / len(images):.1f} ms per image "
            f"({num_steps} step{'s' if num_steps > 1 else ''}, ω = {omega:g}, interval [{interval[0]:g}, "
            f"{interval[1]:g}], {model} on {pipe.device.type}, seed {seed})"
        )
        return gallery, grid_path, timing, seed

    def load_model(name, active):
        """Generator: reports progress while a model loads in the queue; the previous model stays usable."""
        # outputs: status, active model, model dropdown, classes, ω, t_min, t_max, toy examples, official examples
        unchanged = (gr.update(),) * 6

        def failed(message: str):
            gr.Warning(message)
            return (f"**Failed:** {message}\n\nStill using **{active}**.", active, gr.update(value=active), *unchanged)

        if not isinstance(name, str) or name not in registry.sources:
            raise GenerateRequestError(f"Unknown model {name!r}; choose one of: {', '.join(registry.sources)}.")
        if not isinstance(active, str) or active not in registry.sources:
            active = default_model
        if not registry.is_loaded(name):
            yield (
                f"**Loading {name}** … (the first use of an official size downloads and converts it; "
                f"you can keep generating with **{active}** meanwhile)",
                active,
                gr.update(),
                *unchanged,
            )
        start = time.perf_counter()
        try:
            pipe = registry.get(name)
        except Exception as error:  # noqa: BLE001
            yield failed(f"Could not load {name}: {type(error).__name__}: {error}")
            return
        official = is_imagenet(pipe)
        lo, hi = pipe.config.default_guidance_interval
        yield (
            f"**Ready:** {model_facts(name, pipe)} (loaded in {time.perf_counter() - start:.1f} s)",
            name,
            gr.update(value=name),
            gr.update(choices=class_choices(pipe), value=default_classes(pipe)),
            gr.update(value=min(max(pipe.config.default_guidance_scale, MIN_GUIDANCE), MAX_GUIDANCE)),
            gr.update(value=lo),
            gr.update(value=hi),
            gr.update(visible=not official and class_choices(pipe) == toy_choices),  # the examples' classes
            gr.update(visible=official),
        )

    # --- layout ---
    first_lo, first_hi = first.config.default_guidance_interval
    with gr.Blocks(title="pixel MeanFlow (pMF) — one-step image generation") as demo:
        gr.Markdown(
            "# pixel MeanFlow (pMF) — one-step, pixel-space image generation\n"
            "One network evaluation turns noise into an image, with no VAE and no latent space "
            "([paper](https://arxiv.org/abs/2601.22158); the model repos load with diffusers' `DiffusionPipeline` and `trust_remote_code=True`). "
            "Guidance is an input of the network, so ω costs nothing extra. Pick classes by name or index."
        )
        with gr.Row():
            with gr.Column(scale=2):
                model_dd = gr.Dropdown(
                    choices=[(registry.label(name), name) for name in registry.sources],
                    value=default_model,
                    label="Model",
                    interactive=True,
                    filterable=True,
                    elem_id="model",
                )
                status = gr.Markdown(f"**Ready:** {model_facts(default_model, first)}", elem_id="model-status")
                active_model = gr.Textbox(value=default_model, visible=False, label="Active model")
                classes_dd = gr.Dropdown(
                    choices=class_choices(first),
                    value=default_classes(first),
                    multiselect=True,
                    filterable=True,
                    allow_custom_value=True,
                    max_choices=MAX_CLASSES,
                    label=f"Classes (search by name or index; up to {MAX_CLASSES})",
                    elem_id="classes",
                )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    randomize = gr.Checkbox(value=False, label="Randomize seed")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=1, step=1, label="Steps (1 = one-step)")
                    per_class = gr.Slider(1, MAX_IMAGES_PER_CLASS, value=1, step=1, label="Images per class")
                with gr.Accordion("Guidance (recommended values are set per model)", open=True):
                    omega = gr.Slider(
                        MIN_GUIDANCE, MAX_GUIDANCE, step=0.1, label="Guidance scale ω (1 = off)",
                        value=min(max(first.config.default_guidance_scale, MIN_GUIDANCE), MAX_GUIDANCE),
                    )
                    with gr.Row():
                        t_min = gr.Slider(0.0, 1.0, value=first_lo, step=0.05, label="Guidance interval t_min")
                        t_max = gr.Slider(0.0, 1.0, value=first_hi, step=0.05, label="Guidance interval t_max")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                gallery = gr.Gallery(
                    label="Samples", columns=4, height="auto", format="png", elem_id="gallery", interactive=False
                )
                timing = gr.Textbox(label="Time", interactive=False, elem_id="timing")
                grid_file = gr.File(label="Grid (PNG)", interactive=False)

        example_inputs = [classes_dd, seed, randomize]
        first_official = is_imagenet(first)
        toy_pipe = first
        if first_official and BUNDLED in registry.sources:
            try:
                toy_pipe = registry.get(BUNDLED)
            except Exception:  # noqa: BLE001 — no toy examples then
                toy_pipe = None
        # Examples only fill the inputs (not cached: nothing runs at startup, nothing burns ZeroGPU quota).
        toy_choices = class_choices(toy_pipe) if toy_pipe is not None else None
        with gr.Column(visible=not first_official) as toy_examples:
            if toy_pipe is not None and not is_imagenet(toy_pipe):
                rows, labels = toy_example_rows(toy_pipe)
                gr.Examples(rows, example_inputs, example_labels=labels, label="Examples (toy model)")
        with gr.Column(visible=first_official) as official_examples:
            # Labelled buttons: a table would show the ImageNet values only while the ImageNet choices are loaded.
            rows, labels = official_example_rows()
            gr.Examples(rows, example_inputs, example_labels=labels, label="Examples (ImageNet classes)")

        generate_inputs = [classes_dd, seed, randomize, omega, t_min, t_max, steps, per_class, active_model]
        button.click(
            generate,
            generate_inputs,
            [gallery, grid_file, timing, seed],
            api_name="generate",
            preprocess=False,  # raw values reach `generate`, which enforces every limit itself
            concurrency_limit=1,
            concurrency_id="generate",
        )
        model_dd.input(
            load_model,
            [model_dd, active_model],
            [status, active_model, model_dd, classes_dd, omega, t_min, t_max, toy_examples, official_examples],
            api_name="load_model",
            preprocess=False,  # an unknown model name gets our message, not the dropdown's
            concurrency_limit=2,
            concurrency_id="load_model",
            trigger_mode="always_last",
        )

    demo.queue(default_concurrency_limit=1, max_size=32)
    weakref.finalize(demo, shutil.rmtree, outputs.directory, True)  # also runs at interpreter exit
    return demo


if __name__ == "__main__":
    build_demo().launch(css=CSS)
