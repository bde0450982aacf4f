# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Class names: the ImageNet names, label-set files, the name → class-id index and the rules names must follow.

A label set is `id2label = {class_id: "name, synonym, ..."}` with ids 0..K−1; class id K is the null
(unconditional) class, which has no entry. The pipeline resolves names through [`class_name_index`], LoRA adapters
validate and store label sets with [`validate_id2label`], and training maps a dataset's class names onto a label set
with [`label_set_index`].
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from diffusers.utils import logging

logger = logging.get_logger(__name__)

# The data file stays next to the pipeline (it is package data listed in pyproject.toml).
IMAGENET_ID2LABEL_FILE = Path(__file__).parent / "pipelines" / "imagenet_id2label.json"

# Names that mean the null class wherever a class name is accepted; a label set may not use them.
UNCONDITIONAL_NAMES = ("unconditional", "null", "none")

# A class name that reads as an integer ("207", "-1", "+3") is a class id, so a label set may not use it as a name.
_CLASS_ID_TEXT = re.compile(r"[+-]?\d+")


def load_imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names in the standard (sorted synset) order, synonyms comma-separated."""
    return {int(key): value for key, value in json.loads(IMAGENET_ID2LABEL_FILE.read_text()).items()}


def class_name_key(name: str) -> str:
    """The form in which class names are compared: surrounding spaces ignored, case-insensitive."""
    return name.strip().lower()


def folder_name_key(name: str) -> str:
    """[`class_name_key`] with `_` read as a space, for dataset folder names such as `golden_retriever`."""
    return class_name_key(name).replace("_", " ")


def class_name_index(
    id2label: Mapping[int, str],
    include_full_names: bool = False,
    key: Callable[[str], str] = class_name_key,
) -> dict[str, list[int]]:
    """Map every comma-separated synonym (under `key`) to the class ids that list it, in id order.

    A synonym shared by several classes (ImageNet's "crane" is a bird and a machine) maps to all of them; callers
    decide how to report the ambiguity. `include_full_names` also indexes each complete name ("tench, Tinca tinca").
    Empty synonyms are skipped.
    """
    index: dict[str, list[int]] = {}
    for class_id, names in id2label.items():
        entries = [names, *names.split(",")] if include_full_names else names.split(",")
        for entry in entries:
            entry_key = key(entry)
            if not entry_key:
                continue
            ids = index.setdefault(entry_key, [])
            if int(class_id) not in ids:
                ids.append(int(class_id))
    return index


def validate_id2label(id2label: dict, num_classes: int | None = None, source: str = "label set") -> dict[int, str]:
    """Normalise `{id: name}` (JSON string keys allowed) and check it: ids exactly 0..K−1, non-empty names, no
    duplicate names (case-insensitive), no reserved names, and K == `num_classes` when given."""
    try:
        normalised = {int(key): value for key, value in id2label.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: class ids must be integers, got keys {list(id2label)[:5]}.") from error
    if sorted(normalised) != list(range(len(normalised))):
        raise ValueError(
            f"{source}: class ids must be exactly 0..{len(normalised) - 1}, got {sorted(normalised)[:10]}."
        )
    seen: dict[str, int] = {}
    duplicates = []
    for class_id in range(len(normalised)):
        name = normalised[class_id]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{source}: class {class_id} has an empty or non-string name ({name!r}).")
        name = normalised[class_id] = name.strip()
        key = class_name_key(name)
        if key in UNCONDITIONAL_NAMES or _CLASS_ID_TEXT.fullmatch(key):
            raise ValueError(
                f"{source}: class {class_id} is named {name!r}, which the pipeline reserves (integers are class ids; "
                f"{', '.join(UNCONDITIONAL_NAMES)} mean the null class). Rename it."
            )
        if key in seen:
            duplicates.append(f"{name!r} (classes {seen[key]} and {class_id})")
        else:
            seen[key] = class_id
    if duplicates:
        raise ValueError(f"{source}: duplicate class names (case-insensitive): {'; '.join(duplicates)}.")
    if num_classes is not None and len(normalised) != num_classes:
        raise ValueError(
            f"{source} has {len(normalised)} class names but the class table has {num_classes} classes: they must "
            "agree (one name per class, in class-id order)."
        )
    shared = {name: ids for name, ids in class_name_index(normalised).items() if len(ids) > 1}
    if shared:
        logger.warning(f"{source}: synonyms shared by several classes (pass ids for these): {shared}")
    return normalised


def read_label_set(path: str | os.PathLike, num_classes: int | None = None) -> dict[int, str]:
    """Read a label-set file and return `id2label`.

    Formats: a text file with one class name per line (line order = class id; blank lines and lines starting with
    `#` are skipped; a name may list comma-separated synonyms, like the ImageNet names), a JSON list of names, or a
    JSON object `{"0": "name", …}`. Raises `ValueError` on duplicate names (case-insensitive), reserved names, or a
    count that disagrees with `num_classes` (the saved class table) when given.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"Label-set file {path} is not valid JSON: {error}") from error
        if isinstance(data, list):
            id2label = dict(enumerate(data))
        elif isinstance(data, dict):
            id2label = data
        else:
            raise ValueError(f"Label-set file {path}: expected a JSON list of names or an {{id: name}} object.")
    else:
        names = [line.strip() for line in text.splitlines()]
        id2label = dict(enumerate(name for name in names if name and not name.startswith("#")))
    if not id2label:
        raise ValueError(f"Label-set file {path} lists no classes.")
    return validate_id2label(id2label, num_classes, source=f"Label-set file {path}")


