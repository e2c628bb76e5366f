"""The MLP that maps a row's features to its 18,211-gene differential-expression vector."""

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu}


def dropout(x, rate, key):
    """Inverted dropout with a traced `rate`, so each member of a vmapped sweep can have its own."""
    keep = jax.random.uniform(key, x.shape) >= rate
    return jnp.where(keep, x / jnp.maximum(1.0 - rate, 1e-6), 0.0).astype(x.dtype)


class MLP(nnx.Module):
    """Dense layers with an activation between them; the last layer is linear (targets are signed)."""

    def __init__(self, in_features, hidden, out_features, *, activation="relu", dtype=None,
                 param_dtype=jnp.float32, rngs):
        sizes = (in_features, *hidden)
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(a, b, **dense) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], out_features, **dense)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x, *, dropout_rate=0.0, key=None):
        """`key=None` is inference; with a key, dropout follows every hidden activation."""
        for i, layer in enumerate(self.layers):
            x = self.activation(layer(x))
            if key is not None:
                x = dropout(x, dropout_rate, jax.random.fold_in(key, i))
        return self.head(x).astype(jnp.float32)
