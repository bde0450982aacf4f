"""Docs that run: every ```python and ```bash block of README.md, docs/*.md and spaces_app/README.md either runs
here (offline, on the CPU) or carries a marker saying why it cannot.

A marker is an HTML comment (invisible on GitHub and the Hub) on the line right before the opening fence:

    <!-- docs-test: skip (REASON) -->        not run (a python block is still compiled, so its syntax is checked)
    <!-- docs-test: given pipe = bundled --> python: `pipe` is the bundled model (`given pipe = pmf-b16`: the
                                             stand-in below) — for blocks that continue from the text around them
    <!-- docs-test: file NAME -->            any block: its text is written to NAME in the scratch folder before
                                             the file's blocks run (e.g. the example `labels.txt`)

Directives combine with ";". An unmarked block that fails fails the test.

The blocks of one doc file run in order in one scratch folder, which holds
* `pmf-b16/` (also as `pmf-b-16/`): a stand-in for the folder `pmf convert pMF-B/16 pmf-b16` writes, since the
  released weights need the Hub: a tiny random `PMFPipeline` with the 1000 ImageNet classes and pMF-B/16's sampling
  settings, so the blocks that load that folder run as written (their images are noise);
* copies of the repository's `examples/`, `benchmarks/` and `spaces_app/`, so the paths in commands resolve.
Python blocks run in this process, each in a fresh namespace; bash blocks run with `bash -euo pipefail`, offline
(`HF_HUB_OFFLINE=1`), with this interpreter's bin folder first on PATH (`pmf`, `python`, `accelerate`), and are
ended after BASH_TIMEOUT_S (a block that long needs a skip marker).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted(
    [REPO_ROOT / "README.md", REPO_ROOT / "spaces_app" / "README.md", *(REPO_ROOT / "docs").glob("*.md")]
)
RUN_LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
GIVEN = {"bundled", "pmf-b16"}
STAND_IN_NAMES = ("pmf-b16", "pmf-b-16")
COPIED_FOLDERS = ("examples", "benchmarks", "spaces_app")
BASH_TIMEOUT_S = 120


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str  # the fence's info string, lower case
    code: str
    skip: str | None = None
    given: dict[str, str] = field(default_factory=dict)
    file: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"

    @property
    def runner(self) -> str | None:
        return RUN_LANGUAGES.get(self.language)


def _apply_marker(block: Block, body: str) -> list[str]:
    """Set the marker's directives on `block`; returns the problems found."""
    problems, directives, depth, current = [], [], 0, ""
    for char in body:  # split at ";" outside parentheses (a skip reason may contain ";")
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == ";" and depth == 0:
            directives.append(current)
            current = ""
        else:
            current += char
    for directive in (part.strip() for part in [*directives, current]):
        if match := re.fullmatch(r"skip\s*\((?P<reason>.+)\)", directive, flags=re.S):
            block.skip = match["reason"].strip()
        elif match := re.fullmatch(r"given\s+(?P<name>[A-Za-z_]\w*)\s*=\s*(?P<source>\S+)", directive):
            if match["source"] not in GIVEN:
                problems.append(f"unknown source {match['source']!r} in {directive!r} (known: {sorted(GIVEN)})")
            block.given[match["name"]] = match["source"]
        elif match := re.fullmatch(r"file\s+(?P<name>[\w./-]+)", directive):
            block.file = match["name"]
        else:
            problems.append(f"unknown directive {directive!r} (known: skip (REASON), given NAME = SOURCE, file NAME)")
    if block.given and block.runner != "python":
        problems.append("`given` applies to python blocks only")
    return problems


def parse_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced code blocks of a Markdown file with their markers, and the problems with the markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, problems = [], []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            if MARKER.match(lines[index]) and not (index + 1 < len(lines) and FENCE.match(lines[index + 1])):
                where = f"{path.relative_to(REPO_ROOT)}:{index + 1}"
                problems.append(f"{where}: a docs-test marker must stand right before a code fence")
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body, index = [], index + 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][indent:] if lines[index][:indent].strip() == "" else lines[index].lstrip())
            index += 1
        start = index - len(body)  # 1-based line of the opening fence
        block = Block(path, start, opening["info"].lower(), "\n".join(body) + "\n")
        marker = MARKER.match(lines[start - 2]) if start >= 2 else None
        if marker:
            problems += [f"{block.id}: {problem}" for problem in _apply_marker(block, marker["body"])]
        blocks.append(block)
        index += 1  # past the closing fence
    return blocks, problems


def all_blocks() -> list[Block]:
    return [block for path in DOC_FILES for block in parse_blocks(path)[0]]


def runnable_blocks() -> list[Block]:
    return [block for block in all_blocks() if block.runner]


def test_doc_markers_are_well_formed():
    problems = [problem for path in DOC_FILES for problem in parse_blocks(path)[1]]
    assert not problems, "\n".join(problems)
    assert any(block.runner and not block.skip for block in all_blocks())  # the parser does find runnable blocks


