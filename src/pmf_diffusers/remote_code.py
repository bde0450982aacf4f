# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Remote code: what lets diffusers' generic loader load a `PMFPipeline` folder, with or without this package.

diffusers loads a pipeline that is not part of diffusers from code shipped next to the weights: a list-form
`_class_name` in `model_index.json` (`["pipeline_pmf", "PMFPipeline"]`) names a module file at the folder's root,
and a component entry `["pipeline_pmf", "PMFTransformer2DModel"]` names a module file in the component's folder.
Every folder this package writes (`save_pretrained`, `pmf convert`, training exports, `pmf push`, the bundled
model) carries that code, so

    DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)

returns a `PMFPipeline`. diffusers asks for `trust_remote_code=True` for any folder with code, local or on the Hub.

The code is *generated* here, at save/push time, from this package's own source: [`remote_code_source`] inlines
the pipeline module and the package modules it imports (labels, model, scheduler) into one self-contained module
and leaves out what needs the package (the LoRA adapter loader, single-file conversion, this module's saving and
loading hooks). The same module is written to the root and to each component folder: diffusers then imports one
module for all three classes, and a guard in it keeps the classes it made first when diffusers executes it again
for the next component, so the pipeline, the model and the scheduler agree on their classes.

With pmf-diffusers installed, the generated module hands diffusers the installed classes instead (one class for
both loaders, and LoRA adapters), after [`installed_classes`] checks its format marker: code of an older format is
refused with what to do. `PMFPipeline.from_pretrained` never executes code from a folder ([`PMFRemoteCodeMixin`]).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from diffusers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "PMFRemoteCodeMixin",
    "REMOTE_CODE_FILENAME",
    "REMOTE_CODE_FORMAT",
    "REMOTE_CODE_MODULE",
    "RemoteCodeGenerationError",
    "RemoteCodeVersionError",
    "installed_classes",
    "pipeline_class_name",
    "remote_code_files",
    "remote_code_source",
    "write_remote_code",
]

# Bumped whenever generated code and this package stop agreeing on a folder (a renamed class, a new required file,
# a changed config meaning). The installed package uses only remote code of its own format.
REMOTE_CODE_FORMAT = 1
# The stem of the generated module file; diffusers imports it as a module of this name.
REMOTE_CODE_MODULE = "pipeline_pmf"
REMOTE_CODE_FILENAME = f"{REMOTE_CODE_MODULE}.py"
PIPELINE_CLASS = "PMFPipeline"
# The pipeline's components whose classes the generated module provides, and the package modules that define them.
COMPONENT_CLASSES = {
    "transformer": ("PMFTransformer2DModel", "models.transformer_pmf"),
    "scheduler": ("PMFScheduler", "schedulers.scheduling_pmf"),
}
_COMPONENT_CLASS_NAMES = {class_name for class_name, _ in COMPONENT_CLASSES.values()}
# The package module the generated code starts from; the package modules it imports are inlined.
_ENTRY_MODULE = "pipelines.pipeline_pmf"
# Package modules whose names the remote code leaves out. Their names may only be used as base classes (mixins),
# which are dropped: the LoRA adapter loader and single-file conversion need the package (and peft); this module
# holds the package-side saving/loading hooks.
_PACKAGE_ONLY_MODULES = ("loaders", "remote_code")
_PACKAGE_DIR = Path(__file__).resolve().parent
_SECTION_RULE = "# " + "-" * 116


class RemoteCodeGenerationError(RuntimeError):
    """The package source uses something the generator cannot carry into remote code (a bug in the package)."""


class RemoteCodeVersionError(ValueError):
    """Remote code of a format the installed pmf-diffusers does not use; the message says what to do."""


# ------------------------------------------------------------------------------------------------- generation


