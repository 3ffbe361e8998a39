"""Every example in the public docstrings, and in the docs that carry examples, runs and prints
what it says."""

from __future__ import annotations

import doctest
import pathlib

import pytest

import bfpaccel
import bfpaccel.core
import bfpaccel.formats
import bfpaccel.preprocess
import bfpaccel.reference

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("module", [bfpaccel, bfpaccel.core, bfpaccel.formats, bfpaccel.preprocess, bfpaccel.reference],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    threads, kernel = bfpaccel.get_num_threads(), bfpaccel.get_kernel()
    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    finally:  # examples may change the thread count or force a kernel
        bfpaccel.set_num_threads(threads)
        bfpaccel.set_kernel(kernel)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("name", ["numerics.md"])
def test_markdown_examples(name):
    threads, kernel = bfpaccel.get_num_threads(), bfpaccel.get_kernel()
    try:
        result = doctest.testfile(str(DOCS / name), module_relative=False, encoding="utf-8",
                                  optionflags=doctest.ELLIPSIS)
    finally:  # examples may force a kernel
        bfpaccel.set_num_threads(threads)
        bfpaccel.set_kernel(kernel)
    assert result.attempted > 0
    assert result.failed == 0
