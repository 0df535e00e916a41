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

"""Flax's NNX transform and integration tests that use BatchNorm, on jaxbn's.

Ported from google/flax (flax 0.12.8):
  tests/nnx/transforms_test.py      TestJIT.test_graph_updates_unflatten;
                                    TestScan.test_complex* (12 tests);
                                    TestVmap.test_state_axes_simple*,
                                    test_split_rngs_decorator_simple*,
                                    test_state_axes_super_simple,
                                    test_example, test_state_axes_from_state*
  tests/nnx/integration_test.py     test_basic_view_example,
                                    test_shared_modules*,
                                    test_example_mutable_arrays,
                                    test_tree_mode_multi_module
  tests/nnx/bridge/wrappers_test.py test_linen_to_nnx_submodule,
                                    test_nnx_to_linen_multiple_collections

Only ``nnx.BatchNorm`` / ``nn.BatchNorm`` are swapped for jaxbn's layers.
The one other change, marked ``jaxbn:``: several of these tests run a
training-mode BatchNorm on a single example (``jnp.ones((1, 3))``, or
``(5, 1, 2)`` under ``vmap``), where Flax returns ``bias`` because the
variance of one value is 0. jaxbn refuses a batch of one in training with a
ValueError that names the fix, so those tests use two examples; the shapes
they assert change accordingly.

To keep the suite fast, the decorator and broadcast-dropout-view variants of
``TestScan.test_complex*_functional`` run in tree mode (``graph_mode=False``)
only: their graph-mode twins compile the same BatchNorm program again, and
graph mode is covered by the non-functional variants.
"""

import typing as tp

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

from jaxbn.nnx import BatchNorm
import jaxbn.linen


class TestJIT(parameterized.TestCase):

  def test_graph_updates_unflatten(self):
    n = 0

    class Foo(nnx.Module):
      def __init__(self, *, rngs: nnx.Rngs):
        self.a = nnx.Linear(2, 2, rngs=rngs)
        self.b = BatchNorm(2, rngs=rngs)

    @nnx.jit(graph=True, graph_updates=True)
    def f(m: Foo):
      nonlocal n
      n += 1
      m.a, m.b = m.b, m.a  # type: ignore

    m = Foo(rngs=nnx.Rngs(0))
    a = m.a
    b = m.b
    a_kernel = a.kernel[...]
    a_bias = a.bias[...]
    b_scale = b.scale[...]
    b_bias = b.bias[...]
    b_mean = b.mean[...]
    b_var = b.var[...]

    f(m)

    self.assertEqual(n, 1)
    self.assertIs(m.a, b)
    self.assertIs(m.b, a)
    np.testing.assert_allclose(a_kernel, a.kernel[...])
    np.testing.assert_allclose(a_bias, a.bias[...])
    np.testing.assert_allclose(b_scale, b.scale[...])
    np.testing.assert_allclose(b_bias, b.bias[...])
    np.testing.assert_allclose(b_mean, b.mean[...])
    np.testing.assert_allclose(b_var, b.var[...])

    f(m)

    self.assertEqual(n, 2)
    self.assertIs(m.a, a)
    self.assertIs(m.b, b)

    f(m)

    self.assertEqual(n, 2)
    self.assertIs(m.a, b)
    self.assertIs(m.b, a)

    f(m)

    self.assertEqual(n, 2)
    self.assertIs(m.a, a)
    self.assertIs(m.b, b)


