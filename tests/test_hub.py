"""`pmf_diffusers.hub`: model cards, the `pmf push` staging, and pushes through the real `huggingface_hub` client
against a local stand-in of the Hub's HTTP API (no network)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch

import huggingface_hub
from huggingface_hub import ModelCard

from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel
from pmf_diffusers.cli import main
from pmf_diffusers.hub import (
    CITATION,
    HubPushError,
    _card_context,
    check_model_card,
    push_pipeline_to_hub,
    render_model_card,
)
from pmf_diffusers.official import OFFICIAL_PRESETS
from pmf_diffusers.remote_code import remote_code_source

TOKEN = "hf_standInToken1234567890abcdef"  # fake; the stand-in accepts only this one
STAGED_FILES = {
    "README.md",
    "model_index.json",
    "pipeline_pmf.py",
    "scheduler/pipeline_pmf.py",
    "samples.png",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "transformer/pipeline_pmf.py",
}


# ------------------------------------------------------------------------------------------- Hub stand-in


class HubStandIn:
    """The Hub endpoints `huggingface_hub` 2.4 calls for create_repo / create_branch / upload_folder.

    Implemented, for model repos (/api/models/...) and Spaces (/api/spaces/...): POST /api/repos/create;
    POST /api/validate-yaml; POST /api/{type}s/{repo}/branch/{branch};
    POST /api/{type}s/{repo}/preupload/{rev} (answers "regular", or "lfs" for files >= `lfs_threshold`);
    POST /[spaces/]{repo}.git/info/lfs/objects/batch + the PUT/verify URLs it hands out (basic transfer);
    POST /api/{type}s/{repo}/commit/{rev} (NDJSON: header / file (base64) / lfsFile / deletedFile / deletedFolder
    lines, `?create_pr=1`); GET /api/{type}s/{repo}/tree/{rev} (recursive listing, one page, for delete_patterns);
    POST /api/models/{repo}/discussions and GET .../discussions/{num} (pull requests, used by the hf_xet-era
    pipelined upload). Xet storage is not implemented: with "regular" upload modes the client never needs it.
    Every request is recorded; Hub API calls need `Authorization: Bearer <TOKEN>`.
    """

    def __init__(self, lfs_threshold: int | None = None):
        self.lfs_threshold = lfs_threshold
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}  # repo_id -> {"create": payload, "refs": {ref: {path: bytes}}}
        self.commits: list[dict] = []
        self.pull_requests: list[dict] = []
        self.lfs_storage: dict[str, bytes] = {}
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["refs"][ref]

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload=None, headers: dict | None = None):
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

            def do_PUT(self):
                self._dispatch("PUT")

            def _dispatch(self, method: str):
                split = urlsplit(self.path)
                body = self._body()
                record = {
                    "method": method,
                    "path": split.path,
                    "query": parse_qs(split.query),
                    "headers": {key.lower(): value for key, value in self.headers.items()},
                    "body": body,
                }
                with hub.lock:
                    hub.requests.append(record)
                    try:
                        status, payload, headers = hub._route(method, split.path, record)
                    except Exception as error:  # a stand-in bug: make it visible, not a hang
                        status, payload, headers = 400, {"error": f"stand-in: {error!r}"}, {}
                self._send(status, payload, headers)

        return Handler

    # -- routing (called with the lock held) -----------------------------------------------------------------

    def _authorized(self, record) -> bool:
        return record["headers"].get("authorization") == f"Bearer {TOKEN}"

    def _route(self, method: str, path: str, record: dict):
        if method == "PUT" and path.startswith("/__lfs_storage__/"):  # "S3": no Hub auth, like presigned URLs
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(record["body"]).hexdigest() != oid:
                return 400, {"error": "sha256 mismatch"}, {}
            self.lfs_storage[oid] = record["body"]
            return 200, {}, {}
        if not self._authorized(record):
            return 401, {"error": "Invalid credentials in Authorization header"}, {"X-Error-Code": "InvalidCredentials"}
        body = record["body"]

        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
            self.repos[repo_id] = {"create": payload, "refs": {"main": {}}}
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": "0" * 24}, {}

        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}

        match = re.fullmatch(r"/(?:spaces/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and match:
            payload = json.loads(body)
            objects = [
                {
                    "oid": obj["oid"],
                    "size": obj["size"],
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.url}/__lfs_storage__/{obj['oid']}"},
                        "verify": {"href": f"{self.url}/__lfs_verify__/{obj['oid']}"},
                    },
                }
                for obj in payload["objects"]
            ]
            return 200, {"transfer": "basic", "objects": objects}, {}

        match = re.fullmatch(r"/__lfs_verify__/(?P<oid>[0-9a-f]{64})", path)
        if method == "POST" and match:
            return (200, {}, {}) if match["oid"] in self.lfs_storage else (404, {"error": "not uploaded"}, {})

        match = re.fullmatch(r"/api/(?:models|spaces)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)", path)
        if method == "GET" and match:
            repo = self.repos.get(match["repo"])
            if repo is None or unquote(match["rev"]) not in repo["refs"]:
                return 404, {"error": "Repository or revision not found"}, {"X-Error-Code": "RepoNotFound"}
            files = repo["refs"][unquote(match["rev"])]
            listing = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in sorted(files.items())
            ]
            return 200, listing, {}

        match = re.fullmatch(
            r"/api/(?:models|spaces)/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch)/(?P<rev>[^/]+)", path
        )
        if match:
            repo_id, operation, ref = match["repo"], match["op"], unquote(match["rev"])
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if operation == "branch":
                if ref in repo["refs"]:
                    return 409, {"error": f"Reference {ref} already exists"}, {}
                start = json.loads(body or b"{}").get("startingPoint", "main")
                repo["refs"][ref] = dict(repo["refs"][start])
                return 200, {}, {}
            if ref not in repo["refs"]:
                return 404, {"error": f"Invalid rev id: {ref}"}, {"X-Error-Code": "RevisionNotFound"}
            if operation == "preupload":
                files = json.loads(body)["files"]
                modes = [
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if self.lfs_threshold is not None and item["size"] >= self.lfs_threshold else "regular",
                        "shouldIgnore": False,
                        "oid": None,
                    }
                    for item in files
                ]
                return 200, {"files": modes, "commitOid": "0" * 40}, {}
            return self._commit(repo_id, repo, ref, record)

        match = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/discussions(?:/(?P<num>\d+))?", path)
        if match:
            repo_id = match["repo"]
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if method == "POST" and match["num"] is None:
                payload = json.loads(body)
                num = len(self.pull_requests) + 1
                self.pull_requests.append({"repo_id": repo_id, "num": num, **payload})
                self.repos[repo_id]["refs"][f"refs/pr/{num}"] = dict(self.repos[repo_id]["refs"]["main"])
                return 200, {"num": num, "url": f"{self.url}/{repo_id}/discussions/{num}"}, {}
            if method == "GET" and match["num"] is not None:
                pr = self.pull_requests[int(match["num"]) - 1]
                return 200, {
                    "title": pr["title"], "num": pr["num"], "author": {"name": "user"},
                    "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft",
                    "repo": {"name": repo_id, "type": "model"}, "isPullRequest": pr["pullRequest"], "events": [],
                    "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "diff": "",
                }, {}

        self.unknown.append(f"{method} {path}")
        return 404, {"error": f"stand-in has no route for {method} {path}"}, {}

    def _commit(self, repo_id: str, repo: dict, ref: str, record: dict):
        lines = [json.loads(line) for line in record["body"].splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        files, lfs_files, deleted = {}, [], []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            elif line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs_storage:
                    return 400, {"error": f"LFS object {value['oid']} was not uploaded"}, {}
                files[value["path"]] = self.lfs_storage[value["oid"]]
                lfs_files.append(value["path"])
            else:
                return 400, {"error": f"unsupported commit line {line['key']}"}, {}
        create_pr = record["query"].get("create_pr") == ["1"]
        if create_pr:
            num = len(self.pull_requests) + 1
            self.pull_requests.append({"repo_id": repo_id, "num": num, "title": header.get("summary"), "pullRequest": True})
            repo["refs"][f"refs/pr/{num}"] = dict(repo["refs"][ref])
            ref = f"refs/pr/{num}"
        for path in deleted:
            prefix = path.rstrip("/") + "/"
            for name in [name for name in repo["refs"][ref] if name == path or name.startswith(prefix)]:
                del repo["refs"][ref][name]
        repo["refs"][ref].update(files)
        oid = hashlib.sha1(record["body"]).hexdigest()
        self.commits.append({
            "repo_id": repo_id, "ref": ref, "summary": header.get("summary"), "description": header.get("description"),
            "files": files, "lfs_files": lfs_files, "deleted": deleted, "create_pr": create_pr,
        })
        pr_url = f"{self.url}/{repo_id}/discussions/{len(self.pull_requests)}" if create_pr else None
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url}, {}


# ------------------------------------------------------------------------------------------------ fixtures


def make_tiny_pipeline() -> PMFPipeline:
    torch.manual_seed(0)
    transformer = PMFTransformer2DModel(
        sample_size=32, patch_size=8, num_layers=1, num_head_layers=1, num_attention_heads=2, attention_head_dim=16,
        mlp_hidden_dim=64, bottleneck_dim=16, num_classes=4, with_v_head=False,
    ).eval()
    with torch.no_grad():  # non-trivial weights, so that samples differ between classes and seeds
        for parameter in transformer.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    pipe = PMFPipeline(transformer=transformer, scheduler=PMFScheduler(), id2label={0: "a", 1: "b", 2: "c", 3: "d"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipe() -> PMFPipeline:
    return make_tiny_pipeline()


@pytest.fixture
def saved_folder(tmp_path, tiny_pipe) -> Path:
    folder = tmp_path / "saved"
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: not in the environment, not in the token file."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


@pytest.fixture
def hub(monkeypatch, tmp_path, no_token):
    """A running stand-in; the client online; HF_TOKEN and HF_ENDPOINT set. huggingface_hub freezes HF_ENDPOINT into
    `constants.ENDPOINT` at import time, so the API tests pass `endpoint=hub.url`; the CLI tests rely on
    `push_pipeline_to_hub` reading HF_ENDPOINT at call time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # hf_xet (installed, so upload_folder takes its pipelined path) logs when its session starts; keep that here.
    monkeypatch.setenv("HF_XET_LOG_DEST", str(tmp_path / "xet-logs"))
    monkeypatch.setenv("HF_XET_TELEMETRY_ENABLED", "0")
    with HubStandIn() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _assert_token_only_in_headers(server: HubStandIn, repo_id: str):
    hub_calls = [r for r in server.requests if not r["path"].startswith("/__lfs_storage__/")]
    assert hub_calls and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub_calls)
    for ref, files in server.repos[repo_id]["refs"].items():
        for path, data in files.items():
            assert TOKEN.encode() not in data, f"token leaked into {ref}:{path}"
    assert not server.unknown, server.unknown


