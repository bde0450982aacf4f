"""diffusers' generic loader on every folder pmf-diffusers writes, with and without the package (issue 11).

`DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` must give the images of
`PMFPipeline.from_pretrained` for `save_pretrained` output, `pmf convert` output, training exports, the bundled model
and pushed repos; a pushed repo must do so in a virtual environment that has diffusers and torch but not
pmf_diffusers. `PMFPipeline.from_pretrained` must never run code from a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import site
import subprocess
import sys
import venv
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

import diffusers.utils.dynamic_modules_utils as dynamic_modules
import huggingface_hub
from diffusers import DiffusionPipeline

from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel, bundled_model_path, load_bundled_pipeline
from pmf_diffusers.hub import push_pipeline_to_hub
from pmf_diffusers.remote_code import (
    REMOTE_CODE_FILENAME,
    REMOTE_CODE_FORMAT,
    RemoteCodeVersionError,
    package_shim_source,
    remote_code_source,
    write_remote_code,
)
from test_hub import TOKEN, HubStandIn, make_tiny_pipeline

CODE_FILES = [REMOTE_CODE_FILENAME, f"transformer/{REMOTE_CODE_FILENAME}", f"scheduler/{REMOTE_CODE_FILENAME}"]


def sample(pipe, labels=(1, 2)):
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=list(labels), generator=torch.Generator().manual_seed(3), output_type="pt").images


@pytest.fixture
def modules_cache(monkeypatch, tmp_path):
    """diffusers copies remote code into HF_MODULES_CACHE and imports it as `diffusers_modules.*`: keep both local to
    the test."""

    def remote_modules():
        return [name for name in sys.modules if name.startswith("diffusers_modules")]

    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in remote_modules():
        monkeypatch.delitem(sys.modules, name)  # put back after the test
    yield
    for name in remote_modules():
        del sys.modules[name]  # this test's


def generic_load(source, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_generic_loader_matches_package(folder: Path, labels=(1, 2)) -> torch.Tensor:
    """Both loaders give a PMFPipeline (with the package installed, the installed class) and the same images."""
    assert [path for path in CODE_FILES if (folder / path).is_file()] == CODE_FILES
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == ["pipeline_pmf", "PMFPipeline"]
    expected = sample(PMFPipeline.from_pretrained(folder), labels)
    pipe = generic_load(folder)
    assert type(pipe) is PMFPipeline
    assert type(pipe.transformer) is PMFTransformer2DModel and type(pipe.scheduler) is PMFScheduler
    assert torch.equal(sample(pipe, labels), expected)
    return expected


# -------------------------------------------------------------------------------------------- folder kinds


def test_save_pretrained_output(tmp_path, modules_cache):
    pipe = make_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "saved")
    expected = assert_generic_loader_matches_package(tmp_path / "saved")
    assert torch.equal(expected, sample(pipe))
    # diffusers itself asks for trust_remote_code for any folder with code, local ones included.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path / "saved")


def test_pmf_convert_output(tmp_path, modules_cache, tiny_checkpoint):
    from pmf_diffusers.cli import main

    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "converted"), "--noise-scale", "1"]) == 0
    assert_generic_loader_matches_package(tmp_path / "converted")


def test_training_export(tmp_path, modules_cache):
    from pmf_diffusers.training.export import save_pipeline

    torch.manual_seed(0)
    transformer = PMFTransformer2DModel(
        sample_size=16, patch_size=8, num_layers=1, num_head_layers=1, num_attention_heads=2, attention_head_dim=8,
        mlp_hidden_dim=32, bottleneck_dim=8, num_classes=3, frequency_embedding_dim=16,
    )
    state_dict = {key: torch.randn_like(value) * 0.2 for key, value in transformer.state_dict().items()}
    folder = save_pipeline(
        tmp_path / "export", transformer.config, state_dict, noise_scale=2.0, id2label={0: "x", 1: "y", 2: "z"},
        guidance_scale=1.5, guidance_interval=(0.1, 0.9), drop_v_head=True,
    )
    assert_generic_loader_matches_package(Path(folder), labels=("y", 2))


def test_bundled_model(modules_cache):
    folder = bundled_model_path()
    expected = assert_generic_loader_matches_package(folder, labels=(0, "purple star"))
    assert torch.equal(expected, sample(load_bundled_pipeline(), labels=(0, 9)))


def test_bundled_models_carry_the_package_shim():
    """The bundled folders ship inside the package, so their loader code is the installed package (no generated copy
    that would go stale with every source change)."""
    folder = bundled_model_path()
    stale = [path for path in CODE_FILES if (folder / path).read_text(encoding="utf-8") != package_shim_source()]
    assert not stale, (
        f"unexpected loader code in {folder}: {stale}; rewrite it with `python -c \"from pmf_diffusers.remote_code "
        f"import write_remote_code; write_remote_code('src/pmf_diffusers/bundled/{folder.name}', self_contained=False)\"`"
    )


def test_folders_of_earlier_versions_keep_loading_and_can_be_upgraded(tmp_path, modules_cache):
    """Earlier versions wrote `_class_name: "PMFPipeline"` and the package's module paths, and no code."""
    pipe = make_tiny_pipeline()
    folder = tmp_path / "old"
    pipe.save_pretrained(folder)
    for path in CODE_FILES:
        (folder / path).unlink()
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        _class_name="PMFPipeline",
        transformer=["pmf_diffusers.models.transformer_pmf", "PMFTransformer2DModel"],
        scheduler=["pmf_diffusers.schedulers.scheduling_pmf", "PMFScheduler"],
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    assert torch.equal(sample(PMFPipeline.from_pretrained(folder)), sample(pipe))

    assert write_remote_code(folder) == CODE_FILES
    assert_generic_loader_matches_package(folder)


