"""The examples in the docstrings of the public API, presets and small helpers run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["lowbit", "lowbit.data", "lowbit.transforms.recipe", "lowbit.transforms.pass_registry"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0, f"{result.failed} example(s) of {name} failed (run python -m doctest -v)"
