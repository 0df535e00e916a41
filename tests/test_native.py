"""The native CPU sums (jaxbn/_native.cc) against float64 NumPy, and their fallbacks.

Tolerances: the kernels add float32 values in chunks of 64 rows, then in
float64. Each of a chunk's 63 float32 additions rounds by at most 2^-24 of
the running sum, which is at most the sum of the terms' magnitudes; each
term carries at most 3 roundings of its own (two shifted operands and
their product). So a result is within (63 + 3) * 2^-24 * sum(|terms|) of
the exact sum, plus its final rounding to float32 (2^-24 of the result).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import _native

# Skipped only without a compiler: where one exists, a failed build fails.
pytestmark = pytest.mark.skipif(
    not (os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')),
    reason='no C++ compiler: the native sums cannot be built here')

CHUNK_BOUND = (63 + 3) * 2.0**-24


def _assert_sum_close(got, terms, axis):
  exact = terms.sum(axis)
  bound = CHUNK_BOUND * np.abs(terms).sum(axis) + 2.0**-24 * np.abs(exact) + 1e-30
  np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - exact), bound)


def _compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_the_kernels_build_and_load():
  assert _native.available()


# Features last: rows not a multiple of the 64-row chunk; one feature;
# features that are not a multiple of a SIMD width; short rows (at most 64
# features, summed in registers) of exactly 64 and of 3 x 16 + 5; several
# blocks of rows (2^17 entries a block); wide rows (700 x 300: square sums
# read 8 rows at a time, and a block's last chunk leaves 4 rows and each row
# 12 features over). Features in the middle (NCHW):
# runs shorter than the 16 lanes and not a multiple of them; runs longer
# than a flush (1024); few outer indices (the features split among tasks);
# many (blocks of them).
SHAPES = [((37, 5, 5, 24), (0, 1, 2)), ((3001, 7), (0,)), ((130, 1), (0,)),
          ((700, 300), (0,)), ((4133, 64), (0,)), ((9, 11, 53), (0, 1)),
          ((2, 3, 4, 5, 6), (0, 1)),
          ((6, 5, 3, 3), (0, 2, 3)), ((3, 4, 2000), (0, 2)), ((2, 3, 50000), (0, 2)),
          ((80, 8, 1000), (0, 2)), ((4, 3, 5, 6, 7), (0, 3, 4))]


def _kept_shape(shape, axes):
  return tuple(d for i, d in enumerate(shape) if i not in axes)


@pytest.mark.parametrize('shape,axes', SHAPES)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_square_sums_match_float64(shape, axes, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 5, dtype)
  shift = jnp.asarray(rng.standard_normal(_kept_shape(shape, axes)), jnp.float32)
  kept_dims = tuple(1 if i in axes else d for i, d in enumerate(shape))
  fn = lambda x, shift: _native.shifted_sums(x, shift.reshape(kept_dims), axes)
  assert 'jaxbn_square_sums' in _compiled_text(fn, x, shift)
  s1, s2 = jax.jit(fn)(x, shift)
  u = np.asarray(x, np.float64) - np.asarray(shift, np.float64).reshape(kept_dims)
  _assert_sum_close(s1, u, axes)
  _assert_sum_close(s2, u * u, axes)


@pytest.mark.parametrize('shape,axes', SHAPES)
@pytest.mark.parametrize('dtypes', [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                    (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)])
def test_product_sums_match_float64(shape, axes, dtypes):
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.standard_normal(shape), dtypes[0])
  b = jnp.asarray(rng.standard_normal(shape) + 10, dtypes[1])
  kept_dims = tuple(1 if i in axes else d for i, d in enumerate(shape))
  mean = jnp.asarray(rng.standard_normal(kept_dims) + 10, jnp.float32)
  fn = lambda a, b, mean: _native.shifted_sums(a, 0.0, axes, b, mean)
  assert 'jaxbn_product_sums' in _compiled_text(fn, a, b, mean)
  s1, s2 = jax.jit(fn)(a, b, mean)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  _assert_sum_close(s1, a64, axes)
  _assert_sum_close(s2, a64 * (b64 - np.asarray(mean, np.float64)), axes)


@pytest.mark.parametrize('shape,axes', [((5, 40), (1,)), ((3, 4, 5), (1,)), ((6, 4), ())])
def test_layouts_the_kernels_do_not_serve_keep_xla_sums(shape, axes):
  # Features first (a layer norm's rows), kept axes apart, nothing reduced.
  x = jnp.asarray(np.random.default_rng(4).standard_normal(shape) + 3, jnp.float32)
  fn = lambda x: _native.shifted_sums(x, None, axes)
  assert 'jaxbn_' not in _compiled_text(fn, x)
  s1, s2 = jax.jit(fn)(x)
  x64 = np.asarray(x, np.float64)
  _assert_sum_close(s1, x64, axes)
  _assert_sum_close(s2, x64 * x64, axes)


def test_xla_and_native_sums_agree():
  x = jax.random.normal(jax.random.key(0), (513, 17)) + 2
  native = lambda x: _native.shifted_sums(x, 1.0, (0,))
  with _native.xla_sums_only():
    xla = lambda x: _native.shifted_sums(x, 1.0, (0,))
    assert 'jaxbn_' not in _compiled_text(xla, x)
    xla_sums = jax.jit(xla)(x)
  assert 'jaxbn_square_sums' in _compiled_text(native, x)
  for n, r in zip(jax.jit(native)(x), xla_sums):
    np.testing.assert_allclose(n, r, rtol=1e-5)


def test_batch_norm_training_runs_the_kernels_forward_and_backward():
  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 8))
  state = jaxbn.init_state(8)

  def loss(x):
    return jnp.sum(jaxbn.batch_norm(x, state, training=True)[0] ** 3)
  text = _compiled_text(jax.grad(loss), x)
  assert 'jaxbn_square_sums' in text and 'jaxbn_product_sums' in text


def test_kernels_are_left_out_of_exported_programs():
  x = jax.random.normal(jax.random.key(0), (64, 8)) + 1
  state = jaxbn.init_state(8)
  grad = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, state, training=True)[0] ** 3))
  exported = jax.export.export(jax.jit(grad))(x)
  assert 'jaxbn_' not in exported.mlir_module()
  np.testing.assert_allclose(exported.call(x), jax.jit(grad)(x), rtol=1e-5, atol=1e-6)


def test_sums_under_vmap_match_the_unbatched_ones():
  x = jax.random.normal(jax.random.key(0), (3, 40, 8))
  batched = jax.vmap(lambda x: _native.shifted_sums(x, 0.0, (0,)))(x)
  for i in range(3):
    for b, u in zip(batched, _native.shifted_sums(x[i], 0.0, (0,))):
      np.testing.assert_allclose(b[i], u, rtol=1e-6)


def test_second_derivatives_through_the_kernels_match_float64():
  # A Hessian-vector product differentiates the backward pass, and with it
  # the product sums' derivative rule. Reference: central differences of the
  # float64 gradient, off by ~h^2 = 1e-10 relative.
  rng = np.random.default_rng(2)
  x, v, w = (rng.standard_normal((12, 5)) for _ in range(3))
  state = jaxbn.init_state(5)
  loss = lambda x: jnp.sum(jnp.sin(jaxbn.batch_norm(x, state, training=True)[0]) * w)
  hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(loss), (x,), (v,))[1])
  got = hvp(jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32))
  h = 1e-5
  want = (_bn_grad64(x + h * v, w) - _bn_grad64(x - h * v, w)) / (2 * h)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def _bn_grad64(x, w):
  """Gradient of ``sum(sin(bn(x)) * w)`` over axis 0, epsilon 1e-5, in float64."""
  centred = x - x.mean(0)
  std = np.sqrt((centred**2).mean(0) + 1e-5)
  xh = centred / std
  g = np.cos(xh) * w
  return (g - g.mean(0) - xh * (g * xh).mean(0)) / std


@pytest.mark.parametrize('paired', [False, True])
def test_the_sums_differentiate_exactly(paired):
  rng = np.random.default_rng(3)
  a, b, da, db = (jnp.asarray(rng.standard_normal((50, 4)), jnp.float32) for _ in range(4))
  sa, sb, dsa, dsb = (jnp.asarray(rng.standard_normal((1, 4)), jnp.float32) for _ in range(4))
  if paired:
    fn = lambda a, sa, b, sb: _native.shifted_sums(a, sa, (0,), b, sb)
    primals, tangents = (a, sa, b, sb), (da, dsa, db, dsb)
    u, du, v, dv = a - sa, da - dsa, b - sb, db - dsb
  else:
    fn = lambda a, sa: _native.shifted_sums(a, sa, (0,))
    primals, tangents = (a, sa), (da, dsa)
    u, du = a - sa, da - dsa
    v, dv = u, du
  _, (d1, d2) = jax.jit(lambda p, t: jax.jvp(fn, p, t))(primals, tangents)
  u, du, v, dv = (np.asarray(t, np.float64) for t in (u, du, v, dv))
  np.testing.assert_allclose(d1, du.sum(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d2, (du * v + u * dv).sum(0), rtol=1e-5, atol=1e-5)


def test_results_depend_on_the_shape_not_on_the_threads(tmp_path):
  # Blocks of rows are summed in a fixed order: one thread or several, the
  # same bits.
  script = textwrap.dedent('''
      import json, sys, jax, jax.numpy as jnp, numpy as np
      from jaxbn import _native
      sums = []
      for shape, axes in (((4096, 96), (0,)), ((64, 8, 2000), (0, 2)), ((2, 8, 40000), (0, 2))):
        x = jax.random.normal(jax.random.key(0), shape) + 3
        sums += jax.jit(lambda x: _native.shifted_sums(x, None, axes))(x)
      print(json.dumps([np.asarray(v).view(np.uint32).tolist() for v in sums]))
  ''')
  outputs = []
  for flags in ('', '--xla_cpu_multi_thread_eigen=false'):
    env = dict(os.environ, XLA_FLAGS=flags)
    run = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                         text=True, check=True)
    outputs.append(json.loads(run.stdout))
  assert outputs[0] == outputs[1]


def _run(script, **env):
  env = {**os.environ, **env}
  return subprocess.run([sys.executable, '-c', textwrap.dedent(script)], env=env,
                        capture_output=True, text=True)


GRADIENT_CHECK = '''
    import jax, jax.numpy as jnp, numpy as np, jaxbn
    from jaxbn import _native
    x = np.random.default_rng(0).standard_normal((64, 6)) * 2 + 1
    g = np.random.default_rng(1).standard_normal((64, 6))
    grad = jax.jit(jax.grad(
        lambda x: jnp.sum(jaxbn.batch_norm(x, jaxbn.init_state(6), training=True)[0] * g)))
    text = grad.lower(jnp.asarray(x, jnp.float32)).compile().as_text()
    got = np.asarray(grad(jnp.asarray(x, jnp.float32)), np.float64)
    c = x - x.mean(0); std = np.sqrt((c * c).mean(0) + 1e-5); xh = c / std
    want = (g - g.mean(0) - xh * (g * xh).mean(0)) / std
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max(), np.abs(got - want).max()
    print('native' if 'jaxbn_' in text else 'xla', _native.available())
'''


def test_jaxbn_native_0_keeps_every_sum_in_xla():
  run = _run(GRADIENT_CHECK, JAXBN_NATIVE='0')
  assert run.returncode == 0, run.stderr
  assert run.stdout.split() == ['xla', 'False']


def test_a_failed_build_falls_back_to_xla_with_a_warning(tmp_path):
  run = _run(GRADIENT_CHECK, JAXBN_NATIVE='auto', CXX='false', JAXBN_CACHE_DIR=str(tmp_path))
  assert run.returncode == 0, run.stderr
  assert run.stdout.split() == ['xla', 'False']
  assert 'native CPU sums unavailable' in run.stderr and 'JAXBN_NATIVE=0' in run.stderr


def test_a_missing_compiler_falls_back_and_says_how_to_fix(tmp_path):
  run = _run(GRADIENT_CHECK, CXX=str(tmp_path / 'no-such-c++'), JAXBN_CACHE_DIR=str(tmp_path))
  assert run.returncode == 0, run.stderr
  assert run.stdout.split() == ['xla', 'False']
  assert 'could not run' in run.stderr and 'install g++ or clang, or set CXX' in run.stderr
  assert not list(tmp_path.glob('*.part'))


def test_jaxbn_native_1_makes_a_failed_build_an_error(tmp_path):
  run = _run(GRADIENT_CHECK, JAXBN_NATIVE='1', CXX='false', JAXBN_CACHE_DIR=str(tmp_path))
  assert run.returncode != 0
  assert 'NativeBuildError' in run.stderr and 'false' in run.stderr


def test_an_unwritable_cache_falls_back_and_says_which_folder(tmp_path):
  blocked = tmp_path / 'file'
  blocked.write_text('not a folder')
  run = _run(GRADIENT_CHECK, JAXBN_CACHE_DIR=str(blocked / 'cache'))
  assert run.returncode == 0, run.stderr
  assert run.stdout.split() == ['xla', 'False']
  assert 'JAXBN_CACHE_DIR' in run.stderr and str(blocked) in run.stderr


def test_a_fresh_cache_builds_once_and_is_reused(tmp_path):
  first = _run(GRADIENT_CHECK, JAXBN_NATIVE='1', JAXBN_CACHE_DIR=str(tmp_path))
  assert first.returncode == 0, first.stderr
  assert first.stdout.split() == ['native', 'True']
  (library,) = tmp_path.glob('jaxbn_native_*.so')
  built = library.stat().st_mtime_ns
  second = _run(GRADIENT_CHECK, JAXBN_NATIVE='1', JAXBN_CACHE_DIR=str(tmp_path))
  assert second.returncode == 0, second.stderr
  assert second.stdout.split() == ['native', 'True']
  assert list(tmp_path.iterdir()) == [library] and library.stat().st_mtime_ns == built


def test_a_compiler_that_rejects_march_native_gets_a_portable_build(tmp_path):
  # As some clang releases do on arm64.
  real = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  compiler = tmp_path / 'c++'
  compiler.write_text(textwrap.dedent(f"""\
      #!/bin/sh
      for flag in "$@"; do
        if [ "$flag" = -march=native ]; then
          echo tried >> {tmp_path / 'tuned-attempts'}
          echo "error: unsupported argument 'native' to option '-march='" >&2; exit 1
        fi
      done
      exec {real} "$@"
      """))
  compiler.chmod(0o755)
  cache = tmp_path / 'cache'
  for _ in range(2):  # built once; then found, -march=native not tried again
    run = _run(GRADIENT_CHECK + '    print(_native._build().name)\n',
               JAXBN_NATIVE='1', CXX=str(compiler), JAXBN_CACHE_DIR=str(cache))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[:2] == ['native', 'True']
    assert [p.name for p in cache.iterdir()] == [run.stdout.split()[2]]
  assert (tmp_path / 'tuned-attempts').read_text() == 'tried\n'


def test_builds_for_different_apple_chips_are_cached_apart(monkeypatch):
  # macOS has no /proc/cpuinfo: the chip's name from sysctl keys the build,
  # so a cache shared between machines never loads another chip's build.
  real_open = open

  def open_without_proc(path, *args, **kwargs):
    if str(path) == '/proc/cpuinfo':
      raise FileNotFoundError(path)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr('builtins.open', open_without_proc)
  monkeypatch.setattr(_native.sys, 'platform', 'darwin')
  paths = {}
  for chip in ('Apple M1', 'Apple M3'):
    sysctl = lambda command, **_: subprocess.CompletedProcess(command, 0, chip + '\n', '')
    monkeypatch.setattr(_native.subprocess, 'run', sysctl)
    assert _native._cpu_signature() == chip
    paths[chip] = _native._cached_path('c++', _native._FLAGS + ('-march=native',))
  assert paths['Apple M1'] != paths['Apple M3']


def test_a_bad_jaxbn_native_value_says_what_is_allowed():
  run = _run('import jax, jaxbn; from jaxbn import _native; _native.available()',
             JAXBN_NATIVE='yes')
  assert run.returncode != 0 and 'JAXBN_NATIVE' in run.stderr and '0' in run.stderr


def test_programs_partitioned_by_xla_keep_its_sums():
  # XLA splits its own reductions across devices; a custom call it would
  # have to gather the whole batch for.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ('data',))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (64, 8)) + 1,
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  state = jaxbn.init_state(8)
  grad = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, state, training=True)[0] ** 3))
  assert 'jaxbn_' not in _compiled_text(grad, x)
  np.testing.assert_allclose(jax.jit(grad)(x), jax.jit(grad)(np.asarray(x)), rtol=1e-5,
                             atol=1e-5)


def test_shard_map_bodies_use_the_kernels():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ('data',))
  spec = jax.sharding.PartitionSpec('data')
  state = jaxbn.init_state(8)
  local = lambda x: jaxbn.batch_norm(x, state, training=True, axis_name='data')[0]
  grad = jax.grad(lambda x: jnp.sum(jax.shard_map(local, mesh=mesh, in_specs=spec,
                                                  out_specs=spec)(x) ** 3))
  x = jax.random.normal(jax.random.key(0), (64, 8)) + 1
  text = _compiled_text(grad, x)
  assert 'jaxbn_square_sums' in text and 'jaxbn_product_sums' in text
  whole = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, state, training=True)[0] ** 3))
  np.testing.assert_allclose(jax.jit(grad)(x), jax.jit(whole)(x), rtol=1e-4, atol=1e-5)


def test_a_new_build_removes_long_unused_builds_and_old_partial_files(tmp_path):
  # What upgrades of jaxbn or jaxlib and killed builds leave in the cache.
  days = lambda n: time.time() - n * 86400
  files = {'jaxbn_native_0000000000000001.so': days(40),   # unused for 40 days: removed
           'jaxbn_native_0000000000000002.so': days(10),   # kept
           'jaxbn_native_abc.so.part': days(2),            # a killed build's: removed
           'jaxbn_native_def.so.part': days(0),            # perhaps being built: kept
           'notes.txt': days(400)}                          # not jaxbn's: kept
  for name, mtime in files.items():
    (tmp_path / name).write_text('')
    os.utime(tmp_path / name, (mtime, mtime))
  run = _run(GRADIENT_CHECK + '    print(_native._build().name)\n', JAXBN_NATIVE='1',
             JAXBN_CACHE_DIR=str(tmp_path))
  assert run.returncode == 0, run.stderr
  built = run.stdout.split()[2]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [built, 'jaxbn_native_0000000000000002.so', 'jaxbn_native_def.so.part', 'notes.txt'])


def test_loading_a_cached_build_dates_it_to_today(tmp_path):
  first = _run(GRADIENT_CHECK, JAXBN_NATIVE='1', JAXBN_CACHE_DIR=str(tmp_path))
  assert first.returncode == 0, first.stderr
  (library,) = tmp_path.glob('jaxbn_native_*.so')
  old = time.time() - 20 * 86400
  os.utime(library, (old, old))
  second = _run(GRADIENT_CHECK, JAXBN_NATIVE='1', JAXBN_CACHE_DIR=str(tmp_path))
  assert second.stdout.split() == ['native', 'True'], second.stderr
  assert time.time() - library.stat().st_mtime < 3600
