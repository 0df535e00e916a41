"""Pairs of per-feature sums in one read of memory, natively on the CPU.

XLA:CPU gives each reduction its own pass over memory, so the two sums of a
batch norm (``sum(x)`` and ``sum(x^2)`` forward; ``sum(g)`` and
``sum(g * (x - mean))`` backward) read each array twice. Two primitives
here compute such pairs; on the CPU they lower to kernels (``_native.cc``)
that read the arrays once, on XLA's own threads, and everywhere else to the
same sums in XLA:

- ``shifted_sums(a, shift_a, axes, b, shift_b)``: ``sum(a - shift_a)`` and
  ``sum((a - shift_a) * (b - shift_b))`` (``b`` defaults to ``a``);
- ``centred_affine(reads, mean, dmul, offset)``: ``(reads - mean) * dmul +
  offset``, linear in ``(dmul, offset)``. Its transpose is that pair of
  sums, so the backward pass of a batch norm makes it in one read.

The kernels serve float32 and bfloat16 arrays whose kept (feature) axes
are contiguous and come after a reduced one (NHWC, NCHW, dense), on one
device (or inside ``shard_map``), and not in ``jax.export``, whose
artifacts must not depend on this library.
They are built on first use with the system's C++ compiler against
jaxlib's XLA FFI headers (a few seconds, once per machine: the library is
cached, see ``cache_dir``). Environment: ``JAXBN_NATIVE=0`` keeps every sum
in XLA; ``JAXBN_NATIVE=1`` makes a failed build an error instead of a
warning; ``CXX`` picks the compiler.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

logger = logging.getLogger(__name__)

_SOURCE = pathlib.Path(__file__).with_name('_native.cc')
_TARGETS = {'jaxbn_square_sums': 'JaxbnSquareSums', 'jaxbn_product_sums': 'JaxbnProductSums'}
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_XLA_ONLY = contextvars.ContextVar('jaxbn_xla_sums_only', default=False)


@contextlib.contextmanager
def xla_sums_only():
  """Programs lowered inside use XLA's sums, not the kernels (to compare them)."""
  token = _XLA_ONLY.set(True)
  try:
    yield
  finally:
    _XLA_ONLY.reset(token)


class NativeBuildError(RuntimeError):
  """The native kernels could not be built or loaded."""


def cache_dir() -> pathlib.Path:
  """Where built kernels are kept: ``$JAXBN_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/jaxbn``, else ``~/.cache/jaxbn``."""
  if os.environ.get('JAXBN_CACHE_DIR'):
    return pathlib.Path(os.environ['JAXBN_CACHE_DIR'])
  base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(base) / 'jaxbn'


def _mode() -> str:
  mode = os.environ.get('JAXBN_NATIVE', 'auto').strip().lower() or 'auto'
  if mode not in ('0', '1', 'auto'):
    raise ValueError(f'JAXBN_NATIVE={mode!r}: use 0 (XLA sums only), 1 (native kernels, '
                     'or an error) or leave it unset (native kernels where they build).')
  return mode


def available() -> bool:
  """Whether the native kernels are built, loaded and registered with XLA."""
  with _LOADING:  # one build and one registration, even from several threads
    return _load()


_LOADING = threading.Lock()


@functools.cache
def _load() -> bool:
  mode = _mode()
  if mode == '0':
    return False
  try:
    library = ctypes.CDLL(str(_build()))
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform='cpu')
  except (NativeBuildError, OSError, AttributeError) as error:
    if mode == '1':
      raise NativeBuildError(f'{error}\nUnset JAXBN_NATIVE (or set it to 0) to use XLA '
                             'sums instead.') from error
    logger.warning('jaxbn: native CPU sums unavailable, batch norm falls back to XLA '
                   'reductions (slower on CPU): %s. Set JAXBN_NATIVE=0 to silence this.', error)
    return False
  return True


_FLAGS = ('-O3', '-std=c++17', '-ffp-contract=off', '-shared', '-fPIC', '-w')
# Tuned for this CPU where the compiler can; one that rejects -march=native
# (as some clang releases on arm64 do) gets a portable build instead.
_TUNINGS = (('-march=native',), ())
_PREFIX = 'jaxbn_native_'
# A build no process has loaded for this long is removed when another is
# built (an upgrade of jaxbn or jaxlib leaves its predecessor behind), and
# so is a partial file a killed build left, after a day.
_UNUSED_DAYS = 30
_DAY = 86400.0


