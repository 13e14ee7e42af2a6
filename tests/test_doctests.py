"""Run the examples in the package's docstrings, so documentation cannot drift from the code."""

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = (
    "sublearn",
    "toymodels",
    "theory",
    "lmpipeline",
    "lmpipeline.backends",
    "lmpipeline.backends.jaxlm",
    "lmpipeline.datakinds",
)


def _modules():
    for package in PACKAGES:
        root = importlib.import_module(package)
        yield package
        for info in pkgutil.iter_modules(root.__path__, prefix=f"{package}."):
            if not info.name.endswith(".__main__"):
                yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
