"""Test configuration: 8 simulated CPU devices for the sync tests.

The flag must be set before JAX initialises its backend, hence at import.
"""

import os

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('MPLBACKEND', 'Agg')


