import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn.nnx
from train import models, steps

MODELS = ("cnn", "mlp", "resnet")
NORMS = ("batch", "none", "layer", "group")


def _variables(model, kind):
    return jax.tree.leaves(nnx.state(model, kind))


def _abstract(name, norm, shape=(8, 8, 1)):
    # Structure only: eval_shape builds the module without compiling anything.
    return nnx.eval_shape(lambda: models.build_model(name, shape, norm=norm, seed=0))


@nnx.jit
def _forward(model, x):
    return model(x)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1)])
def test_models_map_nhwc_images_to_ten_logits(name, shape):
    # Shapes only (abstract evaluation, nothing compiled); the end-to-end
    # tests run the models for real.
    out = nnx.eval_shape(lambda: models.build_model(name, shape, norm="batch", seed=0)(
        jnp.ones((3,) + shape)))
    assert out.shape == (3, 10) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("norm", NORMS)
def test_the_norm_factory_swaps_every_layer(name, norm):
    model = _abstract(name, norm)
    norms = [m for _, m in nnx.iter_graph(model)
             if isinstance(m, (models.BatchNorm, models.LayerNorm, models.GroupNorm))]
    expected = {"batch": models.BatchNorm, "layer": models.LayerNorm,
                "group": models.GroupNorm}.get(norm)
    if expected is None:
        assert norms == [] and _variables(model, nnx.BatchStat) == []
    else:
        assert norms and all(type(m) is expected for m in norms)
    has_stats = bool(_variables(model, nnx.BatchStat))
    assert has_stats == (norm == "batch")


def test_conv_bias_is_dropped_only_when_the_norm_shifts():
    with_bn = _abstract("cnn", "batch")
    without = _abstract("cnn", "none")
    assert with_bn.block1.conv.bias is None
    assert without.block1.conv.bias is not None


def test_same_seed_same_weights_different_seed_different():
    a = nnx.state(models.build_model("mlp", (8, 8, 1), norm="batch", seed=1), nnx.Param)
    b = nnx.state(models.build_model("mlp", (8, 8, 1), norm="batch", seed=1), nnx.Param)
    c = nnx.state(models.build_model("mlp", (8, 8, 1), norm="batch", seed=2), nnx.Param)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_eval_graphdef_uses_running_statistics():
    model = models.build_model("mlp", (8, 8, 1), norm="batch", seed=0)
    graphdefs, params, rest = steps.split_model(model)
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
    evaluate = jax.jit(lambda xb: nnx.merge(graphdefs.eval, params, rest, copy=True)(xb))
    # With running statistics an example's output does not depend on its batch.
    np.testing.assert_allclose(evaluate(x)[:4], evaluate(x[:4]), rtol=1e-5, atol=1e-6)
    train = jax.jit(lambda xb: nnx.merge(graphdefs.train, params, rest, copy=True)(xb))
    assert not np.allclose(train(x)[:4], train(x[:4]), atol=1e-3)


NUMPY_ACTIVATIONS = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh,
                     "sigmoid": lambda z: 1 / (1 + np.exp(-z))}


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_mlp_depth_width_activation(activation):
    model = models.MLP((8, 8, 1), norm="none", rngs=nnx.Rngs(0), depth=2, width=7,
                       activation=activation)
    assert len(model.layers) == 2 and model.layers[1].linear.kernel.shape == (7, 7)
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 1))
    # float64 reference of linear -> activation, twice, then the head.
    h = x.reshape(5, -1)
    for layer in model.layers:
        h = NUMPY_ACTIVATIONS[activation](h @ np.asarray(layer.linear.kernel[...], np.float64)
                                          + np.asarray(layer.linear.bias[...], np.float64))
    ref = h @ np.asarray(model.head.kernel[...], np.float64) + np.asarray(model.head.bias[...])
    np.testing.assert_allclose(_forward(model, jnp.asarray(x, jnp.float32)), ref,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ghost", "renorm"])
def test_library_only_norms_build_and_run(kind):
    opts = models.NormOptions(momentum=0.8, virtual_batch_size=8)
    model = models.MLP((8, 8, 1), norm=kind, opts=opts, rngs=nnx.Rngs(0), depth=2, width=16)
    norms = [layer.norm for layer in model.layers]
    expected = {"ghost": jaxbn.nnx.BatchNorm, "renorm": jaxbn.nnx.BatchRenorm}[kind]
    assert all(type(n) is expected and n.momentum == 0.8 for n in norms)
    if kind == "ghost":
        assert all(n.virtual_batch_size == 8 for n in norms)
    assert _forward(model, jnp.ones((32, 8, 8, 1))).shape == (32, 10)


def test_config_knows_which_norms_need_batches():
    # config.py stays free of jax, so it keeps its own list; it must agree.
    from train import config
    needs = {k for k, spec in models.NORMS.items() if spec.uses_batch}
    assert needs == set(config.BATCH_STAT_NORMS)
    assert set(models.NORMS) == set(config.NORMS)