def _assert_png(data: bytes, columns: int, rows: int, tile: int = 32):
    from PIL import Image

    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.verify()
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (columns * tile, rows * tile)


# ------------------------------------------------------------------------------------------------- pushes


@pytest.mark.parametrize("upload_path", ["pipelined", "legacy-lfs"])
def test_push_pipeline_uploads_everything(hub, monkeypatch, tmp_path, tiny_pipe, upload_path):
    """The default client path (hf_xet installed → pipelined upload, all files "regular"), and the hf_xet-less path
    with the safetensors file going through the LFS batch API."""
    if upload_path == "legacy-lfs":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        hub.lfs_threshold = 100_000  # the weights (~285 KB) go LFS, the rest regular
    result = push_pipeline_to_hub(
        tiny_pipe, "alice/pmf-tiny", private=True, commit_message="first pMF push", endpoint=hub.url,
        card_info={"dataset": "toy shapes", "training_steps": 10, "recipe": {"lr": 1e-3}, "command": "pmf train"},
    )
    reference = tmp_path / "reference"
    tiny_pipe.save_pretrained(reference, safe_serialization=True)

    assert hub.repos["alice/pmf-tiny"]["create"] == {"name": "pmf-tiny", "organization": "alice", "visibility": "private"}
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["summary"] == "first pMF push" and commit["ref"] == "main" and not commit["create_pr"]
    files = hub.files("alice/pmf-tiny")
    assert set(files) == STAGED_FILES == {path for path, _ in result.files}
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert files[weights] == (reference / weights).read_bytes()
    assert commit["lfs_files"] == ([weights] if upload_path == "legacy-lfs" else [])
    for name in ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json"):
        assert json.loads(files[name]) == json.loads((reference / name).read_text())
    assert json.loads(files["model_index.json"])["_class_name"] == ["pipeline_pmf", "PMFPipeline"]
    for name in ("pipeline_pmf.py", "transformer/pipeline_pmf.py", "scheduler/pipeline_pmf.py"):
        assert files[name].decode() == remote_code_source()  # generated from the installed package
    _assert_png(files["samples.png"], columns=4, rows=1)

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.license == "mit"
    assert {"pmf", "meanflow", "one-step", "pixel-space", "class-conditional", "diffusers"} <= set(card.data.tags)
    assert card.data.base_model is None
    assert 'PMFPipeline.from_pretrained("alice/pmf-tiny")' in card.text and "![One-step samples](samples.png)" in card.text
    assert result.commit_url.startswith(f"{hub.url}/alice/pmf-tiny/commit/") and result.pr_url is None
    _assert_token_only_in_headers(hub, "alice/pmf-tiny")