class TestScan(parameterized.TestCase):

  def test_complex(self):
    state_axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class MLP(nnx.Module):
      @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = MLP(rngs=nnx.Rngs(0))
    module.set_attributes(deterministic=False, use_running_average=False)

    assert module.linear.kernel.shape == (5, 3, 3)
    assert module.linear.bias.shape == (5, 3)
    assert module.node.shape == (2,)

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = module(x)

    assert y.shape == (2, 3)

  @parameterized.parameters(True, False)
  def test_complex_functional(self, graph_mode):
    class MLP(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.BatchStat(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      m = MLP(rngs=rngs)
      m.set_attributes(deterministic=False, use_running_average=False)
      return m

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = forward(module, x)

    assert y.shape == (2, 3)

  def test_complex_view(self):
    state_axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class MLP(nnx.Module):
      @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = MLP(rngs=nnx.Rngs(0))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    assert new_module.linear.kernel.shape == (5, 3, 3)
    assert new_module.linear.bias.shape == (5, 3)
    assert new_module.node.shape == (2,)

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = new_module(x)

    assert y.shape == (2, 3)

  @parameterized.parameters(True, False)
  def test_complex_view_functional(self, graph_mode):
    class MLP(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      return MLP(rngs=rngs)

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = forward(new_module, x)

    assert y.shape == (2, 3)

  def test_complex_broadcast_dropout(self):
    state_axes = nnx.StateAxes({(nnx.Param, 'params'): 0, ...: None})

    class MLP(nnx.Module):
      @nnx.split_rngs(splits=5, only='params', graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.split_rngs(splits=5, only='params', graph=True, graph_updates=True)
      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = MLP(rngs=nnx.Rngs(params=0, dropout=1))
    module.set_attributes(deterministic=False, use_running_average=False)

    assert module.linear.kernel.shape == (5, 3, 3)
    assert module.linear.bias.shape == (5, 3)
    assert module.node.shape == (2,)

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = module(x)

    assert y.shape == (2, 3)

  @parameterized.parameters((False,))
  def test_complex_broadcast_dropout_functional(self, graph_mode):

    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = nnx.gelu(self.dropout(self.bn(self.linear(x))))
        return x, None

    rngs = nnx.Rngs(params=0, dropout=1)
    dummy_module = Block(rngs)
    (module_axes, rngs_axes) = nnx.prefix((dummy_module, rngs), {(nnx.Param, 'params', 'dropout'): 0, ...: None}, graph=graph_mode)

    @nnx.with_rngs(split={'params': 5}, broadcast={'dropout': 5}, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=(rngs_axes,), out_axes=module_axes, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs: nnx.Rngs):
      return Block(rngs=rngs)

    module = create(rngs)

    @nnx.scan(in_axes=(module_axes, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      module = nnx.with_attributes(module, deterministic=False, use_running_average=False)
      return module(x)

    assert module.linear.kernel.shape == (5, 3, 3)
    assert module.linear.bias.shape == (5, 3)
    assert module.node.shape == (2,)

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = forward(module, x)

    assert y.shape == (2, 3)

  def test_complex_broadcast_dropout_view(self):
    state_axes = nnx.StateAxes({(nnx.Param, 'params'): 0, ...: None})

    class MLP(nnx.Module):
      @nnx.split_rngs(splits=5, only='params', graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.split_rngs(splits=5, only='params', graph=True, graph_updates=True)
      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = MLP(rngs=nnx.Rngs(params=0, dropout=1))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    assert new_module.linear.kernel.shape == (5, 3, 3)
    assert new_module.linear.bias.shape == (5, 3)
    assert new_module.node.shape == (2,)

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = new_module(x)

    assert y.shape == (2, 3)

  def test_complex_decorator(self):
    state_axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class Block(nnx.Module):
      @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), axis_size=5, graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = Block(rngs=nnx.Rngs(0))
    module.set_attributes(deterministic=False, use_running_average=False)

    assert module.d == 3
    assert module.linear.kernel.shape == (5, 3, 3)
    assert module.linear.bias.shape == (5, 3)
    assert module.node.shape == (2,)

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, out = module(x)

    assert y.shape == (2, 3)
    assert out is None

  @parameterized.parameters((False,))  # jaxbn: tree mode only, see module docstring
  def test_complex_decorator_functional(self, graph_mode):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      m = Block(rngs=rngs)
      m.set_attributes(deterministic=False, use_running_average=False)
      return m

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = forward(module, x)

    assert y.shape == (2, 3)

  @parameterized.parameters((False,))  # jaxbn: tree mode only, see module docstring
  def test_complex_broadcast_dropout_view_functional(self, graph_mode):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      m = Block(rngs=rngs)
      m.set_attributes(deterministic=False, use_running_average=False)
      return m

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = forward(module, x)

    assert y.shape == (2, 3)

  def test_complex_decorator_view(self):
    state_axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class Block(nnx.Module):
      @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), axis_size=5, graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = Block(rngs=nnx.Rngs(0))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    assert new_module.d == 3
    assert new_module.linear.kernel.shape == (5, 3, 3)
    assert new_module.linear.bias.shape == (5, 3)
    assert new_module.node.shape == (2,)

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, out = new_module(x)

    assert y.shape == (2, 3)
    assert out is None

  @parameterized.parameters((False,))  # jaxbn: tree mode only, see module docstring
  def test_complex_decorator_view_functional(self, graph_mode):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      return Block(rngs=rngs)

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    assert new_module.d == 3

    x = jnp.ones((2, 3))  # jaxbn: 2 examples, see module docstring
    y, _ = forward(new_module, x)

    assert y.shape == (2, 3)


class TestVmap(parameterized.TestCase):

  def test_state_axes_simple(self):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = BatchNorm(3, use_running_average=False, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    state_axes = nnx.StateAxes({(nnx.BatchStat, 'dropout'): 0, ...: None})

    @nnx.split_rngs(splits=5, only='dropout')
    @nnx.vmap(
        in_axes=(state_axes,),
        out_axes=state_axes,
        graph=True,
        graph_updates=True,
    )
    def create_block(rngs: nnx.Rngs):
      return Block(rngs)

    rngs = nnx.Rngs(params=0, dropout=1)
    module = create_block(rngs)

    assert module.linear.kernel.shape == (2, 3)
    assert module.bn.scale.shape == (3,)
    assert module.bn.mean.shape == (5, 3)

    @nnx.vmap(
        in_axes=(state_axes, 0), out_axes=0, graph=True, graph_updates=True
    )
    def forward_block(module, x):
      return module(x)

    x = jnp.ones((5, 2, 2))  # jaxbn: 2 examples per member
    y = forward_block(module, x)

    assert y.shape == (5, 2, 3)

  @parameterized.parameters(True, False)
  def test_state_axes_simple_functional(self, graph):
    graph_updates = False

    class Block(nnx.Module):

      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    rngs = nnx.Rngs(params=0, dropout=1).split({'dropout': 5})

    vec_filter = (nnx.BatchStat, 'dropout')
    unb_filter = ...

    abs_block = nnx.eval_shape(lambda: Block(nnx.Rngs(params=0, dropout=1)))
    model_axes = nnx.prefix(
        abs_block, {vec_filter: 0, unb_filter: None}, graph=graph
    )

    @nnx.vmap(
        in_axes=(None, 0),
        out_axes=model_axes,
        graph=graph,
        graph_updates=graph_updates,
    )
    def create_block_functional(params, dropout):
      return Block(nnx.Rngs(params=params, dropout=dropout))

    module = create_block_functional(rngs.params, rngs.dropout)

    self.assertEqual(module.linear.kernel.shape, (2, 3))
    self.assertEqual(module.bn.scale.shape, (3,))
    self.assertEqual(module.bn.mean.shape, (5, 3))

    initial_mean = module.bn.mean[...]

    @nnx.vmap(
        in_axes=(model_axes, 0),
        out_axes=0,
        graph=graph,
        graph_updates=graph_updates,
    )
    def forward_block_functional(module, x):
      return module(x)

    x = jnp.ones((5, 2, 2))  # jaxbn: 2 examples per member
    y = forward_block_functional(module, x)

    self.assertEqual(y.shape, (5, 2, 3))
    # Verify that updates were tracked and applied
    self.assertFalse(jnp.allclose(initial_mean, module.bn.mean[...]))

  def test_split_rngs_decorator_simple(self):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = BatchNorm(3, use_running_average=False, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    state_axes = nnx.StateAxes({(nnx.BatchStat, 'dropout'): 0, ...: None})

    @nnx.split_rngs(splits=5, only='dropout', graph=True, graph_updates=True)
    @nnx.vmap(
        in_axes=(state_axes,),
        out_axes=state_axes,
        graph=True,
        graph_updates=True,
    )
    def create_block(rngs: nnx.Rngs):
      return Block(rngs)

    rngs = nnx.Rngs(params=0, dropout=1)

    module = create_block(rngs)

    assert module.linear.kernel.shape == (2, 3)
    assert module.bn.scale.shape == (3,)
    assert module.bn.mean.shape == (5, 3)
    assert module.dropout.rngs is not None
    self.assertEqual(module.dropout.rngs.key.shape, (5,))

    @nnx.vmap(
        in_axes=(state_axes, 0),
        out_axes=0,
        graph=True,
        graph_updates=True,
    )
    def forward_block(module: Block, x):
      assert module.dropout.rngs is not None
      self.assertEqual(module.dropout.rngs.key.shape, ())
      return module(x)

    x = jnp.ones((5, 2, 2))  # jaxbn: 2 examples per member
    y = forward_block(module, x)

    assert module.dropout.rngs is not None
    self.assertEqual(module.dropout.rngs.key.shape, (5,))
    assert y.shape == (5, 2, 3)

  @parameterized.parameters(True, False)
  def test_split_rngs_decorator_simple_functional(self, graph):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = BatchNorm(3, use_running_average=False, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    vec_filter = (nnx.BatchStat, 'dropout')
    unb_filter = ...

    rngs = nnx.Rngs(params=0, dropout=1)
    abs_block = nnx.eval_shape(lambda: Block(nnx.clone(rngs)))
    model_axes = nnx.prefix(
        abs_block, {vec_filter: 0, unb_filter: None}, graph=graph
    )
    rngs_axes = nnx.prefix(rngs, {'dropout': 0, ...: None}, graph=graph)

    @nnx.split_rngs(splits=5, only='dropout')
    @nnx.vmap(
        in_axes=(rngs_axes,),
        out_axes=model_axes,
        graph=graph,
        graph_updates=False,
    )
    def create_block_functional(rngs):
      return Block(rngs)

    module = create_block_functional(rngs)

    self.assertEqual(module.linear.kernel.shape, (2, 3))
    self.assertEqual(module.bn.scale.shape, (3,))
    self.assertEqual(module.bn.mean.shape, (5, 3))
    self.assertIsNotNone(module.dropout.rngs)
    self.assertEqual(module.dropout.rngs.key.shape, (5,))

    @nnx.vmap(
        in_axes=(model_axes, 0),
        out_axes=0,
        graph=graph,
        graph_updates=False,
    )
    def forward_block_functional(module, x):
      self.assertIsNotNone(module.dropout.rngs)
      self.assertEqual(module.dropout.rngs.key.shape, ())
      return module(x)

    x = jnp.ones((5, 2, 2))  # jaxbn: 2 examples per member
    y = forward_block_functional(module, x)

    self.assertIsNotNone(module.dropout.rngs)
    self.assertEqual(module.dropout.rngs.key.shape, (5,))
    self.assertEqual(y.shape, (5, 2, 3))

  @parameterized.parameters(
      (True, True),
      (True, False),
      (False, False),
  )
  def test_state_axes_super_simple(self, graph, graph_updates):
    class Block(nnx.Module):

      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    @nnx.split_rngs(splits=5, graph=graph, graph_updates=graph_updates)
    @nnx.vmap(
        in_axes=0,
        out_axes=0,
        graph=graph,
        graph_updates=graph_updates,
    )
    def create_block(rngs: nnx.Rngs):
      return Block(rngs)

    rngs = nnx.Rngs(0)
    module = create_block(rngs)

    self.assertEqual(module.linear.kernel.shape, (5, 2, 3))
    self.assertEqual(module.bn.scale.shape, (5, 3))
    self.assertEqual(module.bn.mean.shape, (5, 3))

    @nnx.vmap(
        in_axes=(0, 0),
        out_axes=0,
        graph=graph,
        graph_updates=graph_updates,
    )
    def forward_block(module, x):
      return module(x)

    x = jnp.ones((5, 2, 2))  # jaxbn: 2 examples per member
    y = forward_block(module, x)

    self.assertEqual(y.shape, (5, 2, 3))

  @parameterized.parameters(
    (True, True), (True, False), (False, False),
  )
  def test_example(self, graph, graph_updates):
    class Model(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
        self.bn = BatchNorm(dout, use_running_average=False, rngs=rngs)

      def __call__(self, x):
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    @nnx.vmap(in_axes=0, out_axes=0, graph=graph, graph_updates=graph_updates)
    def initialize_ensemble(key):
      rngs = nnx.Rngs(key)
      return Model(2, 3, rngs=rngs)

    keys = jax.random.split(jax.random.key(0), 5)
    ensemble = initialize_ensemble(keys)

    self.assertEqual(ensemble.linear.kernel.shape, (5, 2, 3))

    @nnx.vmap(in_axes=(0, None), out_axes=0, graph=graph, graph_updates=graph_updates)
    def forward(model, x):
      return model(x)

    x = jnp.ones((4, 2))
    y = forward(ensemble, x)
    self.assertEqual(y.shape, (5, 4, 3))

  def test_state_axes_from_state(self):
    class Model(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = BatchNorm(dout, rngs=rngs)

    model = Model(2, 3, rngs=nnx.Rngs(0))
    state = nnx.state(model)

    state['linear']['kernel'] = 0
    state['linear']['bias'] = 1
    state['bn']['scale'] = 0
    state['bn']['mean'] = 1
    state['bn']['var'] = 0
    state['bn']['bias'] = None

    state_axes = nnx.StateAxes(state)

    self.assertEqual(state_axes.map_prefix(('linear', 'kernel'), None), 0)
    self.assertEqual(state_axes.map_prefix(('linear', 'bias'), None), 1)
    self.assertEqual(state_axes.map_prefix(('bn', 'scale'), None), 0)
    self.assertEqual(state_axes.map_prefix(('bn', 'mean'), None), 1)
    self.assertEqual(state_axes.map_prefix(('bn', 'var'), None), 0)
    self.assertEqual(state_axes.map_prefix(('bn', 'bias'), None), None)

    @nnx.vmap(out_axes=state_axes, axis_size=5, graph=True, graph_updates=True)
    def create_block():
      return Model(2, 3, rngs=nnx.Rngs(0))

    model = create_block()

    self.assertEqual(model.linear.kernel.shape, (5, 2, 3))
    self.assertEqual(model.linear.bias.shape, (3, 5))
    self.assertEqual(model.bn.scale.shape, (5, 3))
    self.assertEqual(model.bn.mean.shape, (3, 5))
    self.assertEqual(model.bn.var.shape, (5, 3))
    self.assertEqual(model.bn.bias.shape, (3,))

  @parameterized.parameters(True, False)
  def test_state_axes_from_state_functional(self, graph):
    class Model(nnx.Module):

      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = BatchNorm(dout, rngs=rngs)

    filter_0 = lambda path, var: (
        (path[0] == 'linear' and path[1] == 'kernel')
        or (path[0] == 'bn' and path[1] in ('scale', 'var'))
    )
    filter_1 = lambda path, var: (
        (path[0] == 'linear' and path[1] == 'bias')
        or (path[0] == 'bn' and path[1] == 'mean')
    )

    abs_model = nnx.eval_shape(lambda: Model(2, 3, rngs=nnx.Rngs(0)))
    model_axes = nnx.prefix(
        abs_model, {filter_0: 0, filter_1: 1, ...: None}, graph=graph
    )

    @nnx.vmap(
        out_axes=model_axes,
        axis_size=5,
        graph=graph,
        graph_updates=False,
    )
    def create_block_functional():
      return Model(2, 3, rngs=nnx.Rngs(0))

    model = create_block_functional()

    self.assertEqual(model.linear.kernel.shape, (5, 2, 3))
    self.assertEqual(model.linear.bias.shape, (3, 5))
    self.assertEqual(model.bn.scale.shape, (5, 3))
    self.assertEqual(model.bn.mean.shape, (3, 5))
    self.assertEqual(model.bn.var.shape, (5, 3))
    self.assertEqual(model.bn.bias.shape, (3,))


class TestIntegration(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_basic_view_example(self, graph_mode):
    class Model(nnx.Module):

      def __init__(self, din, dmid, dout, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dmid, rngs=rngs)
        self.bn = BatchNorm(dmid, use_running_average=False, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, deterministic=False, rngs=rngs)
        self.linear_out = nnx.Linear(dmid, dout, rngs=rngs)

      def __call__(self, x):
        x = nnx.relu(self.dropout(self.bn(self.linear(x))))
        return self.linear_out(x)

    model = Model(2, 64, 3, rngs=nnx.Rngs(0))  # eager initialization
    train_model = nnx.view(
        model, deterministic=False, use_running_average=False
    )
    eval_model = nnx.view(
        model, deterministic=True, use_running_average=True
    )
    optimizer = nnx.Optimizer(train_model, optax.adam(1e-3), wrt=nnx.Param)

    self.assertEqual(train_model.dropout.deterministic, False)
    self.assertEqual(train_model.bn.use_running_average, False)
    self.assertEqual(eval_model.dropout.deterministic, True)
    self.assertEqual(eval_model.bn.use_running_average, True)
    self.assertIs(train_model.dropout.rngs.count, eval_model.dropout.rngs.count)

    @nnx.jit(graph=graph_mode)  # automatic state management for JAX transforms
    def train_step(model, optimizer, x, y):
      def loss_fn(model):
        y_pred = model(x)
        return jnp.mean((y_pred - y) ** 2)

      loss, grads = nnx.compat.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)  # in-place updates

      return loss

    @nnx.jit(graph=graph_mode)
    def eval_step(model, x, y):
      y_pred = model(x)
      return jnp.mean((y_pred - y) ** 2)

    x = jax.random.normal(jax.random.key(0), (8, 2))
    y = jax.random.normal(jax.random.key(1), (8, 3))

    train_step(train_model, optimizer, x, y)
    self.assertEqual(train_model.dropout.rngs.count[...], 1)
    eval_step(eval_model, x, y)
    self.assertEqual(train_model.dropout.rngs.count[...], 1)

  def test_shared_modules(self):
    class Block(nnx.Module):
      def __init__(self, linear: nnx.Linear, *, rngs):
        self.linear = linear
        self.bn = BatchNorm(2, rngs=rngs)

      def __call__(self, x):
        x = self.linear(x)
        x = self.bn(x)
        return nnx.relu(x)

    class Model(nnx.Module):
      def __init__(self, *, rngs):
        shared = nnx.Linear(2, 2, rngs=rngs)
        self.block1 = Block(shared, rngs=rngs)
        self.block2 = Block(shared, rngs=rngs)

      def __call__(self, x):
        x = self.block1(x)
        x = self.block2(x)
        return x

    @nnx.compat.jit
    def train_step(model: Model, x, y):
      @nnx.compat.grad
      def loss_fn(model: Model):
        y_pred = model(x)
        return jnp.mean((y - y_pred) ** 2)

      grads = loss_fn(model)
      nnx.update(
        model,
        jax.tree.map(
          lambda w, g: w - 0.1 * g, nnx.compat.state(model, nnx.Param), grads
        ),
      )

    model = Model(rngs=nnx.Rngs(0))

    x = np.random.uniform(size=(4, 2))
    y = np.random.uniform(size=(4, 2))
    model.set_attributes(use_running_average=False, graph=True)

    for _i in range(3):
      train_step(model, x, y)

    assert model.block1.linear is model.block2.linear
    assert model.block1.linear.bias is not None
    assert model.block1.bn is not model.block2.bn

  def test_shared_modules_view(self):
    class Block(nnx.Module):
      def __init__(self, linear: nnx.Linear, *, rngs):
        self.linear = linear
        self.bn = BatchNorm(2, rngs=rngs)

      def __call__(self, x):
        x = self.linear(x)
        x = self.bn(x)
        return nnx.relu(x)

    class Model(nnx.Module):
      def __init__(self, *, rngs):
        shared = nnx.Linear(2, 2, rngs=rngs)
        self.block1 = Block(shared, rngs=rngs)
        self.block2 = Block(shared, rngs=rngs)

      def __call__(self, x):
        x = self.block1(x)
        x = self.block2(x)
        return x

    @nnx.compat.jit
    def train_step(model: Model, x, y):
      @nnx.compat.grad
      def loss_fn(model: Model):
        y_pred = model(x)
        return jnp.mean((y - y_pred) ** 2)

      grads = loss_fn(model)
      nnx.update(
        model,
        jax.tree.map(
          lambda w, g: w - 0.1 * g, nnx.compat.state(model, nnx.Param), grads
        ),
      )

    model = Model(rngs=nnx.Rngs(0))

    x = np.random.uniform(size=(4, 2))
    y = np.random.uniform(size=(4, 2))
    new_model = nnx.compat.view(model, use_running_average=False)

    for _i in range(3):
      train_step(new_model, x, y)

    assert new_model.block1.linear is new_model.block2.linear
    assert new_model.block1.linear.bias is not None
    assert new_model.block1.bn is not new_model.block2.bn

  def test_shared_modules_pure(self):
    class Block(nnx.Module):
      def __init__(self, linear: nnx.Linear, *, rngs: nnx.Rngs):
        self.linear = linear
        self.bn = BatchNorm(2, rngs=rngs)

      def __call__(self, x):
        x = self.linear(x)
        x = self.bn(x)
        return nnx.relu(x)

    class Model(nnx.Module):
      def __init__(self, *, rngs: nnx.Rngs):
        shared = nnx.Linear(2, 2, rngs=rngs)
        self.block1 = Block(shared, rngs=rngs)
        self.block2 = Block(shared, rngs=rngs)

      def __call__(self, x):
        x = self.block1(x)
        x = self.block2(x)
        return x

    @jax.jit
    def train_step(state: nnx.State, graphdef: nnx.GraphDef[Model], x, y):
      model = nnx.merge(graphdef, state)
      model.set_attributes(use_running_average=False, graph=True)

      @nnx.compat.grad
      def loss_fn(model: Model):
        y_pred = model(x)
        return jnp.mean((y - y_pred) ** 2)

      grads = loss_fn(model)
      nnx.update(
        model,
        jax.tree.map(
          lambda w, g: w - 0.1 * g, nnx.compat.state(model, nnx.Param), grads
        ),
      )

      return nnx.compat.split(model)

    graphdef: nnx.GraphDef[Model]
    graphdef, state = nnx.compat.split(Model(rngs=nnx.Rngs(0)))

    x = np.random.uniform(size=(4, 2))
    y = np.random.uniform(size=(4, 2))

    for _i in range(3):
      graphdef, state = train_step(state, graphdef, x, y)

    model = nnx.merge(graphdef, state)

    assert model.block1.linear.bias is not None
    assert model.block2.linear.bias is not None
    assert model.block1.linear.kernel is model.block2.linear.kernel
    assert model.block1.linear.bias is model.block2.linear.bias
    assert model.block1.bn is not model.block2.bn

  def test_shared_modules_pure_view(self):
    class Block(nnx.Module):
      def __init__(self, linear: nnx.Linear, *, rngs: nnx.Rngs):
        self.linear = linear
        self.bn = BatchNorm(2, rngs=rngs)

      def __call__(self, x):
        x = self.linear(x)
        x = self.bn(x)
        return nnx.relu(x)

    class Model(nnx.Module):
      def __init__(self, *, rngs: nnx.Rngs):
        shared = nnx.Linear(2, 2, rngs=rngs)
        self.block1 = Block(shared, rngs=rngs)
        self.block2 = Block(shared, rngs=rngs)

      def __call__(self, x):
        x = self.block1(x)
        x = self.block2(x)
        return x

    @jax.jit
    def train_step(state: nnx.State, graphdef: nnx.GraphDef[Model], x, y):
      model = nnx.merge(graphdef, state)
      new_model = nnx.compat.view(model, use_running_average=False)

      @nnx.compat.grad
      def loss_fn(model: Model):
        y_pred = model(x)
        return jnp.mean((y - y_pred) ** 2)

      grads = loss_fn(new_model)
      nnx.update(
        new_model,
        jax.tree.map(
          lambda w, g: w - 0.1 * g, nnx.compat.state(new_model, nnx.Param), grads
        ),
      )

      return nnx.compat.split(new_model)

    graphdef: nnx.GraphDef[Model]
    graphdef, state = nnx.compat.split(Model(rngs=nnx.Rngs(0)))

    x = np.random.uniform(size=(4, 2))
    y = np.random.uniform(size=(4, 2))

    for _ in range(3):
      graphdef, state = train_step(state, graphdef, x, y)

    model = nnx.merge(graphdef, state)

    assert model.block1.linear.bias is not None
    assert model.block2.linear.bias is not None
    assert model.block1.linear.kernel is model.block2.linear.kernel
    assert model.block1.linear.bias is model.block2.linear.bias
    assert model.block1.bn is not model.block2.bn

  @nnx.var_defaults(hijax=True)
  def test_example_mutable_arrays(self):
    class Model(nnx.Module):
      def __init__(self, din, dmid, dout, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dmid, rngs=rngs)
        self.bn = BatchNorm(dmid, use_running_average=False, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, deterministic=False, rngs=rngs)
        self.linear_out = nnx.Linear(dmid, dout, rngs=rngs)

      def __call__(self, x):
        x = nnx.relu(self.dropout(self.bn(self.linear(x))))
        return self.linear_out(x)

    model = Model(2, 64, 3, rngs=nnx.Rngs(0))  # eager initialization
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @jax.jit  # automatic state management for JAX transforms
    def train_step(x, y):
      graphdef, params, nondiff = nnx.split(model, nnx.Param, ...)
      def loss_fn(params):
        model =  nnx.merge(graphdef, params, nondiff)
        return ((model(x) - y) ** 2).mean()  # call methods directly

      loss, grads = jax.value_and_grad(loss_fn)(
        nnx.with_vars(params, hijax=False)
      )
      optimizer.update(model, grads)  # in-place updates

      return loss

    x = jax.random.normal(jax.random.key(0), (8, 2))
    y = jax.random.normal(jax.random.key(1), (8, 3))

    train_step(x, y)

  def test_tree_mode_multi_module(self):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = BatchNorm(dout, rngs=rngs)

      def __call__(self, x):
        x = self.linear(x)
        x = self.bn(x)
        return nnx.relu(x)

    class Model(nnx.Module):
      def __init__(self, *, rngs):
        self.block1 = Block(2, 2, rngs=rngs)
        self.block2 = Block(2, 2, rngs=rngs)

      def __call__(self, x):
        x = self.block1(x)
        x = self.block2(x)
        return x

    @nnx.jit(graph=False)
    def train_step(model: Model, x, y):
      @nnx.grad(graph=False)
      def loss_fn(model: Model):
        y_pred = model(x)
        return jnp.mean((y - y_pred) ** 2)

      grads = loss_fn(model)
      model = jax.tree.map(
        lambda w, g: w - 0.1 * g, model, grads,
      )
      return model

    model = Model(rngs=nnx.Rngs(0))

    x = np.random.uniform(size=(4, 2))
    y = np.random.uniform(size=(4, 2))
    model.set_attributes(use_running_average=False)

    for _i in range(3):
      model = train_step(model, x, y)


class TestBridge(absltest.TestCase):

  def test_linen_to_nnx_submodule(self):
    class NNXOuter(nnx.Module):
      def __init__(self, dout: int, *, rngs: nnx.Rngs):
        self.nn_dense1 = bridge.ToNNX(nn.Dense(dout, use_bias=False), rngs=rngs)
        self.b = nnx.Param(jax.random.uniform(rngs.params(), (1, dout,)))
        self.batchnorm = bridge.ToNNX(jaxbn.linen.BatchNorm(use_running_average=True), rngs=rngs)
        self.rngs = rngs

      def __call__(self, x):
        x = self.nn_dense1(x) + self.b
        return self.batchnorm(x)

    x = jax.random.normal(jax.random.key(0), (2, 4))
    model = NNXOuter(3, rngs=nnx.Rngs(0))
    gdef_before_lazy_init, _ = nnx.split(model)
    bridge.lazy_init(model, x)
    gdef_full, state = nnx.split(model)
    assert gdef_before_lazy_init != gdef_full
    assert 'nn_dense1' in state
    assert 'batchnorm' in state
    assert 'kernel' in state['nn_dense1']
    y = model(x)
    k, b = state['nn_dense1']['kernel'][...], state['b'][...]
    np.testing.assert_allclose(y, x @ k + b, rtol=1e-5)
    assert gdef_full == nnx.graphdef(model)  # static data is stable now

  def test_nnx_to_linen_multiple_collections(self):
    class NNXInner(nnx.Module):
      def __init__(self, din, dout, rngs):
        self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (din, dout)))
        self.bn = BatchNorm(dout, use_running_average=False, rngs=rngs)
        self.lora = nnx.LoRA(din, 3, dout, rngs=rngs)

      def __call__(self, x):
        return self.bn(x @ self.w[...]) + self.lora(x)

    xkey, pkey, dkey = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(xkey, (2, 4))
    model = bridge.to_linen(NNXInner, 4, 3)
    var = model.init({'params': pkey, 'dropout': dkey}, x)
    self.assertSameElements(var.keys(), ['LoRAParam', 'params', 'batch_stats'])
    y = model.apply(var, x)
    assert y.shape == (2, 3)


if __name__ == '__main__':
  absltest.main()