# ------------------------------------------------------------------------------------------------ scratch folders
def _stand_in_pipeline(path: Path) -> Path:
    """A tiny random pMF with the ImageNet classes and pMF-B/16's sampling settings (see the module docstring)."""
    import torch

    from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel, load_imagenet_id2label
    from pmf_diffusers.official import OFFICIAL_NUM_CLASSES, resolve_preset

    preset = resolve_preset("pMF-B/16")
    generator = torch.Generator().manual_seed(0)
    transformer = PMFTransformer2DModel(
        sample_size=32, patch_size=16, num_layers=1, num_head_layers=1, num_attention_heads=2, attention_head_dim=8,
        mlp_hidden_dim=32, bottleneck_dim=8, num_classes=OFFICIAL_NUM_CLASSES, frequency_embedding_dim=16,
        with_v_head=False,
    )
    with torch.no_grad():  # zero-initialised gates would make every image the same
        for parameter in transformer.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    pipe = PMFPipeline(
        transformer=transformer,
        scheduler=PMFScheduler(noise_scale=preset.noise_scale),
        id2label=load_imagenet_id2label(),
        default_guidance_scale=preset.guidance_scale,
        default_guidance_interval=preset.guidance_interval,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stand_in_b16(tmp_path_factory) -> Path:
    return _stand_in_pipeline(tmp_path_factory.mktemp("stand_in") / "pmf-b16")


_SCRATCH: dict[Path, Path] = {}


@pytest.fixture
def scratch(request, stand_in_b16, tmp_path_factory):
    """The scratch folder of the block's doc file (made once per file, shared by its blocks in order)."""

    def folder_for(doc: Path) -> Path:
        if doc not in _SCRATCH:
            folder = tmp_path_factory.mktemp("docs_" + re.sub(r"\W+", "_", str(doc.relative_to(REPO_ROOT))))
            for name in STAND_IN_NAMES:
                (folder / name).symlink_to(stand_in_b16, target_is_directory=True)
            for name in COPIED_FOLDERS:  # copies: a command that writes there must not touch the repository
                shutil.copytree(REPO_ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
            for block in parse_blocks(doc)[0]:
                if block.file:
                    (folder / block.file).parent.mkdir(parents=True, exist_ok=True)
                    (folder / block.file).write_text(block.code, encoding="utf-8")
            _SCRATCH[doc] = folder
        return _SCRATCH[doc]

    return folder_for


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _run_python(block: Block, folder: Path, monkeypatch) -> None:
    monkeypatch.chdir(folder)
    namespace = {"__name__": "__docs_test__"}
    for name, source in block.given.items():
        loader = "load_bundled_pipeline()" if source == "bundled" else f"PMFPipeline.from_pretrained({source!r})"
        exec(f"from pmf_diffusers import PMFPipeline, load_bundled_pipeline\n{name} = {loader}", namespace)
    exec(compile(block.code, block.id, "exec"), namespace)


def _run_bash(code: str, folder: Path, label: str) -> tuple[str, str]:
    """Run a bash block in its own process group, so that a timeout ends every process it started."""
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=folder, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=BASH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{label} ran longer than {BASH_TIMEOUT_S} s: mark it `skip (REASON)`\n{code}")
    assert process.returncode == 0, (
        f"{label} failed (exit {process.returncode}):\n{code}\n--- stdout\n{stdout[-3000:]}\n"
        f"--- stderr\n{stderr[-3000:]}"
    )
    return stdout, stderr


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda block: block.id)
def test_doc_block_runs(block: Block, scratch, monkeypatch):
    if block.runner == "python":
        compile(block.code, block.id, "exec")  # skipped blocks too: at least the syntax holds
    if block.skip:
        pytest.skip(block.skip)
    folder = scratch(block.path)
    if block.runner == "python":
        _run_python(block, folder, monkeypatch)
    else:
        _run_bash(block.code, folder, block.id)


# ------------------------------------------------------------------------------------- the README's two commands
def _two_commands() -> tuple[str, list[str]]:
    """(command 1, the lines of command 2) from the first bash block under the README's "Two commands"."""
    readme = REPO_ROOT / "README.md"
    heading = readme.read_text(encoding="utf-8").splitlines().index("## Two commands") + 1
    block = next(b for b in parse_blocks(readme)[0] if b.line > heading and b.language == "bash")
    lines = [line.strip() for line in block.code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines[0], lines[1:]


def test_ci_runs_the_readmes_command_2_verbatim():
    _, command_2 = _two_commands()
    assert any("pytest" in line for line in command_2) and any("lpips" in line for line in command_2)
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    positions = [ci_lines.index(line) if line in ci_lines else None for line in command_2]
    assert None not in positions, f".ci/run does not run these README lines verbatim: {command_2}"
    assert positions == sorted(positions), ".ci/run runs the README's command 2 lines out of order"


def test_readme_command_1_generates_from_the_bundled_model(tmp_path):
    command_1, _ = _two_commands()
    install, generate = (part.strip() for part in command_1.split("&&"))
    assert shlex.split(install) == ["pip", "install", "-e", "."]  # the rest is what the install gives you
    _run_bash(generate, tmp_path, "README command 1")
    output = tmp_path / shlex.split(generate)[shlex.split(generate).index("--output") + 1]
    images = sorted(path.name for path in output.glob("*.png"))
    assert "grid.png" in images and len(images) == 1 + 4, images  # --class-labels 0 1 2 3: four samples + grid