def test_push_folder_to_new_branch_as_finetune(hub, saved_folder):
    (saved_folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle!")
    (saved_folder / "notes.txt").write_text("local notes")
    (saved_folder / "logs").mkdir()
    for index in range(3):
        (saved_folder / "logs" / f"events.{index}").write_text("tensorboard")
    info = {"base_model": "someone/pmf-base", "license": "apache-2.0", "dataset": "someone/flowers", "training_steps": 500}
    result = push_pipeline_to_hub(saved_folder, "alice/pmf-ft", revision="dev", card_info=info, endpoint=hub.url)

    branch_calls = [r for r in hub.requests if r["path"] == "/api/models/alice/pmf-ft/branch/dev"]
    assert len(branch_calls) == 1
    assert hub.repos["alice/pmf-ft"]["create"] == {"name": "pmf-ft", "organization": "alice"}  # private=None: not sent
    assert hub.commits[0]["ref"] == "dev" and hub.files("alice/pmf-ft", "main") == {}
    files = hub.files("alice/pmf-ft", "dev")
    assert set(files) == STAGED_FILES
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert files[weights] == (saved_folder / weights).read_bytes()
    assert "transformer/diffusion_pytorch_model.bin (pickle weights are never uploaded)" in result.skipped
    assert "notes.txt (not part of the pipeline)" in result.skipped
    assert "logs/ (not part of the pipeline)" in result.skipped and len(result.skipped) == 3
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "someone/pmf-base" and card.data.base_model_relation == "finetune"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["someone/flowers"]
    assert result.card_kind == "trained" and result.revision == "dev"
    _assert_token_only_in_headers(hub, "alice/pmf-ft")

    # Pushing again: the repo (409) and the branch (409) exist already; both are fine.
    push_pipeline_to_hub(saved_folder, "alice/pmf-ft", revision="dev", card_info=info, endpoint=hub.url, sample_grid=False)
    assert len(hub.commits) == 2 and "samples.png" not in hub.commits[1]["files"]


@pytest.mark.parametrize("upload_path", ["pipelined", "legacy"])
def test_push_as_pull_request(hub, monkeypatch, tiny_pipe, upload_path):
    if upload_path == "legacy":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    result = push_pipeline_to_hub(tiny_pipe, "alice/pmf-pr", create_pr=True, endpoint=hub.url, sample_grid=False)
    assert len(hub.pull_requests) == 1 and hub.pull_requests[0]["pullRequest"]
    commit = hub.commits[0]
    assert commit["ref"] == "refs/pr/1" and hub.files("alice/pmf-pr", "main") == {}
    # The legacy client asks for the PR with ?create_pr=1 on the commit; the pipelined one opens it first.
    assert commit["create_pr"] == (upload_path == "legacy")
    assert set(hub.files("alice/pmf-pr", "refs/pr/1")) == STAGED_FILES - {"samples.png"}
    assert result.pr_url and result.pr_url.endswith("/discussions/1")
    _assert_token_only_in_headers(hub, "alice/pmf-pr")


def test_create_pr_with_revision_is_refused(hub, tiny_pipe):
    with pytest.raises(HubPushError, match="pull request is opened against main"):
        push_pipeline_to_hub(tiny_pipe, "alice/x", revision="dev", create_pr=True, endpoint=hub.url)
    assert hub.requests == []


def test_uploaded_repo_loads_back(hub, tmp_path, tiny_pipe):
    """What arrives on the Hub is a loadable pipeline, by both documented routes: `PMFPipeline.from_pretrained` and
    `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` through the remote code (also with the older
    `custom_pipeline="pipeline_pmf"` spelling)."""
    import diffusers.utils.dynamic_modules_utils as dynamic_modules
    from diffusers import DiffusionPipeline

    push_pipeline_to_hub(tiny_pipe, "alice/pmf-load", endpoint=hub.url, sample_grid=False)
    folder = tmp_path / "downloaded"
    for path, data in hub.files("alice/pmf-load").items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)

    def sample(pipe):
        generator = torch.Generator().manual_seed(3)
        return pipe(class_labels=[1, 2], generator=generator, output_type="pt").images

    expected = sample(tiny_pipe)
    assert torch.equal(sample(PMFPipeline.from_pretrained(folder)), expected)

    # diffusers copies the remote code into HF_MODULES_CACHE; keep that inside tmp_path.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
        patch.setattr(sys, "path", list(sys.path))
        for name in [name for name in sys.modules if name.startswith("diffusers_modules")]:
            patch.delitem(sys.modules, name)
        generic = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        by_name = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_pmf", trust_remote_code=True)
        by_path = DiffusionPipeline.from_pretrained(
            folder, custom_pipeline=str(folder / "pipeline_pmf.py"), trust_remote_code=True
        )
        for name in [name for name in sys.modules if name.startswith("diffusers_modules")]:
            patch.delitem(sys.modules, name)
    for pipe in (generic, by_name, by_path):
        assert type(pipe) is PMFPipeline  # with the package installed, the remote code hands over its class
        pipe.set_progress_bar_config(disable=True)
        assert torch.equal(sample(pipe), expected)


