import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scp_jax.config import LOSS_PARAMETERS, LossConfig, load_config
from scp_jax.engine.losses import LOSSES, dense_weight_norm, mixed_loss


def reference(name, pred, target, delta=1.0):
    """float64 numpy, written from the textbook definitions."""
    d = pred - target
    if name == "mse":
        return np.mean(d**2, axis=-1)
    if name == "mae":
        return np.mean(np.abs(d), axis=-1)
    if name == "logcosh":
        return np.mean(np.log(np.cosh(d)), axis=-1)
    if name == "bce":
        s, p = 1 / (1 + np.exp(-target)), 1 / (1 + np.exp(-pred))
        return np.mean(-(s * np.log(p) + (1 - s) * np.log(1 - p)), axis=-1)
    if name == "huber":
        return np.mean(np.where(np.abs(d) <= delta, 0.5 * d**2, delta * (np.abs(d) - 0.5 * delta)), axis=-1)
    if name == "scale_free":  # per row, the nonnegative least-squares scale of pred onto target
        scale = np.array([max(np.linalg.lstsq(p[:, None], t, rcond=None)[0][0], 0.0) for p, t in zip(pred, target)])
        return np.mean((scale[:, None] * pred - target) ** 2, axis=-1)
    return np.sqrt(np.mean(d**2, axis=-1))  # mrrmse


def heavy_tailed(seed, shape=(6, 50)):
    rng = np.random.default_rng(seed)
    return rng.standard_t(3, shape) * 2, rng.standard_t(3, shape) * 2


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_equals_float64_reference(name):
    pred, target = heavy_tailed(0)
    got = LOSSES[name](jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, reference(name, pred, target), rtol=2e-5, atol=2e-6)
    grads = jax.grad(lambda p: LOSSES[name](p, jnp.asarray(target, jnp.float32)).sum())(jnp.asarray(pred, jnp.float32))
    assert np.isfinite(np.asarray(grads)).all()


def test_losses_finite_far_from_target_and_minimal_at_target():
    far = jnp.array([[300.0, -300.0]])
    for name, loss in LOSSES.items():
        value, grad = jax.value_and_grad(lambda p, loss=loss: loss(p, jnp.zeros((1, 2))).sum())(far)
        assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all(), name
    target = jnp.array([[-2.0, 0.5, 3.0]])
    np.testing.assert_allclose(LOSSES["scale_free"](0.3 * target, target), 0.0, atol=1e-6)  # any size, same shape
    grad_at_target = jax.grad(lambda p: LOSSES["bce"](p, target).sum())(target)
    np.testing.assert_allclose(grad_at_target, 0.0, atol=1e-7)


def test_every_loss_weight_in_the_config_names_a_loss():
    """A new [loss] key is a weight unless LOSS_PARAMETERS says otherwise: both lists must agree."""
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert fields - set(LOSS_PARAMETERS) == set(LOSSES)


def test_mixed_loss_is_the_weighted_sum_of_references():
    config = load_config(None, ["loss.mse=0.32", "loss.mae=0.24", "loss.logcosh=0.24", "loss.bce=0.2",
                                "loss.huber=0.5", "loss.huber_delta=2.0"]).loss
    pred, target = heavy_tailed(1)
    got = mixed_loss(config)(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32))
    want = (0.32 * reference("mse", pred, target) + 0.24 * reference("mae", pred, target)
            + 0.24 * reference("logcosh", pred, target) + 0.2 * reference("bce", pred, target)
            + 0.5 * reference("huber", pred, target, delta=2.0))
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_the_l2_prior_covers_dense_kernels_and_biases_only():
    """MLP with LayerNorm: the norms are free. Factorized: both embeddings (biases included, else the
    CP scale could slip out through them) and the loadings; the offset and the cap are free. A layer
    is covered for its type, not its name: a LayerNorm called `ln` stays free, a Linear called
    `denorm` does not."""
    from flax import nnx

    from scp_jax.models.factorized import Factorized
    from scp_jax.models.mlp import MLP

    class Named(nnx.Module):
        def __init__(self, rngs):
            self.ln = nnx.LayerNorm(3, bias_init=nnx.initializers.ones, rngs=rngs)
            self.denorm = nnx.Linear(3, 2, bias_init=nnx.initializers.ones, rngs=rngs)

    mlp = MLP(5, (4, 3), 2, layer_norm=True, rngs=nnx.Rngs(0))
    factorized = Factorized((3, 4, 0, 0), 7, rank=2, rngs=nnx.Rngs(0))
    factorized.offset[...] = jnp.full(7, 5.0)
    named = Named(nnx.Rngs(0))
    for model, dense in ((mlp, [*mlp.layers, mlp.head]), (named, [named.denorm]),
                         (factorized, [factorized.cell, factorized.compound, factorized.loadings])):
        want = sum(np.sum(np.asarray(getattr(layer, name)[...], np.float64) ** 2)
                   for layer in dense for name in ("kernel", "bias") if getattr(layer, name, None) is not None)
        np.testing.assert_allclose(dense_weight_norm(model), want, rtol=1e-6)