# ---------------------------------------------------------------------------------------- no code run


def test_pmf_pipeline_from_pretrained_runs_no_code_from_the_folder(tmp_path, modules_cache):
    pipe = make_tiny_pipeline()
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    for path in CODE_FILES:
        (folder / path).write_text("raise RuntimeError('code from the folder ran')\n")
    for kwargs in ({}, {"trust_remote_code": True}):
        loaded = PMFPipeline.from_pretrained(folder, **kwargs)
        assert type(loaded) is PMFPipeline and torch.equal(sample(loaded), sample(pipe))
    with pytest.raises(ValueError, match="runs no code from a model folder, so `custom_pipeline` is not accepted"):
        PMFPipeline.from_pretrained(folder, custom_pipeline="pipeline_pmf")

    # A component that is not pMF's, defined by code in the folder, is refused rather than imported.
    (folder / "scheduler" / "my_scheduler.py").write_text("raise RuntimeError('code from the folder ran')\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["my_scheduler", "MyScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"scheduler/my_scheduler.py\); PMFPipeline.from_pretrained runs no code"):
        PMFPipeline.from_pretrained(folder)


# ---------------------------------------------------------------------------------- the generated code


def _set_format(folder: Path, remote_code_format: int) -> None:
    for path in CODE_FILES:
        text = (folder / path).read_text()
        marker = "PMF_REMOTE_CODE_FORMAT = {}\n"
        (folder / path).write_text(text.replace(marker.format(REMOTE_CODE_FORMAT), marker.format(remote_code_format)))


def test_remote_code_of_an_older_format_is_refused_with_what_to_do(tmp_path, modules_cache):
    pipe = make_tiny_pipeline()
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    _set_format(folder, REMOTE_CODE_FORMAT - 1)
    with pytest.raises(RemoteCodeVersionError) as error:
        generic_load(folder)
    message = str(error.value)
    assert "\n" not in message
    assert f"remote-code format {REMOTE_CODE_FORMAT - 1}" in message and "PMFPipeline.from_pretrained(...)" in message
    assert "`pmf push`" in message and "pipe.save_pretrained(folder)" in message
    assert torch.equal(sample(PMFPipeline.from_pretrained(folder)), sample(pipe))  # the package still loads it