@dataclass
class _Module:
    """One package module being inlined: its source, parse tree and the edits that make it self-contained."""

    name: str  # dotted, relative to the package: "pipelines.pipeline_pmf"
    path: Path
    source: bytes
    tree: ast.Module
    future_features: set[str] = field(default_factory=set)
    edits: list[tuple[int, int, bytes]] = field(default_factory=list)  # (start, end, replacement) byte offsets
    dropped_names: dict[str, str] = field(default_factory=dict)  # name -> package-only module it came from

    def __post_init__(self):
        self._line_starts = [0]
        for line in self.source.splitlines(keepends=True):
            self._line_starts.append(self._line_starts[-1] + len(line))

    @property
    def display_path(self) -> str:
        return "pmf_diffusers/" + self.path.relative_to(_PACKAGE_DIR).as_posix()

    def offset(self, lineno: int, col_offset: int) -> int:
        return self._line_starts[lineno - 1] + col_offset  # ast column offsets count UTF-8 bytes

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def text(self, node: ast.AST) -> str:
        start, end = self.span(node)
        return self.source[start:end].decode()

    def where(self, node: ast.AST) -> str:
        return f"{self.display_path}:{node.lineno}"

    def replace_statement(self, node: ast.stmt, replacement: str = "") -> None:
        """Replace the whole lines of a top-level statement (which must stand on lines of its own)."""
        start, end = self.span(node)
        line_end = self._line_starts[node.end_lineno] if node.end_lineno < len(self._line_starts) else len(self.source)
        rest_of_line = self.source[end:line_end].strip()
        if node.col_offset != 0 or (rest_of_line and not rest_of_line.startswith(b"#")):
            raise RemoteCodeGenerationError(f"{self.where(node)}: put this statement on lines of its own")
        self.edits.append((start, line_end, replacement.encode()))

    def edited_source(self) -> str:
        source, previous_start = self.source, len(self.source) + 1
        for start, end, replacement in sorted(self.edits, reverse=True):
            if end > previous_start:
                raise RemoteCodeGenerationError(f"{self.display_path}: overlapping edits")
            source = source[:start] + replacement + source[end:]
            previous_start = start
        return source.decode()


def _module_file(name: str) -> Path:
    base = _PACKAGE_DIR.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise RemoteCodeGenerationError(f"no package module pmf_diffusers.{name}")


def _is_package_only(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in _PACKAGE_ONLY_MODULES)


def _imported_module(module: _Module, node: ast.ImportFrom) -> str | None:
    """The package module (relative to the package) that `node` imports from, or `None` for another library."""
    if node.level == 0:
        if node.module == "pmf_diffusers" or (node.module or "").startswith("pmf_diffusers."):
            return node.module.removeprefix("pmf_diffusers").lstrip(".")
        return None
    package = module.name.split(".")
    if module.path.name != "__init__.py":
        package = package[:-1]
    if node.level - 1 > len(package):
        raise RemoteCodeGenerationError(f"{module.where(node)}: relative import beyond the package")
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _top_level_bindings(module: _Module) -> dict[str, str]:
    """Each name the module binds at its top level, and what it binds it to: the imported object for an import of
    another library (`typing.Any`), else the text of the binding statement. Package imports are left out."""
    bindings = {}
    for statement in module.tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bindings[statement.name] = module.text(statement)
        elif isinstance(statement, ast.Import):
            for alias in statement.names:
                imported = alias.name if alias.asname else alias.name.split(".")[0]  # `import a.b` binds `a`
                bindings[alias.asname or imported] = f"import {imported}"
        elif isinstance(statement, ast.ImportFrom) and _imported_module(module, statement) is None:
            for alias in statement.names:
                bindings[alias.asname or alias.name] = f"from {statement.module} import {alias.name}"
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            for target in targets:
                for node in ast.walk(target):
                    if isinstance(node, ast.Name):
                        bindings[node.id] = module.text(statement)
    return bindings


def _load_module(name: str) -> _Module:
    path = _module_file(name)
    source = path.read_bytes()
    return _Module(name=name, path=path, source=source, tree=ast.parse(source, filename=str(path)))