def label_set_index(id2label: dict[int, str], class_names: Sequence[str]) -> list[int]:
    """Map a dataset's class names (e.g. the `imagefolder` folder names, `dataset.features["label"].names`) to the
    ids of a label set: entry i is the label-set id of dataset class i. Matching is case-insensitive on the full
    name or any comma-separated synonym, with `_` read as a space. Raises on names that match no or several ids."""
    lookup = class_name_index(id2label, include_full_names=True, key=folder_name_key)
    index, problems = [], []
    for name in class_names:
        ids = lookup.get(folder_name_key(str(name)), [])
        if len(ids) != 1:
            problems.append(f"{name!r} ({'no match' if not ids else f'ambiguous: {sorted(ids)}'})")
        else:
            index.append(ids[0])
    if problems:
        raise ValueError(
            f"Dataset classes not found in the label set: {', '.join(problems)}. Label set: {list(id2label.values())}."
        )
    return index


def resolve_class_labels(
    labels,
    num_classes: int,
    id2label: Mapping[int, str] | None = None,
    name_index: Mapping[str, list[int]] | None = None,
) -> list[int]:
    """Map class ids and/or names (any listed synonym, case-insensitive) to class ids in 0..`num_classes`.

    `labels` is one label or a sequence of them; ids may be Python ints, NumPy integers or integer tensors/arrays of
    any integer dtype (0-d or 1-d). Floats and booleans are refused rather than truncated. Strings that read as
    integers ("207", "-1") are ids; `num_classes` or one of [`UNCONDITIONAL_NAMES`] is the null class. `name_index` is
    [`class_name_index`]`(id2label)`, passed in when the caller keeps it (the pipeline builds it once per label set).
    """
    id2label = id2label or {}
    if name_index is None:
        name_index = class_name_index(id2label)
    labels = _class_label_list(labels)
    if not labels:
        raise ValueError("`class_labels` is empty: pass at least one class id or name, e.g. class_labels=[0].")
    ids = []
    for item in labels:
        if isinstance(item, str):
            item = _class_name_to_id(item, num_classes, id2label, name_index)
        if not 0 <= item <= num_classes:
            raise ValueError(
                f"Class id {item} is out of range: this model has classes 0..{num_classes - 1} "
                f"(and {num_classes} = unconditional)."
            )
        ids.append(item)
    return ids


def _class_label_list(labels) -> list[int | str]:
    """`labels` as a flat list of Python ints and strings; anything else raises a one-line `TypeError`.

    Tensors and arrays (duck-typed through `.tolist()`, so this module needs neither torch nor NumPy) turn into
    Python values of their dtype: integers of any width stay ints, while float and bool values stay floats and bools
    and are refused below, because `int()` would silently truncate them (1.5 → 1, True → 1, 10.9 → 10).
    """
    if hasattr(labels, "tolist") and not isinstance(labels, (str, int)):  # a tensor, an array or a NumPy scalar
        values = labels.tolist()
        values = values if isinstance(values, list) else [values]
        if any(isinstance(value, list) for value in values):
            raise TypeError(f"Class labels must be one-dimensional, got shape {tuple(labels.shape)}.")
        if any(isinstance(value, bool) or not isinstance(value, int) for value in values):
            raise TypeError(
                f"Class labels must be ints or class names, got a {type(labels).__name__} of dtype {labels.dtype}: "
                "pass integer class ids (a tensor or array of any integer dtype) or a list of ids/names."
            )
        labels = values
    elif isinstance(labels, Iterable) and not isinstance(labels, str):
        labels = list(labels)
    else:
        labels = [labels]
    flat = []
    for item in labels:
        if hasattr(item, "tolist") and not isinstance(item, (str, int)):  # a 0-d tensor or a NumPy scalar
            item = item.tolist()
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(f"Class labels must be ints or class names, got {item!r} ({type(item).__name__}).")
        flat.append(item)
    return flat


def _class_name_to_id(name: str, num_classes: int, id2label: Mapping[int, str], name_index) -> int:
    key = class_name_key(name)
    if key in UNCONDITIONAL_NAMES:
        return num_classes
    if _CLASS_ID_TEXT.fullmatch(key):
        return int(key)  # range-checked by the caller like any id
    if key not in name_index:
        close = difflib.get_close_matches(key, name_index.keys(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = "" if name_index else " This pipeline has no `id2label`: pass class ids."
        raise ValueError(f"Unknown class name {name!r}.{hint}{known}")
    matches = name_index[key]
    if len(matches) > 1:
        options = "; ".join(f"{i} = {id2label[i]!r}" for i in matches)
        raise ValueError(f"Class name {name!r} is ambiguous ({options}): pass the class id instead.")
    return matches[0]