def test_generated_classes_sample_like_the_package(tmp_path, modules_cache):
    """Code of a newer format than the package keeps its own classes: this runs the generated copies in-process."""
    pipe = make_tiny_pipeline()
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    _set_format(folder, REMOTE_CODE_FORMAT + 1)
    remote = generic_load(folder)
    module = sys.modules[type(remote).__module__]
    assert module.__name__.startswith("diffusers_modules.") and type(remote).__name__ == "PMFPipeline"
    # One module for the three classes, and the classes of its first run (diffusers runs it once per component).
    assert type(remote.transformer) is module.PMFTransformer2DModel and type(remote.scheduler) is module.PMFScheduler
    assert not hasattr(remote, "load_lora_weights")  # a package-only feature
    assert torch.equal(sample(remote, labels=("b", 2)), sample(pipe))
    remote.fuse_qkv_projections()
    assert torch.equal(sample(remote), sample(pipe))


def test_generated_module_is_self_contained():
    from pmf_diffusers import __version__

    source = remote_code_source()
    assert source.startswith(f"# Generated by pmf-diffusers {__version__} from its own source. Do not edit")
    assert "#   pmf_diffusers/pipelines/pipeline_pmf.py\n" in source
    assert re.search(rf"^PMF_REMOTE_CODE_FORMAT = {REMOTE_CODE_FORMAT}$", source, re.M)
    assert not re.search(r"^\s*(from|import)\s+(\.|pmf_diffusers)", source, re.M)
    for class_name in ("PMFPipeline", "PMFTransformer2DModel", "PMFScheduler", "PMFAttention"):
        assert len(re.findall(rf"^class {class_name}\(", source, re.M)) == 1
    assert re.search(r"^class PMFPipeline\(DiffusionPipeline\):", source, re.M)  # package-only mixins left out


# ------------------------------------------------------------------------------------------ Hub repos


class DownloadableHubStandIn(HubStandIn):
    """`test_hub.HubStandIn` plus the read side that diffusers and huggingface_hub use to download a repo: model info
    (the file list and the commit) and HEAD/GET of `/{repo}/resolve/{revision}/{path}`. Reads need no token, like a
    public repo."""

    def commit_sha(self, repo_id: str, ref: str = "main") -> str:
        digest = hashlib.sha1()
        for path, data in sorted(self.files(repo_id, ref).items()):
            digest.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
        return digest.hexdigest()

    def _resolve_ref(self, repo_id: str, revision: str | None):
        repo = self.repos.get(repo_id)
        for ref in repo["refs"] if repo else []:
            if revision in (None, ref, self.commit_sha(repo_id, ref)):
                return ref
        return None

    def _handler_class(self):
        base = super()._handler_class()

        class Handler(base):
            def do_HEAD(self):
                self._dispatch("HEAD")

            def _send(self, status: int, payload=None, headers: dict | None = None):
                raw = isinstance(payload, bytes)
                data = payload if raw else json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler

    def _route(self, method: str, path: str, record: dict):
        if method in ("GET", "HEAD"):
            match = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", path)
            if match:
                repo_id, ref = match["repo"], self._resolve_ref(match["repo"], unquote(match["rev"] or "main"))
                if ref is None:
                    return 404, {"error": "Repository or revision not found"}, {"X-Error-Code": "RepoNotFound"}
                files = self.files(repo_id, ref)
                return 200, {
                    "_id": "0" * 24, "id": repo_id, "modelId": repo_id, "sha": self.commit_sha(repo_id, ref),
                    "private": False, "tags": [], "siblings": [{"rfilename": name} for name in sorted(files)],
                    "lastModified": "2026-01-01T00:00:00.000Z",
                }, {}
            match = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)", path)
            if match:  # snapshot_download lists the files of the commit (one page, recursive)
                ref = self._resolve_ref(match["repo"], unquote(match["rev"]))
                if ref is None:
                    return 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}
                return 200, [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(self.files(match["repo"], ref).items())
                ], {}
            match = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            if match:
                repo_id, ref = match["repo"], self._resolve_ref(match["repo"], unquote(match["rev"]))
                data = self.files(repo_id, ref).get(unquote(match["file"])) if ref else None
                if data is None:
                    return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
                return 200, data, {
                    "X-Repo-Commit": self.commit_sha(repo_id, ref), "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                }
        return super()._route(method, path, record)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running stand-in, and huggingface_hub pointed at it (its endpoint constants are frozen at import)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with DownloadableHubStandIn() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            huggingface_hub.constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            server.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)
        yield server