class _CompileFailed(NativeBuildError):
  """The compiler ran and failed."""


def _build() -> pathlib.Path:
  """The shared library, compiled unless a build for this source, jaxlib and
  CPU is cached. Concurrent builds each write a file of their own and
  rename it into place, so a reader never sees half a library."""
  if sys.platform == 'win32':
    raise NativeBuildError('no native build on Windows')
  compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if not compiler:
    raise NativeBuildError('no C++ compiler found (install g++ or clang, or set CXX)')
  builds = [(_FLAGS + tuning, _cached_path(compiler, _FLAGS + tuning)) for tuning in _TUNINGS]
  for _, target in builds:
    if target.exists():
      _mark_used(target)
      return target
  try:
    target = _compile(compiler, *builds[0])
  except _CompileFailed as error:
    logger.info('jaxbn: %s\nBuilding without -march=native instead.', error)
    target = _compile(compiler, *builds[1])
  _prune(target)
  return target


def _mark_used(library: pathlib.Path) -> None:
  """Dates a loaded build's file to today (at most once a day), which keeps it from _prune."""
  try:
    if time.time() - library.stat().st_mtime > _DAY:
      os.utime(library)
  except OSError:  # a read-only cache: nothing is pruned from it either
    pass


def _prune(built: pathlib.Path) -> None:
  """Removes the builds beside ``built`` unused for _UNUSED_DAYS and partial
  files older than a day. Best effort: the cache may be shared and read-only."""
  now = time.time()
  for path, days in ([(p, _UNUSED_DAYS) for p in built.parent.glob(f'{_PREFIX}*.so')]
                     + [(p, 1) for p in built.parent.glob(f'{_PREFIX}*.so.part')]):
    try:
      if path != built and now - path.stat().st_mtime > days * _DAY:
        path.unlink()
    except OSError:
      pass


def _cached_path(compiler: str, flags) -> pathlib.Path:
  key = hashlib.sha256('\0'.join([
      _SOURCE.read_text(), jaxlib.__version__, compiler, *flags, platform.machine(),
      _cpu_signature()]).encode()).hexdigest()[:16]
  return cache_dir() / f'{_PREFIX}{key}.so'


def _compile(compiler: str, flags, target: pathlib.Path) -> pathlib.Path:
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=_PREFIX, suffix='.so.part', dir=target.parent)
    os.close(fd)
  except OSError as error:
    raise NativeBuildError(f'cannot write to {target.parent} ({error}); set '
                           'JAXBN_CACHE_DIR to a writable folder') from error
  command = [compiler, *flags, f'-I{jax.ffi.include_dir()}', str(_SOURCE), '-o', partial]
  logger.info('jaxbn: building the native CPU sums once, into %s', target)
  try:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      output = result.stderr.rstrip()[-2000:]
      raise _CompileFailed(f'{" ".join(command)} failed (exit status {result.returncode})'
                           + (f':\n{output}' if output else ''))
    os.replace(partial, target)
  except OSError as error:
    raise NativeBuildError(f'the C++ compiler {compiler!r} could not run ({error}); install '
                           'g++ or clang, or set CXX to one') from error
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


def _cpu_signature() -> str:
  """What ``-march=native`` compiled for: a library built on one CPU model
  may use instructions another lacks (a cache shared across machines)."""
  try:
    with open('/proc/cpuinfo') as info:
      return ''.join(line for line in info if line.startswith(('model name', 'flags')))[:8192]
  except OSError:
    pass
  if sys.platform == 'darwin':  # no /proc: the chip's name, e.g. "Apple M2"
    try:
      return subprocess.run(['sysctl', '-n', 'machdep.cpu.brand_string'], capture_output=True,
                            text=True, timeout=10).stdout.strip() or platform.processor()
    except (OSError, subprocess.SubprocessError):
      pass
  return platform.processor()


# ---------------------------------------------------------------------------
# shifted_sums