def _prepare(module: _Module, dependencies: list[str], is_entry: bool) -> None:
    """Record the edits that make `module` self-contained and the package modules it needs inlined before it."""
    body = module.tree.body
    docstring = body[0] if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else None
    if docstring is not None and isinstance(docstring.value.value, str) and not is_entry:
        module.replace_statement(docstring)
    for statement in body:
        if isinstance(statement, ast.ImportFrom) and statement.module == "__future__":
            module.future_features.update(alias.name for alias in statement.names)
            module.replace_statement(statement)
        elif isinstance(statement, ast.ImportFrom) and (target := _imported_module(module, statement)) is not None:
            if _is_package_only(target):
                module.dropped_names.update({alias.asname or alias.name: target for alias in statement.names})
                module.replace_statement(statement)
                continue
            if _module_file(target).name == "__init__.py":
                raise RemoteCodeGenerationError(
                    f"{module.where(statement)}: import from the defining module, not the package {target!r}"
                )
            dependencies.append(target)
            # The names are defined by the inlined module above; an alias becomes an assignment.
            aliases = "".join(f"{alias.asname} = {alias.name}\n" for alias in statement.names if alias.asname)
            module.replace_statement(statement, aliases)
        elif isinstance(statement, ast.Import) and any(a.name.startswith("pmf_diffusers") for a in statement.names):
            raise RemoteCodeGenerationError(f"{module.where(statement)}: use `from ... import` for package modules")
        elif isinstance(statement, ast.Assign) and [getattr(t, "id", None) for t in statement.targets] == ["__all__"]:
            module.replace_statement(statement)  # the generated module exports by class name, not `import *`

    # Nested imports of package modules (inside functions) would fail in remote code.
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom) and node not in body and _imported_module(module, node) is not None:
            raise RemoteCodeGenerationError(
                f"{module.where(node)}: a package import inside a function cannot be carried into remote code; "
                "move the code that needs it into a package-only mixin (see pmf_diffusers.remote_code)"
            )

    # Names of package-only modules: allowed as base classes only, which are dropped.
    removed_bases = set()
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.ClassDef):
            continue
        kept = [base for base in node.bases if not (isinstance(base, ast.Name) and base.id in module.dropped_names)]
        if len(kept) == len(node.bases):
            continue
        removed_bases.update(id(base) for base in node.bases if base not in kept)
        arguments = kept + node.keywords
        first, last = node.bases[0], max(node.bases + node.keywords, key=lambda n: (n.end_lineno, n.end_col_offset))
        start, _ = module.span(first)
        _, end = module.span(last)
        module.edits.append((start, end, ", ".join(module.text(argument) for argument in arguments).encode()))
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Name) and node.id in module.dropped_names and id(node) not in removed_bases:
            raise RemoteCodeGenerationError(
                f"{module.where(node)}: {node.id} (from pmf_diffusers.{module.dropped_names[node.id]}) is package-only "
                "and may only be used as a base class (a mixin) in code that remote code carries"
            )


def _section(module: _Module) -> str:
    """The module's edited source from its first statement on (leading comments such as the copyright dropped)."""
    text = module.edited_source()
    lines = text.splitlines(keepends=True)
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("#")):
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "".join(lines)


def _check_collisions(modules: list[_Module]) -> None:
    """Two inlined modules may bind the same top-level name only to the same thing (e.g. the same import, or the same
    `logger = logging.get_logger(__name__)`): the generated module is one namespace."""
    bound: dict[str, tuple[_Module, str]] = {}
    for module in modules:
        for name, binding in _top_level_bindings(module).items():
            if name == "__all__":
                continue
            if name in bound and bound[name][1] != binding:
                raise RemoteCodeGenerationError(
                    f"{module.display_path} and {bound[name][0].display_path} both define {name!r}: remote code "
                    "inlines them into one module, so rename one of them"
                )
            bound[name] = (module, binding)


_HEADER = """\
# Generated by pmf-diffusers {version} from its own source. Do not edit: `pipe.save_pretrained(folder)` and
# `pmf push` write it again. MIT License. The package modules inlined below, in this order:
{sources}
#
# diffusers' generic loader imports this module for a PMFPipeline folder or Hub repo (the same file sits at the
# root and in each component folder):
#     DiffusionPipeline.from_pretrained("<folder or namespace/name>", trust_remote_code=True)
# It needs only diffusers and torch. With pmf-diffusers installed, the installed classes are used (see the end).
"""

