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

__all__ = [
    'BatchNormState',
    'Moments',
    'batch_norm',
    'init_state',
    'moments',
    'normalize',
    'update_state',
]