def shifted_sums(a, shift_a, reduction_axes, b=None, shift_b=None):
  """``(sum(a - shift_a), sum((a - shift_a) * (b - shift_b)))`` over ``reduction_axes``.

  ``b`` defaults to ``a`` (and ``shift_b`` to ``shift_a``); a shift of
  None is no shift. Shifts broadcast against the arrays; everything is
  widened to float32 (or wider) before subtracting. Returns the kept shape.
  """
  reduction_axes = tuple(reduction_axes)
  pairs = [(a, shift_a)] if b is None else [(a, shift_a), (b, shift_b)]
  shifted = tuple(shift is not None for _, shift in pairs)
  operands = [v for x, shift in pairs for v in (x, _shift(shift, x, reduction_axes))]
  if not _traceable_natively(a):
    return _xla_sums(*operands, reduction_axes=reduction_axes, shifted=shifted)
  primitive = _square_sums_p if b is None else _product_sums_p
  return primitive.bind(*_same_variance(*operands), reduction_axes=reduction_axes,
                        shifted=shifted)


def _xla_sums(a, shift_a, b=None, shift_b=None, *, reduction_axes, shifted):
  """The sums of ``shifted_sums`` as XLA reductions (``|a - shift_a|^2``
  for complex ``a`` without ``b``); ``shifted`` tells which shifts to apply."""
  # Each sum reads (and widens) its operands itself: two subtractions XLA
  # cannot merge into one each fuse into their own reduction, and neither a
  # centred nor a widened array is written to memory (see separate_reads).
  # The barriers also keep ``x - mean`` from merging with the program's
  # other ``x - mean`` into one array in memory.
  a1, a2 = separate_reads(a, 2)
  s1 = jnp.sum(widened(a1) - shift_a if shifted[0] else widened(a1), reduction_axes)
  u = _centred(a2, shift_a, shifted[0])
  if b is None:
    return s1, jnp.sum(jnp.real(u * jnp.conj(u)), reduction_axes)
  (b,) = separate_reads(b, 1)
  return s1, jnp.sum(u * _centred(b, shift_b, shifted[1]), reduction_axes)


def _centred(x, shift, shifted):
  return widened(x) - lax.optimization_barrier(shift) if shifted else widened(x)


def separate_reads(x, n):
  """``n`` values equal to a narrow ``x`` that XLA cannot identify with it or
  each other (a wide ``x``, which needs no conversion, ``n`` times as it is).

  XLA:CPU writes a widened copy of a narrow array whose conversion has
  several users, but widens inside a reduction that has the conversion to
  itself: bfloat16 statistics then read x once per sum (2 bytes an entry)
  instead of writing and reading a float32 copy (4 + 2 x 4 bytes, plus its
  fresh pages). The barrier copies nothing.
  """
  if x.dtype == widened(x).dtype:
    return (x,) * n
  return lax.optimization_barrier((x,) * n)