_GUARD_START = """\
# diffusers executes this module again for every component it loads; the second and later runs of the same code keep
# the classes of the first, so that the pipeline, the model and the scheduler agree on their classes.
PMF_REMOTE_CODE_HASH = "{digest}"
_pmf_previous_run = dict(globals()) if globals().get("_pmf_loaded_hash") == PMF_REMOTE_CODE_HASH else None
"""

_FOOTER = """\
{rule}
# With pmf-diffusers installed, diffusers gets the installed classes instead of the copies above: one class for both
# loaders, plus what only the package has (LoRA adapters, single-file loading). The package checks the format first.
{rule}
def _pmf_installed_classes():
    try:
        remote_code = importlib.import_module("pmf_diffusers.remote_code")
    except ImportError:  # diffusers and torch only: the classes above are used
        return {{}}
    return remote_code.installed_classes(PMF_REMOTE_CODE_FORMAT, PMF_DIFFUSERS_VERSION)


globals().update(_pmf_installed_classes())
if _pmf_previous_run is not None:
    globals().update(_pmf_previous_run)
_pmf_loaded_hash = PMF_REMOTE_CODE_HASH
"""


@functools.lru_cache(maxsize=1)
def _generate(version: str) -> str:
    modules: dict[str, _Module] = {}
    order: list[_Module] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in stack:
            raise RemoteCodeGenerationError(f"import cycle: {' -> '.join(stack + (name,))}")
        if name in modules:
            return
        module = modules[name] = _load_module(name)
        dependencies: list[str] = []
        _prepare(module, dependencies, is_entry=name == _ENTRY_MODULE)
        for dependency in dict.fromkeys(dependencies):
            visit(dependency, stack + (name,))
        order.append(module)

    visit(_ENTRY_MODULE, ())
    for class_name, package_module in COMPONENT_CLASSES.values():
        if package_module not in modules:
            raise RemoteCodeGenerationError(f"{_ENTRY_MODULE} no longer imports {package_module} ({class_name})")
    _check_collisions(order)

    future = sorted(set().union(*(module.future_features for module in order)))
    body = "".join(
        f"\n\n{_SECTION_RULE}\n# {module.display_path}\n{_SECTION_RULE}\n{_section(module)}\n" for module in order
    )
    digest = hashlib.sha256(f"{version}\n{REMOTE_CODE_FORMAT}\n{body}".encode()).hexdigest()
    parts = [
        _HEADER.format(version=version, sources="\n".join(f"#   {module.display_path}" for module in order)),
        f"from __future__ import {', '.join(future)}\n" if future else "",
        "\nimport importlib\n\n",
        f'PMF_DIFFUSERS_VERSION = "{version}"\n',
        f"PMF_REMOTE_CODE_FORMAT = {REMOTE_CODE_FORMAT}\n\n",
        _GUARD_START.format(digest=digest),
        body,
        "\n",
        _FOOTER.format(rule=_SECTION_RULE),
    ]
    source = "".join(parts)
    # A generator bug should fail here, not in a user's loader.
    for node in ast.walk(ast.parse(source, filename=REMOTE_CODE_FILENAME)):
        imported = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        imported += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if getattr(node, "level", 0) or any(name.split(".")[0] == "pmf_diffusers" for name in imported):
            raise RemoteCodeGenerationError(f"the generated module still imports the package (line {node.lineno})")
    return source


def remote_code_source() -> str:
    """The generated, self-contained module (the text of `pipeline_pmf.py`)."""
    from . import __version__

    return _generate(__version__)


# ------------------------------------------------------------------------------------------------ folders


