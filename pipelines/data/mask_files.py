"""Which files of a listing are named like the segmentation mask of an image beside them.

Many medical sets ship a lesion mask next to each image, in the same class folder: BUSI has
``benign/benign (1).png`` with ``benign (1)_mask.png`` (and ``benign (1)_mask_1.png`` for a
second lesion), ISIC has ``ISIC_0000000_segmentation.png`` beside ``ISIC_0000000.jpg``. An
ImageFolder ingest that takes every file as an image of its class would train on the masks as
if they were scans. This module only *recognises* such files, by name, so that ingest can leave
them out (``pipelines.data.exclusions``) and mask ingestion can pair each mask with its image;
what to do with them is the caller's business.

A file is mask-like when its stem is ``<image stem><sep><suffix>[<sep><n>]`` with ``<sep>`` one of
``_ - .``, ``<suffix>`` one of ``MASK_SUFFIXES`` (any case), and a file of stem ``<image stem>``
(any extension) lies in the same folder. The sibling is required: a lone ``scan_seg.png`` may well be
an image, and guessing wrong would silently drop data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath

MASK_SUFFIXES = ("mask", "segmentation", "seg")
_MASK_STEM = re.compile(r"^(?P<image>.+?)[_.\-](?:" + "|".join(MASK_SUFFIXES) + r")(?:[_.\-]?\d+)?$", re.IGNORECASE)


def image_stem_of(name: str) -> str | None:
    """The stem of the image a file named ``name`` would be the mask of (``a_mask_1.png`` -> ``a``); None if not mask-like."""
    match = _MASK_STEM.match(PurePosixPath(name).stem)
    return match.group("image") if match else None


def find_mask_files(paths: Iterable[str]) -> dict[str, str]:
    """``{mask path: image path}`` for each path named like the mask of another path in the same folder.

    ``paths`` are POSIX-style (relative to a root, or absolute); each is compared only with the
    others given. The image a mask belongs to is the first, in sorted order, of the files with the
    right stem (``a.png`` before ``a.tif``), never another mask-like file of the same image.
    """
    given = sorted(set(paths))
    by_stem: dict[tuple[str, str], str] = {}
    for path in given:
        p = PurePosixPath(path)
        by_stem.setdefault((str(p.parent), p.stem), path)
    masks: dict[str, str] = {}
    for path in given:
        p = PurePosixPath(path)
        stem = image_stem_of(p.name)
        if stem is None:
            continue
        image = by_stem.get((str(p.parent), stem))
        if image is not None and image != path:
            masks[path] = image
    return masks
