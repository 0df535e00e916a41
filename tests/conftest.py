"""Test configuration: 8 simulated CPU devices for the sync tests; the real-data fixture.

The flag must be set before JAX initialises its backend, hence at import.
"""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('MPLBACKEND', 'Agg')


@pytest.fixture
def data_dir() -> Path:
  """The read-only folder of real MNIST / Fashion-MNIST files (skips if absent)."""
  path = Path(os.environ.get('JAXBN_DATA') or
              Path(__file__).resolve().parents[1].parent / 'shared' / 'data')
  if not (path / 'mnist').is_dir():
    pytest.skip(f'real data not found at {path} (set JAXBN_DATA to the folder '
                'holding mnist/ and fashion-mnist/)')
  return path


@pytest.fixture
def mnist_copy(tmp_path, data_dir) -> Path:
  """A private, writable copy of the MNIST folder (corruptions never touch the shared one)."""
  dst = tmp_path / 'data' / 'mnist'
  shutil.copytree(data_dir / 'mnist', dst)
  for f in dst.iterdir():
    f.chmod(0o644)
  return dst
