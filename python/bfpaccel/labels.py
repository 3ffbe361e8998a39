"""ImageNet class names, shipped with the package (no download), and the labelled photos of
the ``foolbox`` wheel used for real-accuracy checks.

The seed's samples fetched ``imagenet_classes.txt`` from GitHub at run time; here the 1000
names (class-id order, the order of every ImageNet-1k classifier) are
``bfpaccel/data/imagenet_classes.txt``, from the MIT-licensed ``imagenet-classes`` 0.2.1
(notice in ``bfpaccel/data/LICENSE.imagenet_classes``).
"""

from __future__ import annotations

import functools
import os
import re
from typing import List, Optional, Tuple

__all__ = ["imagenet_labels", "label_from_filename", "foolbox_imagenet_photos"]

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
_LABELLED = re.compile(r"^imagenet_\d+_(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _labels() -> Tuple[str, ...]:
    with open(os.path.join(_DATA, "imagenet_classes.txt"), encoding="utf-8") as f:
        names = tuple(line.rstrip("\n") for line in f if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"bfpaccel/data/imagenet_classes.txt has {len(names)} names, expected 1000")
    return names


def imagenet_labels() -> List[str]:
    """The 1000 ImageNet-1k class names, index = class id.

    Example:
        >>> imagenet_labels()[281]
        'tabby cat'
    """
    return list(_labels())


def label_from_filename(path: str) -> Optional[int]:
    """The class id of a labelled photo named like foolbox's ``imagenet_NN_<class>.jpg``, else None.

    Example:
        >>> label_from_filename("/x/imagenet_03_990.jpg")
        990
    """
    m = _LABELLED.match(os.path.basename(path))
    if m is None:
        return None
    label = int(m.group(1))
    return label if 0 <= label < 1000 else None


def foolbox_imagenet_photos() -> List[Tuple[str, int]]:
    """``[(path, class id)]`` of the 20 labelled ImageNet photos that the ``foolbox`` wheel
    ships (``foolbox/data/imagenet_NN_<class>.jpg``), found through the installed
    distribution's file list; foolbox itself is never imported. Needs
    ``pip install --no-deps foolbox==3.3.4``.

    Example:
        >>> len(foolbox_imagenet_photos())  # doctest: +SKIP
        20
    """
    import importlib.metadata as md

    try:
        dist = md.distribution("foolbox")
    except md.PackageNotFoundError:
        raise ImportError("the labelled photos come from the foolbox wheel's data files: "
                          "pip install --no-deps foolbox==3.3.4 (it is never imported)") from None
    out = []
    for f in dist.files or []:
        if f.parent.name == "data" and f.parent.parent.name == "foolbox":
            label = label_from_filename(f.name)
            if label is not None:
                out.append((str(dist.locate_file(f)), label))
    out.sort()
    if not out:
        raise FileNotFoundError("the installed foolbox distribution lists no foolbox/data/imagenet_*.jpg files")
    return out