def stats_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype: at least float32 (complex64 for complex inputs)."""
  dtype = jnp.dtype(dtype)
  floor = jnp.complex64 if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.float32
  return jnp.promote_types(dtype, floor)


def widened(x):
  """``x`` in its accumulation dtype, :func:`stats_dtype`."""
  return x.astype(stats_dtype(x.dtype))


def _shift(shift, x, reduction_axes):
  """``shift`` (0 for None) widened like ``x`` and shaped as its per-feature
  (keepdims) sums."""
  kept_dims = tuple(1 if i in reduction_axes else d for i, d in enumerate(x.shape))
  return jnp.broadcast_to(jnp.asarray(0 if shift is None else shift, widened(x).dtype),
                          kept_dims)


def _traceable_natively(x) -> bool:
  """Whether a native kernel may serve ``x`` at all (lowering decides the rest).

  Arrays typed with a sharding over a mesh are left to XLA, which places
  the sums across devices itself, unless every axis of the mesh is manual
  (inside ``shard_map``: one device's block).
  """
  if (jnp.dtype(x.dtype) not in _DTYPES or jax.default_backend() != 'cpu'
      or _XLA_ONLY.get() or not available()):
    return False
  mesh = getattr(jax.typeof(x).sharding, 'mesh', None)
  if mesh is None or mesh.empty or mesh.size == 1:
    return True
  manual = getattr(jax.sharding.AxisType, 'Manual', None)
  return manual is not None and all(t == manual for t in mesh.axis_types)


def _sums_abstract_eval(a, *rest, reduction_axes, shifted):
  kept_axes = [i for i in range(a.ndim) if i not in reduction_axes]
  # Per-device sums inside shard_map: as varying as the operands, which
  # ``update`` keeps. Unsharded (``_traceable_natively``), so the spec of
  # the kept axes is the operand's, all None.
  spec = a.sharding.spec
  out = a.update(shape=tuple(a.shape[i] for i in kept_axes), dtype=jnp.dtype(jnp.float32),
                 weak_type=False, sharding=a.sharding.update(
                     spec=type(spec)(*(spec[i] for i in kept_axes))))
  return out, out


def _same_variance(*args):
  """``args`` made varying over the same ``shard_map`` axes (a no-op outside
  one), as JAX's own operations do, so that transposing them sums the
  cotangents of invariant operands across devices."""
  axes = [_varying_axes(a) for a in args]
  union = frozenset().union(*axes)
  pcast = getattr(lax, 'pcast', None)
  vary = ((lambda x, names: pcast(x, names, to='varying')) if pcast else lax.pvary)
  return [a if own == union else vary(a, tuple(n for n in union if n not in own))
          for a, own in zip(args, axes)]


def _varying_axes(x) -> frozenset:
  """The ``shard_map`` axes over which ``x`` varies (jax >= 0.10 and before)."""
  aval = jax.typeof(x)
  if hasattr(aval, 'vma'):
    return aval.vma
  return getattr(getattr(aval, 'manual_axis_type', None), 'varying', frozenset())


def _sums_jvp(primitive, primals, tangents, *, reduction_axes, shifted):
  # Bilinear: d sum(u v) = sum(du v) + sum(u dv), written with XLA sums
  # (higher derivatives of a batch norm only). Unused shifts are zeros; the
  # square sums are the product sums with b = a.
  outs = primitive.bind(*primals, reduction_axes=reduction_axes, shifted=shifted)
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  centred = lambda values: [widened(x) - shift for x, shift in zip(values[::2], values[1::2])]
  u, v = (centred(primals) * 2)[:2]
  du, dv = (centred(tangents) * 2)[:2]
  return outs, (jnp.sum(du, reduction_axes), jnp.sum(du * v + u * dv, reduction_axes))


def _sums_batch(args, dims, *, reduction_axes, shifted):
  sums = functools.partial(_xla_sums, reduction_axes=reduction_axes, shifted=shifted)
  return jax.vmap(sums, in_axes=dims)(*args), (0, 0)


def _native_lowering(target):
  def rule(ctx, *args, reduction_axes, shifted):
    layout = _native_layout(ctx, ctx.avals_in[0], reduction_axes)
    if layout is None:
      xla = functools.partial(_xla_sums, reduction_axes=reduction_axes, shifted=shifted)
      return mlir.lower_fun(xla)(ctx, *args)
    kept = ctx.avals_out[0].shape
    result = jax.ShapeDtypeStruct((layout[1],), jnp.float32)

    def native(*operands):
      flat = [v.reshape(-1) for v in operands]
      sums = jax.ffi.ffi_call(target, (result, result))(*flat, inner=np.int64(layout[2]))
      return [s.reshape(kept) for s in sums]
    return mlir.lower_fun(native)(ctx, *args)
  return rule


def _native_layout(ctx, aval, reduction_axes):
  """``(outer, features, inner)`` for the kernels, or None where XLA's sums
  serve: kept axes not contiguous or first, a symbolic shape, several
  devices (outside shard_map) or ``jax.export``."""
  kept = [i for i in range(aval.ndim) if i not in reduction_axes]
  if not kept or kept != list(range(kept[0], kept[-1] + 1)):
    return None
  if not all(isinstance(d, int) for d in aval.shape):
    return None
  module = ctx.module_context
  if getattr(module.lowering_parameters, 'for_export', True):
    return None
  axis_context = module.axis_context
  if hasattr(axis_context, 'num_devices') and axis_context.num_devices > 1:
    return None
  manual = getattr(axis_context, 'manual_axes', None)
  if manual is not None and set(manual) != set(axis_context.mesh.axis_names):
    return None
  shape = aval.shape
  layout = (math.prod(shape[:kept[0]]), math.prod(shape[kept[0]:kept[-1] + 1]),
            math.prod(shape[kept[-1] + 1:]))
  # Nothing reduced before the features (a layer norm's rows): XLA reduces
  # contiguous rows well and fuses more around them, measured faster there.
  return layout if layout[0] > 1 else None


def _sums_primitive(name, target):
  primitive = Primitive(name)
  primitive.multiple_results = True
  primitive.def_impl(_xla_sums)
  primitive.def_abstract_eval(_sums_abstract_eval)
  ad.primitive_jvps[primitive] = functools.partial(_sums_jvp, primitive)
  batching.primitive_batchers[primitive] = _sums_batch
  mlir.register_lowering(primitive, mlir.lower_fun(_xla_sums))
  mlir.register_lowering(primitive, _native_lowering(target), platform='cpu')
  return primitive


_square_sums_p = _sums_primitive('jaxbn_square_sums', 'jaxbn_square_sums')
_product_sums_p = _sums_primitive('jaxbn_product_sums', 'jaxbn_product_sums')


# ---------------------------------------------------------------------------
# centred_affine


def centred_affine(reads, mean, dmul, offset, dtype):
  """``((reads - mean) * dmul + offset).astype(dtype)``, computed in float32 or wider.

  ``mean``, ``dmul`` and ``offset`` are per-feature arrays shaped to
  broadcast against ``reads`` (size 1 on the reduced axes). Linear in
  ``(dmul, offset)``: a batch norm's tangent, whose transpose is the pair
  ``(sum(g * (reads - mean)), sum(g))`` of :func:`shifted_sums`, read from
  the cotangent ``g`` in ``dtype`` itself.
  """
  return _centred_affine_p.bind(*_same_variance(reads, mean, dmul, offset), dtype=jnp.dtype(dtype))


def _centred_affine(reads, mean, dmul, offset, *, dtype):
  return ((widened(reads) - mean) * dmul + offset).astype(dtype)


def _centred_affine_jvp(primals, tangents, *, dtype):
  reads, mean, dmul, offset = primals
  dreads, dmean, ddmul, doffset = (ad.instantiate_zeros(t) for t in tangents)
  out = centred_affine(reads, mean, dmul, offset, dtype)
  return out, (centred_affine(reads, mean, ddmul, doffset, dtype)
               + ((widened(dreads) - dmean) * dmul).astype(dtype))


def _centred_affine_transpose(cotangent, reads, mean, dmul, offset, *, dtype):
  if ad.is_undefined_primal(reads) or ad.is_undefined_primal(mean):
    raise NotImplementedError('centred_affine is linear in (dmul, offset) only')
  per_feature = (dmul.aval if ad.is_undefined_primal(dmul) else dmul).shape
  if type(cotangent) is ad.Zero:
    sums = [jnp.zeros(per_feature, widened(reads).dtype)] * 2
  else:
    reduction_axes = tuple(i for i, d in enumerate(per_feature) if d == 1)
    sums = [s.reshape(per_feature)
            for s in shifted_sums(cotangent, None, reduction_axes, reads, mean)]
  return (None, None) + tuple(_cotangent_of(s, v) for s, v in zip(sums[::-1], (dmul, offset)))


def _cotangent_of(total, operand):
  """``total`` as the cotangent of a linear ``operand`` (None for a known one):
  its real part for a real operand of a complex product, as a cast's transpose."""
  if not ad.is_undefined_primal(operand):
    return None
  dtype = operand.aval.dtype
  if jnp.iscomplexobj(total) and not jnp.issubdtype(dtype, jnp.complexfloating):
    total = jnp.real(total)
  return total.astype(dtype)


def _centred_affine_batch(args, dims, *, dtype):
  affine = functools.partial(_centred_affine, dtype=dtype)
  return jax.vmap(affine, in_axes=dims)(*args), 0


_centred_affine_p = Primitive('jaxbn_centred_affine')
_centred_affine_p.def_impl(_centred_affine)
_centred_affine_p.def_abstract_eval(
    lambda reads, *_, dtype: reads.update(dtype=dtype, weak_type=False))
ad.primitive_jvps[_centred_affine_p] = _centred_affine_jvp
ad.primitive_transposes[_centred_affine_p] = _centred_affine_transpose
batching.primitive_batchers[_centred_affine_p] = _centred_affine_batch
mlir.register_lowering(_centred_affine_p, mlir.lower_fun(_centred_affine, multiple_results=False))