# ------------------------------------------------------------------------------------------------- errors


def test_no_token_is_a_clear_error(hub, monkeypatch, tiny_pipe):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPushError) as error:
        push_pipeline_to_hub(tiny_pipe, "alice/x", endpoint=hub.url)
    assert str(error.value) == "not logged in: run `hf auth login` or set HF_TOKEN"
    assert hub.requests == []


def test_rejected_token_is_one_line(hub, tiny_pipe):
    with pytest.raises(HubPushError, match=r"the Hub refused the push to alice/x: .*401.*hf auth whoami") as error:
        push_pipeline_to_hub(tiny_pipe, "alice/x", endpoint=hub.url, token="hf_wrong", sample_grid=False)
    assert "\n" not in str(error.value) and "hf_wrong" not in str(error.value)


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "bad name/x", "alice/repo.git", "-alice/x", "alice//x", ""])
def test_malformed_repo_id(hub, tiny_pipe, repo_id):
    with pytest.raises(HubPushError, match="malformed repo id") as error:
        push_pipeline_to_hub(tiny_pipe, repo_id, endpoint=hub.url)
    assert "\n" not in str(error.value)
    assert hub.requests == []


def test_not_a_pipeline_folder(hub, tmp_path, saved_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HubPushError, match="not a PMFPipeline folder: no model_index.json"):
        push_pipeline_to_hub(empty, "alice/x", endpoint=hub.url)
    with pytest.raises(HubPushError, match="is not a folder"):
        push_pipeline_to_hub(tmp_path / "missing", "alice/x", endpoint=hub.url)

    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(HubPushError, match="_class_name 'StableDiffusionPipeline', expected 'PMFPipeline'"):
        push_pipeline_to_hub(other, "alice/x", endpoint=hub.url)

    weights = saved_folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(HubPushError, match=r"no safetensors weights \(found diffusion_pytorch_model.bin: pickle"):
        push_pipeline_to_hub(saved_folder, "alice/x", endpoint=hub.url)

    with pytest.raises(HubPushError, match="expected a PMFPipeline"):
        push_pipeline_to_hub(object(), "alice/x", endpoint=hub.url)
    assert hub.requests == []