def _entry_class(entry) -> str | None:
    """The class name of a `model_index.json` entry `[library, class]`, else `None`."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def pipeline_class_name(index: dict) -> str | None:
    """The pipeline class a `model_index.json` names, in the plain or the list (remote-code) form."""
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    return _entry_class(class_name) if isinstance(class_name, (list, tuple)) else class_name


def remote_code_files(index: dict) -> list[str]:
    """Paths (relative to the folder) where a pipeline with this `model_index.json` carries the generated module."""
    files = [REMOTE_CODE_FILENAME]
    for component, (class_name, _) in COMPONENT_CLASSES.items():
        if _entry_class(index.get(component)) == class_name:
            files.append(f"{component}/{REMOTE_CODE_FILENAME}")
    return files


def package_shim_source() -> str:
    """The module written into the folders that ship inside the package (the bundled models): those are only reachable
    with pmf-diffusers installed, so their loader code is the installed package itself rather than a generated copy
    that would have to be regenerated on every source change."""
    lines = [
        "# Loader code of a model bundled with pmf-diffusers: it ships inside the installed package, so diffusers'",
        "# generic loader gets the package's own classes (DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)).",
        f"from pmf_diffusers.{_ENTRY_MODULE} import {PIPELINE_CLASS}  # noqa: F401",
    ]
    lines += [
        f"from pmf_diffusers.{package_module} import {class_name}  # noqa: F401"
        for class_name, package_module in COMPONENT_CLASSES.values()
    ]
    return "\n".join(lines) + "\n"


def write_remote_code(folder: str | os.PathLike, self_contained: bool = True) -> list[str]:
    """Make a saved `PMFPipeline` folder loadable with `DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)`: write the generated module to the root and to the model and scheduler folders, and
    point `model_index.json` at it. Safe to run again; also upgrades folders written by older versions.
    `self_contained=False` writes the package shim instead (for the models bundled inside the package).

    Returns the files written (relative to `folder`).
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no model_index.json: save the pipeline first") from None
    if pipeline_class_name(index) != PIPELINE_CLASS:
        raise ValueError(f"{folder} holds a {pipeline_class_name(index)!r}, not a {PIPELINE_CLASS}")
    source = remote_code_source() if self_contained else package_shim_source()
    written = remote_code_files(index)
    for relative in written:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(source, encoding="utf-8")
    index["_class_name"] = [REMOTE_CODE_MODULE, PIPELINE_CLASS]
    for component, (class_name, _) in COMPONENT_CLASSES.items():
        if _entry_class(index.get(component)) == class_name:
            index[component] = [REMOTE_CODE_MODULE, class_name]
    # Written the way diffusers writes it (ConfigMixin.to_json_string).
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


# ----------------------------------------------------------------------------------------- installed package


def installed_classes(remote_code_format: int, remote_code_version: str) -> dict[str, type]:
    """Called by generated remote code when pmf-diffusers is installed: the installed pipeline, model and scheduler
    classes to use instead of the generated copies, or `{}` to keep the copies (code newer than this package).

    Raises:
        RemoteCodeVersionError: for remote code of an older format, with what to do.
    """
    from . import __version__

    if remote_code_format > REMOTE_CODE_FORMAT:
        logger.warning(
            f"This folder's remote code comes from pmf-diffusers {remote_code_version}, newer than the installed "
            f"{__version__}: using the folder's own code (upgrade pmf-diffusers to use the installed classes)."
        )
        return {}
    if remote_code_format < REMOTE_CODE_FORMAT:
        raise RemoteCodeVersionError(
            f"This folder's remote code was generated by pmf-diffusers {remote_code_version} (remote-code format "
            f"{remote_code_format}); the installed pmf-diffusers {__version__} uses format {REMOTE_CODE_FORMAT}. "
            "Load it without remote code: `PMFPipeline.from_pretrained(...)`, or regenerate its code with "
            "pmf-diffusers: `pipe.save_pretrained(folder)`, or `pmf push` for a Hub repo."
        )
    from .pipelines.pipeline_pmf import PMFPipeline

    classes = {PIPELINE_CLASS: PMFPipeline}
    for class_name, package_module in COMPONENT_CLASSES.values():
        classes[class_name] = getattr(importlib.import_module(f"{__package__}.{package_module}"), class_name)
    return classes


