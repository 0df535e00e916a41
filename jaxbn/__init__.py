"""jaxbn: batch normalization for JAX with explicit state.

Pure, jit-compiled functions (``batch_norm`` and friends) thread a
``BatchNormState`` explicitly; ``jaxbn.nnx`` and ``jaxbn.linen`` wrap them in
drop-in replacements for Flax's ``BatchNorm``.
"""

import importlib

from jaxbn._convert import from_keras
from jaxbn._convert import from_torch
from jaxbn._convert import to_keras
from jaxbn._convert import to_torch
from jaxbn._functional import batch_norm
from jaxbn._functional import moments
from jaxbn._functional import normalize
from jaxbn._functional import update_state
from jaxbn._moments import Moments
from jaxbn._norms import group_norm
from jaxbn._norms import instance_norm
from jaxbn._norms import layer_norm
from jaxbn._precise import merge_moments
from jaxbn._precise import precise_batch_stats
from jaxbn._precise import precise_bn_linen
from jaxbn._precise import precise_bn_nnx
from jaxbn._renorm import batch_renorm
from jaxbn._renorm import d_max_schedule
from jaxbn._renorm import r_max_schedule
from jaxbn._state import BatchNormState
from jaxbn._state import init_state

__version__ = '0.1.0'

# Names that need Flax load on first use, so `import jaxbn` stays light:
# `jaxbn.nnx`, `from jaxbn import linen`, `jaxbn.fold_batch_norm_nnx` all work.
_LAZY = {
    'nnx': ('jaxbn.nnx', None),
    'linen': ('jaxbn.linen', None),
    'fold_batch_norm': ('jaxbn._fold', 'fold_batch_norm'),
    'fold_batch_norm_nnx': ('jaxbn._fold', 'fold_batch_norm_nnx'),
    'FoldedBatchNorm': ('jaxbn._fold', 'FoldedBatchNorm'),
    'bn_param_labels': ('jaxbn._freeze', 'bn_param_labels'),
    'freeze_batch_norm_mask': ('jaxbn._freeze', 'freeze_batch_norm_mask'),
    'freeze_stats': ('jaxbn._freeze', 'freeze_stats'),
}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module_name, attr = _LAZY[name]
  module = importlib.import_module(module_name)
  return module if attr is None else getattr(module, attr)


__all__ = [
    'BatchNormState',
    'FoldedBatchNorm',
    'Moments',
    'batch_norm',
    'batch_renorm',
    'bn_param_labels',
    'd_max_schedule',
    'fold_batch_norm',
    'fold_batch_norm_nnx',
    'freeze_batch_norm_mask',
    'freeze_stats',
    'from_keras',
    'from_torch',
    'group_norm',
    'init_state',
    'instance_norm',
    'layer_norm',
    'linen',
    'merge_moments',
    'moments',
    'nnx',
    'normalize',
    'precise_batch_stats',
    'precise_bn_linen',
    'precise_bn_nnx',
    'r_max_schedule',
    'to_keras',
    'to_torch',
    'update_state',
]