def test_offline_mode_is_a_clear_error(hub, monkeypatch, tiny_pipe):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        push_pipeline_to_hub(tiny_pipe, "alice/x", endpoint=hub.url)
    assert hub.requests == []


# ---------------------------------------------------------------------------------------------------- CLI


def run_push(argv):
    """`pmf push ARGV`: the exit status."""
    return main(["push", *argv])


def test_cli_dry_run_lists_files_and_sends_nothing(hub, monkeypatch, tmp_path, saved_folder, capsys):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    stage = tmp_path / "stage"
    status = run_push([str(saved_folder), "alice/pmf-dry", "--dry-run", "--staging-dir", str(stage)])
    out = capsys.readouterr().out
    assert status == 0
    assert hub.requests == []
    assert out.startswith("would upload 9 files")
    for name in STAGED_FILES:
        size = (stage / name).stat().st_size
        assert re.search(rf"^  {re.escape(name)}\s+\d", out, re.M), name
        assert size > 0
    assert "dry run: nothing was sent to the Hub" in out


def test_cli_push(hub, tmp_path, saved_folder, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    card_info = tmp_path / "card.json"
    card_info.write_text(json.dumps({"dataset": "toy", "recipe": {"batch_size": 8}}))
    argv = [
        str(saved_folder), "alice/pmf-cli", "--private", "--revision", "exp", "--commit-message", "via cli",
        "--token-file", str(token_file), "--card-info", str(card_info), "--base-model", "bob/pmf-base", "--no-samples",
    ]
    status = run_push(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert TOKEN not in captured.out + captured.err
    assert hub.repos["alice/pmf-cli"]["create"]["visibility"] == "private"
    assert hub.commits[0]["summary"] == "via cli" and hub.commits[0]["ref"] == "exp"
    card = ModelCard(hub.files("alice/pmf-cli", "exp")["README.md"].decode())
    assert card.data.base_model == "bob/pmf-base" and "| `batch_size` | 8 |" in card.text
    assert "uploaded 8 files" in captured.out and "commit: " in captured.out


def test_dry_run_checks_for_the_token_like_a_push(hub, monkeypatch, tmp_path, saved_folder, capsys):
    """A token pasted into the card fields is refused by a dry run as by a real push (issue 12, item 2)."""
    leaky = {"description": f"trained with token {TOKEN}"}
    with pytest.raises(HubPushError, match="refusing to upload: the access token appears in README.md"):
        push_pipeline_to_hub(saved_folder, "alice/x", card_info=leaky, dry_run=True, sample_grid=False)
    with pytest.raises(HubPushError, match="the access token appears in README.md"):  # the real push, the same
        push_pipeline_to_hub(saved_folder, "alice/x", card_info=leaky, endpoint=hub.url, sample_grid=False)

    # The CLI, with the token from --token-file and none in the environment.
    monkeypatch.delenv("HF_TOKEN")
    token_file, card_info = tmp_path / "token", tmp_path / "card.json"
    token_file.write_text(TOKEN)
    card_info.write_text(json.dumps(leaky))
    argv = [str(saved_folder), "alice/x", "--dry-run", "--no-samples", "--card-info", str(card_info)]
    assert run_push([*argv, "--token-file", str(token_file)]) == 2
    err = capsys.readouterr().err
    assert err == "pmf: error: refusing to upload: the access token appears in README.md\n"
    # Without any token there is nothing to leak: the dry run lists the files.
    assert run_push(argv) == 0 and "would upload 8 files" in capsys.readouterr().out
    assert hub.requests == []


def test_cli_errors_are_one_line(hub, monkeypatch, tmp_path, saved_folder, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert run_push([str(saved_folder), "alice/x"]) == 2
    err = capsys.readouterr().err
    assert err == "pmf: error: not logged in: run `hf auth login` or set HF_TOKEN\n"
    assert run_push([str(saved_folder), "not a repo"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert run_push([str(tmp_path), "alice/x", "--token-file", str(tmp_path / "none")]) == 2
    assert "cannot read the token file" in capsys.readouterr().err
    with pytest.raises(HubPushError):  # --debug: the exception propagates, for a traceback
        run_push([str(saved_folder), "alice/x", "--debug"])
    assert hub.requests == []


# --------------------------------------------------------------------------------------------- model cards


@pytest.mark.parametrize("preset_name", list(OFFICIAL_PRESETS))
def test_official_card(preset_name):
    preset = OFFICIAL_PRESETS[preset_name]
    card = render_model_card("official", repo_id="pmf/" + preset_name.replace("/", "-"), preset=preset_name, sample_grid=True)
    check_model_card(card)
    data = ModelCard(str(card)).data  # round trip through the YAML
    assert data.library_name == "diffusers" and data.pipeline_tag == "unconditional-image-generation"
    assert data.license == "mit" and data.datasets == ["ILSVRC/imagenet-1k"]
    assert {"pmf", "meanflow", "one-step", "pixel-space", "class-conditional", "diffusers", "imagenet"} <= set(data.tags)
    assert data.base_model is None
    text = card.text
    size = preset.sample_size
    assert f"| {preset_name} | {size}×{size} | 1 | {preset.fid:g} |" in text
    interval = f"[{preset.guidance_interval[0]:g}, {preset.guidance_interval[1]:g}]"
    assert f"| 1 | {preset.guidance_scale:g} | {interval} | {preset.noise_scale:g} |" in text
    assert "IS" not in text.split("## Results")[1].split("##")[0]  # no Inception Score is known: none invented
    assert "MIT license" in text and CITATION in text and "arXiv:2601.22158" in CITATION
    assert f"`{preset.filename}`" in text
    usage = text.index("## Usage")
    assert usage < text.index("## Samples") < text.index("## Results")
    assert text.index("pip install diffusers torch") > usage and "pip install pmf-diffusers" not in text
    assert "from pmf_diffusers import PMFPipeline" in text
    assert f'pipe = PMFPipeline.from_pretrained("{"pmf/" + preset_name.replace("/", "-")}")' in text
    assert "image = pipe(class_labels=[207]).images[0]" in text
    assert f'DiffusionPipeline.from_pretrained("{"pmf/" + preset_name.replace("/", "-")}", trust_remote_code=True)' in text
    assert ("7.5, interval [0.1, 0.8]" in text) == (preset_name == "pMF-B/16")
    assert "{{" not in text and "{%" not in text


def test_trained_card_with_recipe():
    recipe = {"optimizer": "muon", "lr": 1e-3, "batch_size": 256, "ema": {"decay": 0.9999}, "betas": [0.9, 0.95]}
    card = render_model_card(
        "trained", repo_id="alice/pmf-toy", resolution=32, num_classes=10, dataset="procedural toy shapes",
        training_steps=20000, recipe=recipe, command="accelerate launch examples/train_pmf.py --max-steps 20000",
        metrics={"FID-10K": 12.5}, guidance_scale=2.0, guidance_interval=(0.1, 0.9), noise_scale=1.0,
    )
    check_model_card(card)
    data = ModelCard(str(card)).data
    assert data.license == "mit" and data.base_model is None and data.datasets is None
    assert "imagenet" not in data.tags
    text = card.text
    for row in ("| `optimizer` | muon |", "| `lr` | 0.001 |", "| `batch_size` | 256 |", "| `ema.decay` | 0.9999 |",
                "| `betas` | 0.9, 0.95 |", "| training steps | 20000 |", "| dataset | procedural toy shapes |",
                "| `FID-10K` | 12.5 |", "| 1 | 2 | [0.1, 0.9] | 1 |"):
        assert row in text, row
    assert "```bash\naccelerate launch examples/train_pmf.py --max-steps 20000\n```" in text
    assert "trained from scratch" in text and "## Samples" not in text
    assert text.index("pip install diffusers torch") < text.index("## Training") and "pip install pmf-diffusers" not in text
    assert 'PMFPipeline.from_pretrained("alice/pmf-toy")' in text and "class_labels=[0]" in text


def test_finetune_card_has_base_model():
    card = render_model_card(
        "trained", repo_id="alice/pmf-b16-flowers", resolution=256, num_classes=102, base_model="pmf/pMF-B-16",
        datasets=["nelorth/oxford-flowers"], license="cc-by-nc-4.0", training_steps=3000, tags=["flowers"],
    )
    check_model_card(card)
    data = ModelCard(str(card)).data
    assert data.base_model == "pmf/pMF-B-16" and data.base_model_relation == "finetune"
    assert data.license == "cc-by-nc-4.0" and data.datasets == ["nelorth/oxford-flowers"]
    assert "flowers" in data.tags and "pmf" in data.tags
    assert "fine-tuned from [pmf/pMF-B-16](https://huggingface.co/pmf/pMF-B-16)" in card.text


@pytest.mark.parametrize(
    ("kind", "info", "message"),
    [
        ("lora", {"repo_id": "a/b"}, "unknown model-card kind"),
        ("official", {"repo_id": "a/b"}, "needs preset"),
        ("official", {"repo_id": "a/b", "preset": "pMF-X/8"}, "Unknown pMF size"),
        ("official", {"repo_id": "a/b", "preset": "B/16", "base_model": "x/y"}, "unknown model-card field"),
        ("trained", {"repo_id": "a/b", "resolution": 32}, "needs num_classes"),
        ("trained", {"repo_id": "a/b", "resolution": 32, "num_classes": 4, "license": "My License"}, "not a Hub license id"),
        ("trained", {"repo_id": "a/b", "resolution": 32, "num_classes": 4, "base_model": "not a repo"}, "not a Hub repo id"),
        ("trained", {"resolution": 32, "num_classes": 4}, "needs repo_id"),
    ],
)
def test_card_errors(kind, info, message):
    with pytest.raises(HubPushError, match=message) as error:
        render_model_card(kind, **info)
    assert "\n" not in str(error.value)


def test_card_kind_is_detected_from_the_pipeline():
    """A pipeline with a released size's shapes and noise scale gets the official card, unless training fields
    say it is a fine-tune (built on the meta device: no memory, no weights)."""
    from pmf_diffusers import load_imagenet_id2label

    with torch.device("meta"):
        transformer = PMFTransformer2DModel(
            sample_size=512, patch_size=32, num_layers=24, num_attention_heads=16, attention_head_dim=64,
            mlp_hidden_dim=2730, with_v_head=False,
        )
    pipe = PMFPipeline(transformer, PMFScheduler(noise_scale=4.0), id2label=load_imagenet_id2label(),
                       default_guidance_scale=7.5, default_guidance_interval=(0.2, 0.6))
    kind, preset, fields = _card_context(pipe, "pmf/l32", None, None)
    assert (kind, preset.name) == ("official", "pMF-L/32")
    assert fields["example_label"] == "golden retriever" and fields["num_parameters"] > 4e8
    card = render_model_card(kind, **fields)
    assert "| 1 | 7.5 | [0.2, 0.6] | 4 |" in card.text and "Parameters (inference): 41" in card.text

    kind, preset, _ = _card_context(pipe, "pmf/l32", None, {"base_model": "pmf/l32-official"})
    assert (kind, preset) == ("trained", None)
    pipe.scheduler.register_to_config(noise_scale=1.0)  # not a released configuration any more
    assert _card_context(pipe, "pmf/l32", None, None)[0] == "trained"
    with pytest.raises(HubPushError, match="matches none of"):
        _card_context(pipe, "pmf/l32", "official", None)
