"""Every docstring example in jaxbn and train runs and prints what it shows.

The modules are found by walking the packages, so a new module's examples
are checked without being listed here.
"""

import doctest
import importlib
import pkgutil

import pytest

import jaxbn
import train

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples():
  names = []
  for package in (jaxbn, train):
    names.append(package.__name__)
    names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.')
              if info.name.rsplit('.', 1)[-1] != '__main__']
  return [name for name in names if '>>>' in (importlib.util.find_spec(name).loader
                                               .get_source(name) or '')]


MODULES = _modules_with_examples()


def test_the_examples_are_found():
  # The walk itself can fail silently (e.g. a renamed package): these hold examples.
  assert {'jaxbn._functional', 'jaxbn.nnx', 'jaxbn.linen', 'jaxbn._fold'} <= set(MODULES)


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=OPTIONS)
  assert result.attempted > 0 and result.failed == 0
