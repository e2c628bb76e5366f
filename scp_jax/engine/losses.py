"""Per-row training losses and their weighted mixes.

Each loss maps (prediction, target) [..., d] to one value per row (a mean over the last axis), so
rows can be weighted (padding, pseudo labels) before the batch mean. BCE compares
sigmoid(prediction) with sigmoid(target): it is minimal at prediction = target and, like the other
robust losses, lets the heavy-tailed -log10 p-values pull less than MSE does.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from scp_jax.models import DENSE_LAYERS


def mse(pred, target):
    return jnp.mean(jnp.square(pred - target), axis=-1)


def mae(pred, target):
    return jnp.mean(jnp.abs(pred - target), axis=-1)


def logcosh(pred, target):
    """log(cosh(d)) = |d| + log1p(exp(-2|d|)) - log 2, finite for any |d|."""
    d = jnp.abs(pred - target)
    return jnp.mean(d + jnp.log1p(jnp.exp(-2.0 * d)) - jnp.log(2.0), axis=-1)


def bce(pred, target):
    """Binary cross-entropy of sigmoid(pred) against soft labels sigmoid(target), from logits."""
    return jnp.mean(jax.nn.softplus(pred) - pred * jax.nn.sigmoid(target), axis=-1)


def huber(pred, target, delta=1.0):
    d = jnp.abs(pred - target)
    return jnp.mean(jnp.where(d <= delta, 0.5 * d * d, delta * (d - 0.5 * delta)), axis=-1)


def mrrmse(pred, target):
    """The metric itself, per row: RMSE over the last axis (epsilon keeps the gradient finite at 0)."""
    return jnp.sqrt(mse(pred, target) + 1e-12)


def scale_free(pred, target):
    """MSE after the best nonnegative rescaling a of each row's prediction, a = max(<p, t>, 0) / <p, p>.

    A row's measured effect scales with how many cells it had (a third of the rows are damped by
    few cells); this loss lets such rows teach the effect's shape without pulling its size to zero.
    Mixed with MSE, which still sets the size.
    """
    a = jnp.maximum(jnp.sum(pred * target, axis=-1, keepdims=True), 0.0) / (jnp.sum(pred * pred, axis=-1, keepdims=True) + 1e-6)
    return mse(a * pred, target)


def dense_weight_norm(model):
    """Sum of squares of the kernel and bias of every dense layer of `model` (models.DENSE_LAYERS):
    what `optim.l2` puts a Gaussian prior on.

    Unlike AdamW's decoupled weight decay, the prior is part of the loss, so it weighs against the
    data as a prior would: a weight the data barely determines (a compound's embedding in a direction
    its cell types hardly see) is pulled to zero, a well-determined one hardly moves. Norm layers'
    parameters, embeddings such as a transformer's positions, and a factorized model's offset, cap
    and sizes are not dense weights and stay free.
    """
    total = 0.0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, DENSE_LAYERS):
            for name in ("bias", "kernel"):  # the order of the parameter tree's leaves
                leaf = getattr(node, name, None)
                if leaf is not None:
                    total = total + jnp.sum(jnp.square(leaf[...].astype(jnp.float32)))
    return total


LOSSES = {"mse": mse, "mae": mae, "logcosh": logcosh, "bce": bce, "huber": huber, "mrrmse": mrrmse,
          "scale_free": scale_free}


def mixed_loss(config):
    """The per-row loss of a config's `[loss]` weights: sum of weight * loss over the nonzero ones."""
    weights = {name: getattr(config, name) for name in LOSSES if getattr(config, name)}

    def loss(pred, target):
        total = 0.0
        for name, weight in weights.items():
            term = huber(pred, target, config.huber_delta) if name == "huber" else LOSSES[name](pred, target)
            total = total + weight * term
        return total

    return loss