def _package_class(class_name: str) -> type:
    for name, package_module in COMPONENT_CLASSES.values():
        if name == class_name:
            return getattr(importlib.import_module(f"{__package__}.{package_module}"), class_name)
    raise KeyError(class_name)


class PMFRemoteCodeMixin:
    """`PMFPipeline`'s side of the remote code: saving writes it, loading never runs it.

    * `save_pretrained` (through `save_config`, which diffusers calls after the components are saved and before a
      `push_to_hub` upload) writes the generated module and the list-form `model_index.json` ([`write_remote_code`]).
    * `from_pretrained` reads `model_index.json` with every pMF entry resolved to this package's classes, whatever
      the folder says (remote-code form, or the `pmf_diffusers.models.transformer_pmf` entries of earlier versions);
      a component defined by other code in the folder, and `custom_pipeline`, are refused.
    * `from_pretrained` reads safetensors weights only (a local folder whose component weights are pickles is refused
      before anything loads, whatever `use_safetensors` says), and refuses loaded weights with NaN or infinite values.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if kwargs.get("custom_pipeline") is not None:
            raise ValueError(
                f"{cls.__name__}.from_pretrained runs no code from a model folder, so `custom_pipeline` is not "
                "accepted: use DiffusionPipeline.from_pretrained(..., custom_pipeline=..., trust_remote_code=True)."
            )
        from .loaders.safe_weights import check_no_pickle_weights, non_finite_tensor_names

        loader = f"{cls.__name__}.from_pretrained"
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            for component in COMPONENT_CLASSES:
                check_no_pickle_weights(folder / component, loader)
        # Safetensors only: diffusers would otherwise fall back to pickle weights (of a Hub repo, too).
        kwargs["use_safetensors"] = True
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)

        # A NaN or inf weight would give black or noise images without a word.
        for component in COMPONENT_CLASSES:
            module = getattr(pipeline, component, None)
            if not hasattr(module, "state_dict"):
                continue
            non_finite = non_finite_tensor_names(module.state_dict().items())
            if non_finite:
                raise ValueError(
                    f"{pretrained_model_name_or_path}/{component} has NaN or infinite weights in {len(non_finite)} "
                    f"tensor(s), e.g. {', '.join(non_finite[:3])}: the files are corrupt or come from a diverged "
                    "training run. Load another checkpoint (or export the pipeline again from a good one)."
                )
        return pipeline

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # Both `download` (Hub repos) and `load_config` read model_index.json through here. A string `_class_name`
        # keeps diffusers from importing the folder's pipeline module, a `None` library from importing component code
        # (and from insisting on it when a Hub repo of an earlier version has none); `extract_init_dict` below then
        # names this package's classes.
        index = dict(super()._dict_from_json_file(json_file))
        if isinstance(index.get("_class_name"), (list, tuple)):
            index["_class_name"] = _entry_class(index["_class_name"]) or cls.__name__
        folder = Path(json_file).parent
        for component in COMPONENT_CLASSES:
            entry = index.get(component)
            class_name = _entry_class(entry)
            code_file = folder / component / f"{entry[0]}.py" if class_name and isinstance(entry[0], str) else None
            if class_name in _COMPONENT_CLASS_NAMES:
                index[component] = [None, class_name]
            elif code_file is not None and code_file.exists():
                raise ValueError(
                    f"The {component} of {folder} is defined by code in the folder ({component}/{entry[0]}.py); "
                    f"{cls.__name__}.from_pretrained runs no code from a model folder. Load it with "
                    "DiffusionPipeline.from_pretrained(..., trust_remote_code=True) if you trust that code."
                )
        return index

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

        init_dict, unused_kwargs, hidden_dict = super().extract_init_dict(config_dict, **kwargs)
        for component in COMPONENT_CLASSES:
            class_name = _entry_class(init_dict.get(component))
            if class_name in _COMPONENT_CLASS_NAMES:
                init_dict[component] = list(_fetch_class_library_tuple(_package_class(class_name)))
        return init_dict, unused_kwargs, hidden_dict

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_remote_code(save_directory)
