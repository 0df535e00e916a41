"""pyproject.toml's dependency floors are the versions `make test-oldest` pins."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
  lines = (line.split('#')[0].strip() for line in path.read_text().splitlines())
  return dict(line.split('==') for line in lines if line)


def test_oldest_versions_are_the_dependency_floors():
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  floors = {}
  for text in project['dependencies']:
    requirement = Requirement(text)
    (spec,) = requirement.specifier  # one lower bound each, no upper bound
    assert spec.operator == '>=', text
    floors[requirement.name] = spec.version
  assert floors == _pins(ROOT / 'tests' / 'oldest-versions.txt')
