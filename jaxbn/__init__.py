"""jaxbn: batch normalization for JAX with explicit state.

Pure, jit-compiled functions (``batch_norm`` and friends) thread a
``BatchNormState`` explicitly; ``jaxbn.nnx`` and ``jaxbn.linen`` wrap them in
drop-in replacements for Flax's ``BatchNorm``.
"""

from jaxbn._functional import batch_norm
from jaxbn._functional import moments
from jaxbn._functional import normalize
from jaxbn._functional import update_state
from jaxbn._moments import Moments
from jaxbn._state import BatchNormState
from jaxbn._state import init_state

__version__ = '0.1.0'

# The Flax wrappers import Flax, so they load on first use: `jaxbn.nnx`,
# `jaxbn.linen`, `from jaxbn import nnx` and `import jaxbn.linen` all work.
_SUBMODULES = ('linen', 'nnx')


def __getattr__(name):
  if name in _SUBMODULES:
    import importlib
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

__all__ = [
    'BatchNormState',
    'Moments',
    'batch_norm',
    'init_state',
    'moments',
    'normalize',
    'update_state',
]
