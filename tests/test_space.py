"""The Gradio Space (`spaces_app/`): launched on 127.0.0.1 and driven through `gradio_client` and headless Chromium.

Uses the real bundled model when it is installed, else a tiny random pipeline with the same shapes (10 classes, 32×32).
The browser tests need Debian's `chromium` (`.ci/run` installs it) and are skipped without it (outside CI; under CI=true a missing browser fails).
"""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# gradio's queue calls a pandas option that pandas 3 deprecates; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces_app"
TOY_NAMES = [
    "red circle", "green square", "blue triangle", "yellow star", "purple ring",
    "orange cross", "cyan diamond", "magenta heart", "white hexagon", "black stripe",
]


def _load(name: str, filename: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SPACE_DIR / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _tiny_pipeline_folder(path: Path) -> Path:
    """A random 10-class 32×32 pMF; weights perturbed so that outputs depend on the noise (zero-init heads would
    give constant images)."""
    from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel

    generator = torch.Generator().manual_seed(0)
    transformer = PMFTransformer2DModel(
        sample_size=32, patch_size=8, num_layers=1, num_head_layers=1, num_attention_heads=2, attention_head_dim=16,
        mlp_hidden_dim=64, bottleneck_dim=16, num_classes=10, with_v_head=False,
    )
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    pipe = PMFPipeline(transformer=transformer, scheduler=PMFScheduler(), id2label=dict(enumerate(TOY_NAMES)))
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bundled_dir(tmp_path_factory, record_testsuite_property):
    """The installed bundled model if there is one (checked without the env override), else a tiny random one."""
    from pmf_diffusers.bundled import bundled_model_path

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PMF_BUNDLED_MODEL_DIR", raising=False)
        try:
            path, kind = bundled_model_path(), "real bundled model"
        except FileNotFoundError:
            path, kind = _tiny_pipeline_folder(tmp_path_factory.mktemp("tiny_pmf")), "tiny random stand-in"
        record_testsuite_property("space_bundled_model", f"{kind}: {path}")
        print(f"\n[test_space] using the {kind} at {path}")
        patch.setenv("PMF_BUNDLED_MODEL_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def broken_dir(bundled_dir, tmp_path_factory) -> Path:
    """A pipeline folder whose transformer weights are truncated: loading it fails with a real loader error."""
    import shutil

    path = tmp_path_factory.mktemp("broken") / "broken-model"
    shutil.copytree(bundled_dir, path)
    for weights in (path / "transformer").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    return path


def _tiny_imagenet_pipeline():
    """A random 1000-class model with the ImageNet names and official-style guidance defaults (built in memory)."""
    from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel, load_imagenet_id2label

    torch.manual_seed(0)
    transformer = PMFTransformer2DModel(
        sample_size=16, patch_size=8, num_layers=1, num_head_layers=1, num_attention_heads=2, attention_head_dim=8,
        mlp_hidden_dim=32, bottleneck_dim=8, num_classes=1000, frequency_embedding_dim=16, with_v_head=False,
    )
    return PMFPipeline(
        transformer, PMFScheduler(), id2label=load_imagenet_id2label(),
        default_guidance_scale=8.5, default_guidance_interval=(0.1, 0.7),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def registry(bundled_dir, broken_dir):
    """The Space's model registry: the bundled model, a model that cannot load, an official size and a small
    ImageNet-shaped model built in memory."""
    app = _load("pmf_space_app", "app.py")
    return app.ModelRegistry(
        {
            "bundled": "bundled",
            "broken": str(broken_dir),
            "pMF-B/16": "pMF-B/16",
            "imagenet-tiny": _tiny_imagenet_pipeline,
        }
    )


@pytest.fixture(scope="module")
def space(registry, tmp_path_factory):
    """(app module, demo, url, client) for the Space serving `registry`, with an empty HF_HOME so that the official
    size is not converted yet."""
    from gradio_client import Client
    from huggingface_hub import constants

    app = _load("pmf_space_app", "app.py")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HOME", str(tmp_path_factory.mktemp("hf_home")))  # read by default_cache_dir()
        demo = app.build_demo(registry=registry)
        _, url, _ = demo.launch(
            server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True, css=app.CSS
        )
        try:
            yield app, demo, url, Client(url, verbose=False)
        finally:
            demo.close()


@pytest.fixture(scope="module")
def pipe(space, registry):
    return registry.get("bundled")


@pytest.fixture
def server_calls(space, monkeypatch):
    """Counts the Space's server-side work: `generate` requests (each starts with `validate_request`) and the
    images `run_pipeline` made."""
    app, *_ = space
    counts = {"generate_calls": 0, "images": 0}
    validate_request, run_pipeline = app.validate_request, app.run_pipeline

    def counting_validate_request(*args, **kwargs):
        counts["generate_calls"] += 1
        return validate_request(*args, **kwargs)

    def counting_run_pipeline(*args, **kwargs):
        images, seconds = run_pipeline(*args, **kwargs)
        counts["images"] += len(images)
        return images, seconds

    monkeypatch.setattr(app, "validate_request", counting_validate_request)
    monkeypatch.setattr(app, "run_pipeline", counting_run_pipeline)
    return counts


def _request(pipe, **overrides) -> dict:
    names = sorted(pipe.id2label.items())
    request = dict(
        classes=[f"{names[0][0]}: {names[0][1]}", str(names[3][0]), names[2][1].split(",")[0]],
        seed=7,
        randomize_seed=False,
        guidance_scale=max(1.0, pipe.config.default_guidance_scale),
        guidance_min=pipe.config.default_guidance_interval[0],
        guidance_max=pipe.config.default_guidance_interval[1],
        num_steps=1,
        images_per_class=2,
        model="bundled",
    )
    request.update(overrides)
    return request


def _generate(client, request: dict):
    return client.predict(**request, api_name="/generate")


def _pixels(gallery) -> list[np.ndarray]:
    return [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]


def test_api_exposes_generate_with_explicit_arguments(space):
    *_, client = space
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/generate", "/load_model"} <= set(endpoints)
    names = [parameter["parameter_name"] for parameter in endpoints["/generate"]["parameters"]]
    assert names == [
        "classes", "seed", "randomize_seed", "guidance_scale", "guidance_min", "guidance_max", "num_steps",
        "images_per_class", "model",
    ]


def test_generate_returns_requested_count_grid_and_timing(space, pipe):
    *_, client = space
    gallery, grid_path, timing, seed = _generate(client, _request(pipe))
    assert seed == 7
    assert len(gallery) == 3 * 2  # three classes × two images per class
    size = pipe.transformer.config.sample_size
    images = _pixels(gallery)
    assert all(image.shape == (size, size, 3) for image in images)
    ids = [int(item["caption"].split(":")[0]) for item in gallery]
    assert ids == [0, 0, 3, 3, 2, 2]  # by "id: name", by index, by name — in the requested order
    grid = Image.open(grid_path)
    tile = size * max(1, -(-128 // size))  # small models are upscaled in the grid
    assert grid.format == "PNG" and grid.size == (2 * tile, 3 * tile)
    assert "ms per image" in timing and "6 image(s)" in timing


def test_generate_is_deterministic_for_a_fixed_seed(space, pipe):
    *_, client = space
    first = _pixels(_generate(client, _request(pipe, seed=123, images_per_class=1))[0])
    again = _pixels(_generate(client, _request(pipe, seed=123, images_per_class=1))[0])
    other = _pixels(_generate(client, _request(pipe, seed=124, images_per_class=1))[0])
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_randomized_seed_and_multistep(space, pipe):
    app, _, _, client = space
    gallery, _, timing, seed = _generate(
        client, _request(pipe, classes=["1"], randomize_seed=True, num_steps=4, images_per_class=1)
    )
    assert len(gallery) == 1 and 0 <= seed <= app.MAX_SEED
    assert f"seed {seed}" in timing and "4 steps" in timing


BAD_REQUESTS = {
    "no class": (dict(classes=[]), "No class selected"),
    "blank class": (dict(classes=["  "]), "No class selected"),
    "unknown class name": (dict(classes=["no such class"]), "Unknown class 'no such class'"),
    "class id out of range": (dict(classes=["99"]), "out of range"),
    "stale id: name": (dict(classes=["3: golden retriever"]), "not 'golden retriever'"),
    "too many classes": (dict(classes=[str(i % 10) for i in range(9)]), "Too many classes (9)"),
    "too many images per class": (dict(images_per_class=5), "`images_per_class` must be 1 to 4"),
    "zero images per class": (dict(images_per_class=0), "`images_per_class` must be 1 to 4"),
    "zero steps": (dict(num_steps=0), "`num_steps` must be 1 to 4"),
    "too many steps": (dict(num_steps=5), "`num_steps` must be 1 to 4"),
    "fractional steps": (dict(num_steps=2.5), "`num_steps` must be a whole number"),
    "guidance below 1": (dict(guidance_scale=0.5), "`guidance_scale` (ω) must be between 1"),
    "guidance above 20": (dict(guidance_scale=25.0), "`guidance_scale` (ω) must be between 1"),
    "interval outside [0, 1]": (dict(guidance_min=-0.1), "must lie within [0, 1]"),
    "interval above 1": (dict(guidance_max=1.5), "must lie within [0, 1]"),
    "t_min > t_max": (dict(guidance_min=0.8, guidance_max=0.2), "t_min ≤ t_max"),
    "negative seed": (dict(seed=-1), "`seed` must be between 0"),
    "huge seed": (dict(seed=2**40), "`seed` must be between 0"),
    "fractional seed": (dict(seed=1.5), "`seed` must be a whole number"),
    "seed not a number": (dict(seed="abc"), "`seed` must be a finite number"),
    "unknown model": (dict(model="pMF-Z/99"), "Unknown model 'pMF-Z/99'"),
    "model that cannot load": (dict(model="broken"), "Could not load broken"),
    "official size not loaded yet": (dict(model="pMF-B/16"), "pMF-B/16 is not loaded yet"),
}


@pytest.mark.parametrize("overrides, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_api_requests_get_a_clear_error(space, pipe, overrides, message):
    *_, client = space
    with pytest.raises(Exception) as error:
        _generate(client, _request(pipe, **overrides))
    assert message in str(error.value)


def test_failed_model_load_keeps_the_previous_model(space, pipe):
    app, demo, _, client = space
    status, active, *_ = client.predict("broken", "bundled", api_name="/load_model")
    assert "Could not load broken" in status and "Still using **bundled**" in status
    assert "OSError" in status  # the reason, not a generic failure
    assert active == "bundled"
    gallery, *_ = _generate(client, _request(pipe, model=active, images_per_class=1))
    assert len(gallery) == 3
    status, active, *_ = client.predict("bundled", "bundled", api_name="/load_model")
    assert status.startswith("**Ready:**") and active == "bundled"
    with pytest.raises(Exception, match="Unknown model 'nope'"):
        client.predict("nope", "bundled", api_name="/load_model")


def test_switching_to_an_imagenet_model_updates_classes_and_guidance(space):
    *_, client = space
    status, active, _, classes, omega, t_min, t_max = client.predict(  # (example columns are not API outputs)
        "imagenet-tiny", "bundled", api_name="/load_model"
    )
    assert status.startswith("**Ready:**") and "1000 classes" in status and active == "imagenet-tiny"
    assert len(classes["choices"]) == 1000 and classes["value"][0] == "207: golden retriever"
    assert (omega["value"], t_min["value"], t_max["value"]) == (8.5, 0.1, 0.7)  # the model's recommended values
    gallery, _, timing, _ = client.predict(
        ["207: golden retriever", "otter", "387"], 0, False, 8.5, 0.1, 0.7, 1, 1, active, api_name="/generate"
    )
    assert [item["caption"].split(":")[0] for item in gallery] == ["207", "360", "387"]
    assert "imagenet-tiny" in timing
    with pytest.raises(Exception, match="ambiguous"):  # "crane" is both a bird (134) and a machine (517)
        client.predict(["crane"], 0, False, 8.5, 0.1, 0.7, 1, 1, active, api_name="/generate")


def test_model_list_offline_and_gpu_decorator_fallback(space, monkeypatch):
    from huggingface_hub import constants

    app, *_ = space
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the variable at import
    assert app.hub_reachable() is False
    monkeypatch.setattr(app, "_official_cached", lambda name: name == "pMF-L/16")
    assert list(app.default_models()) == ["bundled", "digits", "pMF-L/16"]  # offline: only what is cached
    if importlib.util.find_spec("spaces") is None:  # off ZeroGPU the decorator changes nothing

        def function():
            return 1

        assert app.GPU(function) is function and app.GPU(duration=5)(function) is function



def _bytes_under(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_generated_files_stay_under_the_disk_cap(registry, tmp_path, monkeypatch):
    """Many full-size requests through the served app: every byte the Space writes (gallery PNGs, grids, Gradio's
    cache) lies under GRADIO_TEMP_DIR and stays under the cap; the newest results are still served."""
    import urllib.request

    from gradio_client import Client

    app = _load("pmf_space_app", "app.py")
    cache = tmp_path / "gradio_cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))  # read when the demo's components are built
    pipe = registry.get("bundled")
    names = sorted(pipe.id2label)
    request = _request(
        pipe, classes=[str(i) for i in names[: app.MAX_CLASSES]], images_per_class=app.MAX_IMAGES_PER_CLASS
    )
    cap = 400_000
    demo = app.build_demo(registry=registry, max_output_bytes=cap)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False, download_files=False)  # client-side copies are the client's business
        written, peak = 0, 0
        for index in range(30):
            gallery, grid, *_ = _generate(client, {**request, "seed": 1000 * index})
            files = [Path(item["image"]["path"]) for item in gallery] + [Path(grid["path"])]
            assert all(cache in path.parents for path in files)  # served in place from Gradio's cache
            written += sum(path.stat().st_size for path in files)
            peak = max(peak, _bytes_under(cache))
        assert written > 3 * cap  # the requests wrote far more than the cap ...
        assert peak <= cap  # ... but the disk never held more than the cap
        with urllib.request.urlopen(gallery[-1]["image"]["url"]) as response:  # the newest result is still served
            assert Image.open(io.BytesIO(response.read())).size == (pipe.transformer.config.sample_size,) * 2
    finally:
        demo.close()


# --- headless Chromium ---
def _browser():
    screenshot = _load("pmf_space_screenshot", "screenshot.py")
    if screenshot.find_chromium() is None:
        # In CI (.ci/run installs chromium) a missing browser is a failure, never a silent skip.
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed although CI=true: .ci/run should have installed it")
        pytest.skip("chromium is not installed (`apt-get install -y chromium`; .ci/run does it)")
    return screenshot


def _non_background_fraction(region: np.ndarray) -> float:
    """Share of pixels that differ clearly from the region's most common colour."""
    flat = region.reshape(-1, 3).astype(np.int16)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float((np.abs(flat - background).sum(axis=1) > 30).mean())


def test_browser_click_generate_fills_the_gallery(space, pipe, server_calls, tmp_path):
    screenshot = _browser()
    app, demo, url, _ = space
    calls, images = server_calls["generate_calls"], server_calls["images"]
    expected = len(app.default_classes(pipe))
    out = tmp_path / "space.png"
    info = screenshot.capture_generate(url, out, expected_images=expected, timeout=60)

    assert server_calls["generate_calls"] == calls + 1  # the click ran the server's generate function once
    assert server_calls["images"] == images + expected
    assert info["images"] >= expected and "ms per image" in info["timing"]
    shot = np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB"))
    assert shot.shape[0] >= 600 and shot.shape[1] >= 1000
    assert shot.std() > 10 and _non_background_fraction(shot) > 0.02  # not blank
    box = info["gallery"]
    gallery = shot[box["y"] : box["y"] + box["height"], box["x"] : box["x"] + box["width"]]
    assert gallery.size and _non_background_fraction(gallery) > 0.05  # the samples are on screen


def test_browser_shows_errors_and_keeps_model_after_failed_load(space, server_calls):
    screenshot = _browser()
    _, demo, url, _ = space
    with screenshot.BrowserPage(url, timeout=30) as page:
        page.type_class("no such class")
        calls = server_calls["generate_calls"]
        page.click_generate()
        toast = page.wait_for(lambda: [t for t in page.toasts() if t["kind"] == "error"], "an error toast")
        assert "Unknown class 'no such class'" in toast[0]["text"]
        assert server_calls["generate_calls"] == calls + 1

        page.select_model("broken")
        warning = page.wait_for(lambda: [t for t in page.toasts() if t["kind"] == "warning"], "a warning toast")
        assert "Could not load broken" in warning[0]["text"]
        status = page.wait_for(lambda: "Still using" in (page.text_of("#model-status") or ""), "the status line")
        assert status
        assert "bundled" in page.text_of("#model input")  # the selector went back to the working model
