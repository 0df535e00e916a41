# Copyright 2024 The Flax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""Flax's Linen BatchNorm tests, run against ``jaxbn.linen.BatchNorm``.

Ported from google/flax (flax 0.12.8):
  tests/linen/linen_test.py        NormalizationTest.test_batch_norm,
                                   test_batch_norm_complex,
                                   test_batch_norm_multi_init
  tests/linen/linen_module_test.py ModuleTest.test_bind_stateful
  tests/linen/linen_transforms_test.py TransformTest.test_vmap_batchnorm
  tests/linen/summary_test.py      SummaryTest.test_module_summary (CNN)

Only the import of BatchNorm is swapped (``nn.BatchNorm`` ->
``jaxbn.linen.BatchNorm``); changes are marked ``jaxbn:``. None of these
tests compares against Flax's fast-variance numbers, so they hold with the
same tolerances.
"""

from typing import Any

from absl.testing import absltest, parameterized
from flax import linen as nn
from flax.linen import summary
import jax
from jax import random
import jax.numpy as jnp
import numpy as np

from jaxbn.linen import BatchNorm


class NormalizationTest(parameterized.TestCase):

  @parameterized.parameters({'test_mask': True}, {'test_mask': False})
  def test_batch_norm(self, test_mask):
    rng = random.key(0)
    key1, key2, key3 = random.split(rng, 3)
    x = random.normal(key1, (4, 3, 2))
    if test_mask:
      m = random.randint(
        key2, (4, 3, 1), minval=0, maxval=2, dtype=jnp.int32
      ).astype(jnp.bool_)
      x = jnp.where(m, x, jnp.ones_like(x) * jnp.nan)
    else:
      m = None
    model_cls = BatchNorm(momentum=0.9, use_running_average=False)
    y, initial_params = model_cls.init_with_output(key3, x, mask=m)

    mean = y.mean((0, 1), where=m)
    var = y.var((0, 1), where=m)
    np.testing.assert_allclose(mean, np.array([0.0, 0.0]), atol=1e-4)
    np.testing.assert_allclose(var, np.array([1.0, 1.0]), rtol=1e-4)
    _, vars_out = model_cls.apply(
      initial_params, x, mutable=['batch_stats'], mask=m
    )

    ema = vars_out['batch_stats']
    np.testing.assert_allclose(
      ema['mean'], 0.1 * x.mean((0, 1), keepdims=False, where=m), atol=1e-4
    )
    np.testing.assert_allclose(
      ema['var'],
      0.9 + 0.1 * x.var((0, 1), keepdims=False, where=m),
      rtol=1e-4,
    )

  @parameterized.parameters({'test_mask': True}, {'test_mask': False})
  def test_batch_norm_complex(self, test_mask):
    rng = random.key(0)
    key1, key2, key3 = random.split(rng, 3)
    x = random.normal(key1, (4, 3, 2), dtype=jnp.complex64)
    if test_mask:
      m = random.randint(
        key2, (4, 3, 1), minval=0, maxval=2, dtype=jnp.int32
      ).astype(jnp.bool_)
      x = jnp.where(m, x, jnp.ones_like(x) * jnp.nan)
    else:
      m = None
    model_cls = BatchNorm(
      momentum=0.9, use_running_average=False, dtype=jnp.complex64
    )
    y, initial_params = model_cls.init_with_output(key3, x, mask=m)

    mean = y.mean((0, 1), where=m)
    var = y.var((0, 1), where=m)
    np.testing.assert_allclose(mean, np.array([0.0, 0.0]), atol=1e-4)
    np.testing.assert_allclose(var, np.array([1.0, 1.0]), rtol=1e-4)
    self.assertEqual(mean.dtype, jnp.complex64)

    _, vars_out = model_cls.apply(
      initial_params, x, mutable=['batch_stats'], mask=m
    )

    ema = vars_out['batch_stats']
    np.testing.assert_allclose(
      ema['mean'], 0.1 * x.mean((0, 1), keepdims=False, where=m), atol=1e-4
    )
    np.testing.assert_allclose(
      ema['var'],
      0.9 + 0.1 * x.var((0, 1), keepdims=False, where=m),
      rtol=1e-4,
    )

  def test_batch_norm_multi_init(self):
    class Foo(nn.Module):
      @nn.compact
      def __call__(self, x):
        norm = BatchNorm(
          name='norm',
          use_running_average=False,
          axis_name='batch',
        )
        x = norm(x)
        return x, norm(x)

    key = random.key(0)
    model = Foo()
    x = random.normal(random.key(1), (2, 4))
    (y1, y2), _ = model.init_with_output(key, x)
    np.testing.assert_allclose(y1, y2, rtol=0.005)


class ModuleTest(absltest.TestCase):

  def test_bind_stateful(self):
    class Foo(nn.Module):
      def setup(self):
        self.a = nn.Dense(3)
        self.bn = BatchNorm()
        self.b = nn.Dense(1)

    def f(foo, x):
      x = foo.a(x)
      x = foo.bn(x, use_running_average=False)
      return foo.b(x)

    foo = Foo()
    # jaxbn: Flax uses x = jnp.ones((4,)), a single example, whose batch
    # variance is 0; jaxbn refuses a batch of one in training (outside init),
    # so the same test runs on a batch of two examples.
    x = jnp.ones((2, 4))
    f_init = nn.init_with_output(f, foo)
    y1, variables = f_init(random.key(0), x)
    foo_b = foo.bind(variables, mutable='batch_stats')
    y2 = f(foo_b, x)
    y3, new_state = nn.apply(f, foo, mutable='batch_stats')(variables, x)
    # jaxbn: assertEqual on arrays of one element in Flax; elementwise here.
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y2, y3)
    bs_1 = new_state['batch_stats']
    bs_2 = foo_b.variables['batch_stats']
    for x, y in zip(
      jax.tree_util.tree_leaves(bs_1), jax.tree_util.tree_leaves(bs_2)
    ):
      np.testing.assert_allclose(x, y)


class TransformTest(absltest.TestCase):

  def test_vmap_batchnorm(self):
    key1, key2, key3 = random.split(random.key(3), 3)
    x = random.uniform(key1, (4, 4))
    x2 = random.uniform(key2, (5, 4, 4))

    def vmap(cls):
      return nn.vmap(
          cls,
          in_axes=(0,),
          variable_axes={'params': None, 'batch_stats': None},
          split_rngs={'params': False},
          axis_name='batch',
      )

    class MlpBn(nn.Module):
      axis_name: Any = None

      @nn.compact
      def __call__(self, x):
        x = nn.Dense(3)(x)
        x = BatchNorm(axis_name=self.axis_name, use_running_average=False)(x)
        return x

    normal_model = MlpBn()
    vmap_model = vmap(MlpBn)(axis_name='batch')
    init_variables = normal_model.init(key3, x)
    y1 = normal_model.apply(
        init_variables, x2.reshape((-1, 4)), mutable=['batch_stats']
    )[0]
    y1 = y1.reshape((5, 4, 3))
    y2 = vmap_model.apply(init_variables, x2, mutable=['batch_stats'])[0]
    np.testing.assert_allclose(y1, y2, atol=1e-5)


def _get_shapes(pytree):
  return jax.tree_util.tree_map(
    lambda x: x.shape if hasattr(x, 'shape') else x, pytree
  )


def _get_obj_repr_value(x):
  if isinstance(x, summary._ObjectRepresentation):
    return x.obj
  return x


class ConvBlock(nn.Module):
  features: int
  kernel_size: list[int]
  test_sow: bool

  def setup(self) -> None:
    self.conv = nn.Conv(self.features, self.kernel_size)
    self.bn = BatchNorm()
    self.dropout = nn.Dropout(0.5)

  def block_method(self, x, training: bool):
    x = self.conv(x)

    if self.test_sow:
      self.sow('intermediates', 'INTERM', x)

    x = self.bn(x, use_running_average=not training)
    x = self.dropout(x, deterministic=not training)
    x = nn.relu(x)
    return x

  def __call__(self, x, training: bool):
    return self.block_method(x, training)


class CNN(nn.Module):
  test_sow: bool

  def setup(self) -> None:
    self.block1 = ConvBlock(32, [3, 3], test_sow=self.test_sow)
    self.block2 = ConvBlock(64, [3, 3], test_sow=self.test_sow)
    self.dense = nn.Dense(10)

  def __call__(self, x, training: bool):
    x = self.block1.block_method(x, training=training)
    x = self.block2.block_method(x, training=training)
    x = x.mean(axis=(1, 2))

    if self.test_sow:
      self.sow('intermediates', 'INTERM', x)

    x = self.dense(x)

    return x, dict(a=x, b=x + 1.0)


class SummaryTest(absltest.TestCase):

  def test_module_summary(self):
    # jaxbn: Flax uses batch_size = 32 and 28x28 images; a smaller input
    # keeps the test fast and checks the same rows and shapes.
    batch_size = 4

    x = jnp.ones((batch_size, 12, 12, 1))
    module = CNN(test_sow=False)

    table = summary._get_module_table(
      module,
      depth=None,
      show_repeated=True,
      compute_flops=True,
      compute_vjp_flops=True,
    )(
      {'dropout': random.key(0), 'params': random.key(1)},
      x,
      training=True,
      mutable=True,
    )
    for row in table:
      row.inputs = jax.tree_util.tree_map(_get_obj_repr_value, row.inputs)
      row.outputs = jax.tree_util.tree_map(_get_obj_repr_value, row.outputs)

    # 10 rows = 1 CNN + 4 ConvBlock_0 + 4 ConvBlock_1 + 1 Dense_0
    self.assertLen(table, 10)

    self.assertEqual(table[0].path, ())
    self.assertEqual(table[1].path, ('block1',))
    self.assertEqual(table[2].path, ('block1', 'conv'))
    self.assertEqual(table[3].path, ('block1', 'bn'))
    self.assertEqual(table[4].path, ('block1', 'dropout'))
    self.assertEqual(table[5].path, ('block2',))
    self.assertEqual(table[6].path, ('block2', 'conv'))
    self.assertEqual(table[7].path, ('block2', 'bn'))
    self.assertEqual(table[8].path, ('block2', 'dropout'))
    self.assertEqual(table[9].path, ('dense',))

    self.assertEqual(
      _get_shapes(table[3].inputs),
      ((batch_size, 12, 12, 32), {'use_running_average': False}),
    )
    self.assertEqual(table[3].outputs.shape, (batch_size, 12, 12, 32))
    self.assertEqual(
      _get_shapes(table[7].inputs),
      ((batch_size, 12, 12, 64), {'use_running_average': False}),
    )
    self.assertEqual(table[7].outputs.shape, (batch_size, 12, 12, 64))
    self.assertEqual(table[9].inputs.shape, (batch_size, 64))
    self.assertEqual(table[9].outputs.shape, (batch_size, 10))

    for row in table:
      self.assertEqual(row.module_variables, row.counted_variables)

    # Each module FLOPs >= sum of its submodule FLOPs.
    for r in table:
      flops, vjp_flops = r.flops, r.vjp_flops
      submodule_flops, submodule_vjp_flops = 0, 0
      for s in table:
        if len(s.path) == len(r.path) + 1 and s.path[: len(r.path)] == r.path:
          submodule_flops += s.flops
          submodule_vjp_flops += s.vjp_flops

      self.assertGreaterEqual(flops, submodule_flops)
      self.assertGreaterEqual(vjp_flops, submodule_vjp_flops)

    # jaxbn: the BatchNorm rows hold exactly Flax's variables.
    bn_vars = table[3].module_variables
    self.assertEqual(
        jax.tree_util.tree_map(jnp.shape, bn_vars),
        {'batch_stats': {'mean': (32,), 'var': (32,)},
         'params': {'scale': (32,), 'bias': (32,)}},
    )


if __name__ == '__main__':
  absltest.main()
