"""`pmf push-space` / `pmf_diffusers.hub.push_space_to_hub`: the Gradio app published to a Space that carries the
package (it is not on the package index), pushed through the real `huggingface_hub` client to the local Hub
stand-in of `test_hub.py`, then run from the uploaded files in an interpreter that does not see the installed
package."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from huggingface_hub import SpaceCard
from packaging.requirements import Requirement

from conftest import REPO_ROOT
from test_hub import TOKEN, HubStandIn, hub, no_token  # noqa: F401 - fixtures

from pmf_diffusers import hub as hub_module
from pmf_diffusers.cli import main
from pmf_diffusers.hub import HubPushError, build_wheel, push_space_to_hub, source_checkout

APP_DIR = REPO_ROOT / "spaces_app"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package's wheel, built once for the module (the first test also builds one through the default path)."""
    return build_wheel(source_checkout(), tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a wheel is built: the checks that refuse a push come before the build."""

    def refuse(*args, **kwargs):
        raise AssertionError("the wheel was built before the push was refused")

    monkeypatch.setattr(hub_module, "build_wheel", refuse)


def _runtime_requirements() -> set[str]:
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {str(Requirement(text)) for text in dependencies}


def _write_tree(files: dict[str, bytes], root: Path) -> Path:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def test_push_space_uploads_app_and_package(hub, tmp_path):
    assert source_checkout() == REPO_ROOT
    result = push_space_to_hub("alice/pmf-demo", private=True, endpoint=hub.url)  # builds the wheel itself

    create = hub.repos["alice/pmf-demo"]["create"]
    assert create == {"name": "pmf-demo", "organization": "alice", "visibility": "private", "type": "space",
                      "sdk": "gradio"}
    assert all(r["path"].startswith(("/api/spaces/", "/api/repos/create", "/api/validate-yaml", "/__lfs"))
               for r in hub.requests), [r["path"] for r in hub.requests]
    files = hub.files("alice/pmf-demo")
    assert set(files) == {path for path, _ in result.files}
    # The app and its README (the Space configuration) as they are in the checkout.
    for name in ("README.md", "app.py"):
        assert files[name] == (APP_DIR / name).read_bytes()
    card = SpaceCard(files["README.md"].decode())
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.sdk_version
    # The package, with its data files, unpacked next to app.py; no build or cache debris.
    assert "pmf_diffusers/__init__.py" in files and "pmf_diffusers/pipelines/pipeline_pmf.py" in files
    assert any(path.startswith("pmf_diffusers/bundled/") and path.endswith(".safetensors") for path in files)
    assert any(path.startswith("pmf_diffusers/model_cards/") for path in files)
    assert "pmf_diffusers-0.1.0.dist-info/METADATA" in files
    assert not [path for path in files if "__pycache__" in path or path.endswith(".pyc") or ".egg-info" in path]
    # requirements.txt: exactly the runtime dependencies of pyproject.toml (gradio comes from the SDK).
    lines = [line for line in files["requirements.txt"].decode().splitlines() if line and not line.startswith("#")]
    assert {str(Requirement(line)) for line in lines} == _runtime_requirements() and len(lines) == len(set(lines))
    for path, data in files.items():
        assert TOKEN.encode() not in data, path
    assert "Space alice/pmf-demo" in result.summary() and "pmf_diffusers/ (" in result.summary()
    assert not hub.unknown, hub.unknown

    # The Space runs from its files alone: `python -S` skips site-packages' .pth files, so the editable install of
    # the checkout is not on sys.path; the dependencies come from site-packages.
    space = _write_tree(files, tmp_path / "space")
    script = (
        f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        f"assert {str(REPO_ROOT / 'src')!r} not in sys.path, 'the checkout is importable'\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('pmf_diffusers').origin.startswith(sys.argv[1]), 'not the Space copy'\n"
        "import app, torch\n"
        "from pmf_diffusers import load_bundled_pipeline\n"
        "pipe = load_bundled_pipeline()\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "image = pipe(class_labels=[0], generator=torch.Generator().manual_seed(0)).images[0]\n"
        "demo = app.build_demo()\n"
        "print('space ok', image.size, type(demo).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    completed = subprocess.run(
        [sys.executable, "-S", "-c", script, str(space)], cwd=space, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "space ok (32, 32) Blocks" in completed.stdout


def test_push_space_again_replaces_the_package(hub, wheel):
    push_space_to_hub("alice/pmf-demo", wheel=wheel, endpoint=hub.url)
    files = hub.files("alice/pmf-demo")
    # An earlier version's package files, and a file the Space owner added by hand.
    files["pmf_diffusers/removed_module.py"] = b"# gone in the new version\n"
    files["pmf_diffusers-0.0.9.dist-info/METADATA"] = b"Name: pmf-diffusers\nVersion: 0.0.9\n"
    files["notes.md"] = b"kept\n"
    push_space_to_hub("alice/pmf-demo", wheel=wheel, endpoint=hub.url, commit_message="update")

    files = hub.files("alice/pmf-demo")
    assert "pmf_diffusers/removed_module.py" not in files
    assert not [path for path in files if path.startswith("pmf_diffusers-0.0.9")]
    assert files["notes.md"] == b"kept\n" and "pmf_diffusers/__init__.py" in files
    assert hub.commits[-1]["summary"] == "update"
    deleted = {"pmf_diffusers/removed_module.py", "pmf_diffusers-0.0.9.dist-info/METADATA"}
    assert set(hub.commits[-1]["deleted"]) == deleted


def test_cli_push_space_dry_run(hub, monkeypatch, tmp_path, wheel, capsys):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    stage = tmp_path / "stage"
    code = main(["push-space", "alice/pmf-demo", "--dry-run", "--wheel", str(wheel), "--staging-dir", str(stage)])
    out = capsys.readouterr().out
    assert code == 0
    assert hub.requests == []
    assert out.startswith("would upload ") and "to Space alice/pmf-demo" in out and "dry run: nothing was sent" in out
    assert (stage / "README.md").read_bytes() == (APP_DIR / "README.md").read_bytes()
    assert (stage / "pmf_diffusers" / "__init__.py").is_file() and (stage / "requirements.txt").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["alice/pmf-demo"], "not logged in: run `hf auth login` or set HF_TOKEN"),
        (["not a repo"], "malformed repo id 'not a repo'"),
        (["alice/pmf-demo/extra"], "malformed repo id"),
    ],
)
def test_cli_push_space_refusals_are_one_line(hub, monkeypatch, capsys, no_build, argv, message):
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push-space", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmf: error: ") and err.count("\n") == 1 and message in err
    assert hub.requests == []


def test_space_app_checks(hub, tmp_path, no_build):
    with pytest.raises(HubPushError, match="the Space app folder .*missing does not exist"):
        push_space_to_hub("alice/x", app_dir=tmp_path / "missing", endpoint=hub.url)
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text("print('hi')\n")
    with pytest.raises(HubPushError, match="has no README.md"):
        push_space_to_hub("alice/x", app_dir=app, endpoint=hub.url)
    (app / "README.md").write_text("# no YAML header\n")
    with pytest.raises(HubPushError, match="must set `sdk:`"):
        push_space_to_hub("alice/x", app_dir=app, endpoint=hub.url)
    (app / "README.md").write_text("---\nsdk: gradio\napp_file: main.py\n---\n# demo\n")
    with pytest.raises(HubPushError, match="names app_file 'main.py', which is not in the Space app folder"):
        push_space_to_hub("alice/x", app_dir=app, endpoint=hub.url)
    with pytest.raises(HubPushError, match="is not a pmf-diffusers wheel"):
        (app / "README.md").write_text("---\nsdk: gradio\napp_file: app.py\n---\n# demo\n")
        push_space_to_hub("alice/x", app_dir=app, wheel=tmp_path / "other-1.0-py3-none-any.whl", endpoint=hub.url)
    assert hub.requests == []


def test_space_dry_run_checks_for_the_token(hub, tmp_path, wheel):
    app = tmp_path / "app"
    app.mkdir()
    (app / "README.md").write_text("---\nsdk: gradio\napp_file: app.py\n---\n# demo\n")
    (app / "app.py").write_text(f"TOKEN = {TOKEN!r}  # pasted by mistake\n")
    with pytest.raises(HubPushError, match="refusing to upload: the access token appears in app.py"):
        push_space_to_hub("alice/x", app_dir=app, wheel=wheel, dry_run=True)
    assert hub.requests == []