# The package-less interpreter's script: load the repo with diffusers alone, sample like `sample()`, save the images.
BARE_SCRIPT = """
import sys

import torch

try:
    import pmf_diffusers
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"pmf_diffusers is importable: {pmf_diffusers.__file__}")

from diffusers import DiffusionPipeline

repo_id, output, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)  # the parent's count: a matmul may sum in another order with another count
pipe = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
module = sys.modules[type(pipe).__module__]
assert type(pipe.transformer) is module.PMFTransformer2DModel and type(pipe.scheduler) is module.PMFScheduler
images = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(3), output_type="pt").images
by_name = pipe(class_labels=["b", "c"], generator=torch.Generator().manual_seed(3), output_type="pt").images
assert torch.equal(images, by_name)
torch.save(images, output)
print(type(pipe).__module__, type(pipe).__name__)
"""


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A virtual environment with everything the main one has except pmf_diffusers: its site-packages holds a .pth
    pointing at a folder of links to the main site-packages entries, pmf_diffusers' own (package, metadata, the
    editable-install hooks) left out. Nothing is installed, so it takes well under a second to make."""
    root = tmp_path_factory.mktemp("bare")
    venv.create(root / "venv", with_pip=False, symlinks=True)
    linked = root / "site-packages"
    linked.mkdir()
    for site_packages in site.getsitepackages():
        for entry in Path(site_packages).iterdir():
            name = entry.name.lower()
            if name.startswith(("pmf_diffusers", "pmf-diffusers", "__editable__")) or name.endswith(".pth"):
                continue
            if not (linked / entry.name).exists():
                (linked / entry.name).symlink_to(entry)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "main-site-packages.pth").write_text(f"{linked}\n")
    return python


def test_pushed_repo_loads_with_both_loaders_and_without_the_package(hub, tmp_path, modules_cache, bare_python):
    pipe = make_tiny_pipeline()
    push_pipeline_to_hub(pipe, "alice/pmf-remote", endpoint=hub.url, sample_grid=False)
    files = hub.files("alice/pmf-remote")
    assert set(CODE_FILES) <= set(files) and files[REMOTE_CODE_FILENAME].decode() == remote_code_source()
    expected = sample(pipe)

    # With the package: both loaders, straight from the (stand-in) Hub.
    cache = tmp_path / "hf-cache"
    assert torch.equal(sample(PMFPipeline.from_pretrained("alice/pmf-remote", cache_dir=cache)), expected)
    generic = generic_load("alice/pmf-remote", cache_dir=cache)
    assert type(generic) is PMFPipeline and torch.equal(sample(generic), expected)

    # Without the package, in a separate virtual environment.
    env = {
        **os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "bare-hf-home"), "HF_MODULES_CACHE": str(tmp_path / "bare-modules"),
    }
    env.pop("PYTHONPATH", None)
    script = tmp_path / "load_without_package.py"
    script.write_text(BARE_SCRIPT)
    output = tmp_path / "bare-images.pt"
    result = subprocess.run(
        [bare_python, script, "alice/pmf-remote", output, str(torch.get_num_threads())],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["diffusers_modules.local.pipeline_pmf", "PMFPipeline"]
    assert "Expected types" not in result.stderr  # the pipeline and its components agree on their classes
    assert "might require" not in result.stderr  # diffusers' scan of the code's imports finds nothing missing
    assert torch.equal(torch.load(output), expected)
    assert not hub.unknown, hub.unknown
