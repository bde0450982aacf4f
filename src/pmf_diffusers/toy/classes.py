# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The ten classes of the toy dataset "pmf-toy-shapes": names, colours and folder names (the list index is the class
id). Every class is defined by BOTH a shape and a colour, so a sample stays recognisable even when a small one-step
generator draws it slightly blurred.

Standard library only, so the command line can list the classes without importing numpy.
"""

from __future__ import annotations

from numbers import Integral

__all__ = [
    "NUM_TOY_CLASSES",
    "TOY_CLASS_COLORS",
    "TOY_CLASS_FOLDERS",
    "TOY_CLASS_NAMES",
    "TOY_DATASET_NAME",
    "TOY_DATASET_VERSION",
    "check_class_id",
    "toy_class_folder_name",
]

TOY_DATASET_NAME = "pmf-toy-shapes"
TOY_DATASET_VERSION = 1

#: Human-readable class names; the list index is the class id.
TOY_CLASS_NAMES: tuple[str, ...] = (
    "red_circle",
    "blue_square",
    "green_triangle",
    "yellow_plus",
    "cyan_ring",
    "magenta_stripes",
    "orange_diamond",
    "white_x",
    "pink_frame",
    "purple_star",
)

#: Base RGB colour of each class (jittered per image).
TOY_CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (225, 45, 45),  # red
    (45, 95, 235),  # blue
    (50, 190, 70),  # green
    (235, 215, 45),  # yellow
    (45, 210, 225),  # cyan
    (215, 55, 205),  # magenta
    (245, 135, 30),  # orange
    (235, 235, 235),  # white
    (250, 150, 185),  # pink
    (140, 75, 230),  # purple
)

NUM_TOY_CLASSES = len(TOY_CLASS_NAMES)


def check_class_id(class_id: int) -> None:
    """Raise a `ValueError` unless `class_id` is an int in [0, 9] (numpy integers count)."""
    if not isinstance(class_id, Integral) or not 0 <= int(class_id) < NUM_TOY_CLASSES:
        raise ValueError(f"class_id must be an int in [0, {NUM_TOY_CLASSES - 1}], got {class_id!r}")


def toy_class_folder_name(class_id: int) -> str:
    """Folder name of a class, e.g. ``"00_red_circle"``; sorts in class-id order."""
    check_class_id(class_id)
    return f"{class_id:02d}_{TOY_CLASS_NAMES[class_id]}"


#: Folder names in class-id order (also their sorted order).
TOY_CLASS_FOLDERS: tuple[str, ...] = tuple(toy_class_folder_name(i) for i in range(NUM_TOY_CLASSES))
