"""Dense models that map a row's features to its 18,211-gene differential-expression vector."""

import jax
import jax.numpy as jnp
from flax import nnx

from scp_jax.models.linear import Linear

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu}


def dropout(x, rate, key):
    """Inverted dropout with a traced `rate`, so each member of a vmapped sweep can have its own."""
    keep = jax.random.uniform(key, x.shape) >= rate
    return jnp.where(keep, x / jnp.maximum(1.0 - rate, 1e-6), 0.0).astype(x.dtype)


def maybe_dropout(x, rate, key, salt):
    """Dropout in training (a key), identity at inference (no key)."""
    return x if key is None else dropout(x, rate, jax.random.fold_in(key, salt))


class MLP(nnx.Module):
    """Dense layers with an activation (and optionally a LayerNorm) between them; the last layer is
    linear (targets are signed)."""

    def __init__(self, in_features, hidden, out_features, *, activation="relu", layer_norm=False, dtype=None,
                 param_dtype=jnp.float32, rngs):
        sizes = (in_features, *hidden)
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([Linear(a, b, **dense) for a, b in zip(sizes[:-1], sizes[1:])])
        self.norms = nnx.List([nnx.LayerNorm(b, **dense) for b in hidden] if layer_norm else [])
        self.head = Linear(sizes[-1], out_features, **dense)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x, *, dropout_rate=0.0, key=None):
        """`key=None` is inference; with a key, dropout follows every hidden activation."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = self.activation(self.norms[i](x) if self.norms else x)
            x = maybe_dropout(x, dropout_rate, key, i)
        return self.head(x).astype(jnp.float32)


class ResMLP(nnx.Module):
    """Pre-norm residual MLP: project to hidden[0], then one block x + W2(act(W1(LN(x)))) per entry of
    `hidden` (its inner width), then LN and a linear head. Trains deeper and wider than MLP."""

    def __init__(self, in_features, hidden, out_features, *, activation="gelu", dtype=None,
                 param_dtype=jnp.float32, rngs):
        width = hidden[0]
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = Linear(in_features, width, **dense)
        self.norms = nnx.List([nnx.LayerNorm(width, **dense) for _ in hidden])
        self.expand = nnx.List([Linear(width, h, **dense) for h in hidden])
        self.project = nnx.List([Linear(h, width, **dense) for h in hidden])
        self.final_norm = nnx.LayerNorm(width, **dense)
        self.head = Linear(width, out_features, **dense)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x, *, dropout_rate=0.0, key=None):
        x = self.embed(x)
        for i, (norm, expand, project) in enumerate(zip(self.norms, self.expand, self.project)):
            h = maybe_dropout(self.activation(expand(norm(x))), dropout_rate, key, i)
            x = x + project(h)
        return self.head(self.final_norm(x)).astype(jnp.float32)
